"""Tests for gocept.amqprun.writefiles: file names, safety, the data manager.
"""
import datetime
import logging
import os
import threading

import pytest
import transaction
import transaction.interfaces
import zope.component
import zope.interface.verify

import gocept.amqprun.datamanager
import gocept.amqprun.handler
import gocept.amqprun.interfaces
from gocept.amqprun.message import Message
from gocept.amqprun.session import Session
from gocept.amqprun.tests.unit.fakes import FakeServer
from gocept.amqprun.tests.unit.fakes import received_message
from gocept.amqprun.writefiles import DEFAULT_PATTERN
from gocept.amqprun.writefiles import FileDataManager
from gocept.amqprun.writefiles import FileWriter
from gocept.amqprun.writefiles import MAX_VALUE_BYTES
from gocept.amqprun.writefiles import check_pattern
from gocept.amqprun.writefiles import expand_pattern
from gocept.amqprun.writefiles import resolve
from gocept.amqprun.writefiles import safe_value
from gocept.amqprun.xmlheader import header_filename
from gocept.amqprun.xmlheader import loads


README_PATTERN = '${routing_key}/${date}/${msgid}-${unique}.xml'
BUILDOUT_PATTERN = '{routing_key}/{date}/{msgid}-{unique}.xml'

HOSTILE_ROUTING_KEYS = [
    '../../etc', '/abs', 'a\x00b', '..', '.', '', '.hidden', 'a/../../b',
    '//', 'x' * 300, '\udcff\ud800', 'new\nline',
]


def message(body=b'body', routing_key='example.route', **header):
    """A received message, as the server builds it."""
    header.setdefault('message_id', '<asdf998@example.com>')
    header.setdefault('timestamp', 1302170400)  # 2011-04-07 10:00 UTC
    return Message(header, body, delivery_tag=1, routing_key=routing_key)


def files_below(directory):
    """All files below ``directory``, relative, sorted."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


def store(writer, msg):
    """Run ``writer`` like a worker: handler call, then commit."""
    transaction.begin()
    try:
        writer(msg)
        transaction.commit()
    except Exception:
        transaction.abort()
        raise


@pytest.fixture(autouse=True)
def clean_transaction():
    transaction.abort()
    yield
    transaction.abort()


class FailingVote:
    """A data manager voting no after the file writer voted yes (like a
    failed AMQP commit)."""

    transaction_manager = None

    def __init__(self, error=None):
        self.error = error or RuntimeError('provoked AMQP commit failure')

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def tpc_vote(self, txn):
        raise self.error

    def sortKey(self):
        return '~~gocept.amqprun'


# -- patterns ----------------------------------------------------------------

def test_expand_pattern_accepts_braces_without_dollar():
    assert expand_pattern('{foo}/${bar}/{qux}') == '${foo}/${bar}/${qux}'


def test_buildout_pattern_equals_readme_pattern(tmp_path):
    assert (FileWriter(str(tmp_path), BUILDOUT_PATTERN).pattern
            == FileWriter(str(tmp_path), README_PATTERN).pattern
            == README_PATTERN)


@pytest.mark.parametrize('pattern', [None, ''])
def test_writer_without_pattern_uses_the_default(tmp_path, pattern):
    assert FileWriter(str(tmp_path), pattern).pattern == DEFAULT_PATTERN
    assert DEFAULT_PATTERN == '${routing_key}-${unique}'


def test_writer_makes_the_directory_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writer = FileWriter('out')
    assert writer.directory == str(tmp_path / 'out')
    assert repr(writer) == '<FileWriter %s/out/%s>' % (
        tmp_path, DEFAULT_PATTERN)


@pytest.mark.parametrize('pattern', [
    README_PATTERN, DEFAULT_PATTERN, '${xfilename}', 'a/b/c/${unique}',
    '$$x-${unique}', '.${msgid}', 'static.xml'])
def test_check_pattern_accepts_relative_patterns(pattern):
    check_pattern(pattern)


@pytest.mark.parametrize('pattern, problem', [
    ('${nosuch}-${unique}', 'Unknown variable(s) nosuch'),
    ('{routing_key}-$', 'Invalid placeholder'),
    ('/abs/${unique}', 'must be relative'),
    ('../${unique}', 'path component'),
    ('a/../../${unique}', 'path component'),
    ('./${unique}', 'path component'),
    ('a//${unique}', 'path component'),
    ('${routing_key}/', 'path component'),
    ('a\x00${unique}', 'NUL'),
])
def test_check_pattern_refuses_patterns_that_could_leave_the_directory(
        pattern, problem):
    with pytest.raises(ValueError, match=problem.replace('(', r'\(')
                       .replace(')', r'\)')):
        check_pattern(pattern)


def test_writer_refuses_a_bad_pattern(tmp_path):
    with pytest.raises(ValueError):
        FileWriter(str(tmp_path), '../{unique}')


# -- file names --------------------------------------------------------------

def test_readme_pattern_gives_the_readme_layout(tmp_path):
    writer = FileWriter(str(tmp_path), BUILDOUT_PATTERN)
    name = writer.filename(message())
    date = datetime.datetime.fromtimestamp(1302170400).strftime('%Y-%m-%d')
    prefix = 'example.route/%s/<asdf998@example.com>-' % date
    assert name.startswith(prefix)
    assert name.endswith('.xml')


def test_xfilename_is_the_x_filename_header(tmp_path):
    writer = FileWriter(str(tmp_path), '${xfilename}')
    assert writer.filename(message(headers={'X-Filename': 'foo.xml'})) == (
        'foo.xml')


@pytest.mark.parametrize('timestamp', [None, 2 ** 63, -2 ** 63, 'x'])
def test_a_timestamp_that_is_no_date_gives_today(tmp_path, timestamp):
    writer = FileWriter(str(tmp_path), '${date}')
    msg = message()
    msg.header.timestamp = timestamp
    assert writer.filename(msg) == datetime.date.today().strftime('%Y-%m-%d')
    assert msg.header.timestamp == timestamp


def test_missing_values_become_an_underscore(tmp_path):
    writer = FileWriter(str(tmp_path), '${routing_key}/${msgid}/${xfilename}')
    msg = Message({'message_id': None}, b'', routing_key=None)
    msg.header.message_id = None
    assert writer.filename(msg) == '_/_/_'


@pytest.mark.parametrize('value, expected', [
    ('../../etc', '___.._etc'),
    ('/abs', '_abs'),
    ('a\x00b', 'a_b'),
    ('<../x@y>', '<.._x@y>'),
    ('.hidden', '_hidden'),
    ('..', '__'),
    ('', '_'),
    (None, '_'),
    (b'by/tes', 'by_tes'),
    (42, '42'),
    ('tab\there', 'tab_here'),
    ('\udcff', '_'),
    ('test.data', 'test.data'),
    ('Ümläut', 'Ümläut'),
])
def test_safe_value_neutralises_path_syntax(value, expected):
    assert safe_value(value) == expected


def test_safe_value_cuts_long_values_at_a_character_boundary():
    value = safe_value('ü' * 200)
    assert value == 'ü' * (MAX_VALUE_BYTES // 2)
    assert len(safe_value('x' * 300).encode('utf-8')) == MAX_VALUE_BYTES
    assert safe_value('x' + 'ü' * 100) == 'x' + 'ü' * 49  # 99 bytes


@pytest.mark.parametrize('routing_key', HOSTILE_ROUTING_KEYS)
def test_hostile_routing_keys_stay_inside_the_directory(tmp_path, routing_key):
    directory = tmp_path / 'out'
    writer = FileWriter(str(directory), '${routing_key}/${date}/${unique}')
    name = writer.filename(message(routing_key=routing_key))
    assert '..' not in name.split('/')
    assert '\x00' not in name
    assert resolve(writer.directory, name).startswith(str(directory) + '/')
    store(writer, message(routing_key=routing_key))
    assert len(files_below(directory)) == 2
    assert files_below(tmp_path) == ['out/' + f for f in files_below(
        directory)]


def test_hostile_message_id_and_x_filename_stay_inside_the_directory(
        tmp_path):
    directory = tmp_path / 'out'
    writer = FileWriter(str(directory), '${msgid}/${xfilename}')
    msg = message(message_id='<../x@y>',
                  headers={'X-Filename': '../../etc/passwd'})
    assert writer.filename(msg) == '<.._x@y>/___.._etc_passwd'
    store(writer, msg)
    assert files_below(tmp_path) == sorted([
        'out/<.._x@y>/___.._etc_passwd',
        'out/<.._x@y>/' + header_filename('___.._etc_passwd')])


def test_safe_values_do_not_change_the_message(tmp_path):
    msg = message(routing_key='../x', headers={'X-Filename': '/y'})
    FileWriter(str(tmp_path), '${routing_key}${xfilename}').filename(msg)
    assert msg.routing_key == '../x'
    assert msg.header.headers == {'X-Filename': '/y'}
    assert msg.header.message_id == '<asdf998@example.com>'


@pytest.mark.parametrize('path', [
    '../x', '/etc/passwd', 'a/../../x', 'a\x00b', '', '.', 'a/..'])
def test_resolve_refuses_paths_not_below_the_directory(tmp_path, path):
    with pytest.raises(ValueError, match='is not below'):
        resolve(str(tmp_path), path)


def test_resolve_returns_the_absolute_path(tmp_path):
    assert resolve(str(tmp_path), 'a/b') == str(tmp_path / 'a' / 'b')


def test_unique_never_collides_across_threads(tmp_path):
    writer = FileWriter(str(tmp_path))
    msg = message()
    names = [[] for _ in range(8)]

    def generate(result):
        for _ in range(1000):
            result.append(writer.filename(msg))

    threads = [threading.Thread(target=generate, args=(result,))
               for result in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    all_names = [name for result in names for name in result]
    assert len(all_names) == 8000
    assert len(set(all_names)) == 8000


# -- writing -----------------------------------------------------------------

def test_writer_writes_body_and_header_at_commit(tmp_path):
    writer = FileWriter(str(tmp_path), 'foo.xml')
    msg = message(b'<xml/>')
    transaction.begin()
    assert writer(msg) is None
    assert os.listdir(tmp_path) == []
    transaction.commit()
    assert sorted(os.listdir(tmp_path)) == ['foo.header.xml', 'foo.xml']
    assert (tmp_path / 'foo.xml').read_bytes() == b'<xml/>'
    header = loads((tmp_path / 'foo.header.xml').read_bytes())
    assert header.message_id == '<asdf998@example.com>'
    assert header == msg.header


def test_writer_creates_intermediate_directories(tmp_path):
    store(FileWriter(str(tmp_path / 'out'), 'foo/bar/baz'), message(b'x'))
    assert (tmp_path / 'out' / 'foo' / 'bar' / 'baz').read_bytes() == b'x'
    assert (tmp_path / 'out' / 'foo' / 'bar' / 'baz.header').exists()


def test_writer_needs_the_parent_of_its_directory(tmp_path):
    writer = FileWriter(str(tmp_path / 'missing' / 'out'), 'foo')
    with pytest.raises(FileNotFoundError):
        store(writer, message())
    assert files_below(tmp_path) == []


def test_writer_writes_an_empty_file_for_no_body(tmp_path):
    msg = message()
    msg.body = None
    store(FileWriter(str(tmp_path), 'foo'), msg)
    assert (tmp_path / 'foo').read_bytes() == b''


def test_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    store(FileWriter(str(tmp_path), 'foo'), message())
    assert (tmp_path / 'foo').stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_default_pattern_gives_distinct_file_pairs(tmp_path):
    writer = FileWriter(str(tmp_path))
    store(writer, message(b'1'))
    store(writer, message(b'2'))
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 4
    assert all(name.startswith('example.route-') for name in names)
    bodies = [name for name in names if '.header' not in name]
    assert sorted((tmp_path / name).read_bytes() for name in bodies) == [
        b'1', b'2']
    for name in bodies:
        assert header_filename(name) in names


def test_writer_in_a_handler_sends_no_messages(tmp_path):
    handler = gocept.amqprun.handler.Handler(
        'test.queue', 'test.data', FileWriter(str(tmp_path)))
    transaction.begin()
    assert handler(message()) == []


def test_writer_sends_message_stored_with_the_relative_path(
        tmp_path, clean_registry):
    events = []

    def record(event):
        events.append(event)
        assert os.listdir(tmp_path) == []  # sent before the write

    zope.component.provideHandler(
        record, (gocept.amqprun.interfaces.IMessageStored,))
    msg = message()
    store(FileWriter(str(tmp_path), 'foo/bar/baz'), msg)
    assert len(events) == 1
    assert events[0].path == 'foo/bar/baz'
    assert events[0].message is msg


def test_raising_message_stored_subscriber_prevents_the_write(
        tmp_path, clean_registry):
    def fail(event):
        raise RuntimeError('provoked')

    zope.component.provideHandler(
        fail, (gocept.amqprun.interfaces.IMessageStored,))
    with pytest.raises(RuntimeError, match='provoked'):
        store(FileWriter(str(tmp_path), 'foo'), message())
    assert files_below(tmp_path) == []


# -- the data manager --------------------------------------------------------

def test_data_manager_provides_the_savepoint_data_manager_interface(
        tmp_path):
    manager = FileDataManager(message(), str(tmp_path), 'foo')
    assert zope.interface.verify.verifyObject(
        transaction.interfaces.ISavepointDataManager, manager)
    assert repr(manager) == '<FileDataManager foo in %s>' % tmp_path


def test_data_manager_sorts_before_the_amqp_data_manager(tmp_path):
    manager = FileDataManager(message(), str(tmp_path), 'foo')
    amqp = gocept.amqprun.datamanager.AMQPDataManager(session=None)
    assert manager.sortKey() < amqp.sortKey()
    assert sorted([amqp.sortKey(), manager.sortKey(), 'zodb']) == [
        'zodb', manager.sortKey(), amqp.sortKey()]


def test_data_manager_writes_in_vote(tmp_path):
    manager = FileDataManager(message(b'x'), str(tmp_path), 'foo')
    txn = transaction.begin()
    manager.tpc_begin(txn)
    manager.commit(txn)
    assert os.listdir(tmp_path) == []
    manager.tpc_vote(txn)
    assert sorted(os.listdir(tmp_path)) == ['foo', 'foo.header']
    manager.tpc_finish(txn)
    manager.tpc_abort(txn)  # after finish: nothing to undo
    assert sorted(os.listdir(tmp_path)) == ['foo', 'foo.header']


def test_abort_writes_nothing(tmp_path):
    writer = FileWriter(str(tmp_path), 'foo')
    transaction.begin()
    writer(message())
    transaction.abort()
    assert os.listdir(tmp_path) == []


def test_failing_later_vote_removes_the_written_files(tmp_path, caplog):
    writer = FileWriter(str(tmp_path), 'sub/foo.xml')
    transaction.begin()
    writer(message())
    transaction.get().join(FailingVote())
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.writefiles'):
        with pytest.raises(RuntimeError, match='provoked AMQP'):
            transaction.commit()
    transaction.abort()
    assert files_below(tmp_path) == []
    assert 'the message comes back' in caplog.text


def test_files_stay_when_the_amqp_commit_is_in_doubt(tmp_path, caplog):
    server = FakeServer(outcomes=[
        gocept.amqprun.interfaces.CommitInDoubt('connection lost')])
    writer = FileWriter(str(tmp_path), 'foo.xml')
    transaction.begin()
    writer(message())
    Session(server).send(message())
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.writefiles'):
        with pytest.raises(gocept.amqprun.interfaces.CommitInDoubt):
            transaction.commit()
        transaction.abort()
    assert files_below(tmp_path) == ['foo.header.xml', 'foo.xml']
    assert 'the AMQP commit is in doubt' in caplog.text


def test_files_of_a_handled_message_stay_when_its_commit_is_in_doubt(
        tmp_path):
    server = FakeServer(outcomes=[
        gocept.amqprun.interfaces.CommitInDoubt('connection lost')])
    writer = FileWriter(str(tmp_path), 'foo.xml')
    transaction.begin()
    session = Session(server, received_message())
    session.join_transaction()
    writer(message())
    transaction.commit()
    assert session.in_doubt
    assert files_below(tmp_path) == ['foo.header.xml', 'foo.xml']


def test_failing_write_leaves_no_temporary_file(tmp_path):
    msg = message()
    msg.body = 42  # the header file is written, then the body fails
    with pytest.raises(TypeError):
        store(FileWriter(str(tmp_path), 'foo'), msg)
    assert files_below(tmp_path) == []


def test_directory_in_the_way_is_a_no_vote(tmp_path):
    (tmp_path / 'out').write_text('in the way')
    with pytest.raises(OSError):
        store(FileWriter(str(tmp_path / 'out'), 'foo'), message())
    assert files_below(tmp_path) == ['out']


def test_cleanup_never_raises(tmp_path, caplog):
    manager = FileDataManager(message(), str(tmp_path), 'foo')
    txn = transaction.begin()
    manager.tpc_vote(txn)
    os.remove(tmp_path / 'foo.header')
    os.remove(tmp_path / 'foo')
    os.mkdir(tmp_path / 'foo')
    (tmp_path / 'foo' / 'keep').write_text('')
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.writefiles'):
        manager.tpc_abort(txn)
    assert 'Could not remove %s' % (tmp_path / 'foo') in caplog.text
    manager.abort(txn)  # idempotent


def test_savepoints_are_supported(tmp_path):
    writer = FileWriter(str(tmp_path), 'foo')
    transaction.begin()
    writer(message())
    savepoint = transaction.savepoint()
    savepoint.rollback()
    transaction.commit()
    assert sorted(os.listdir(tmp_path)) == ['foo', 'foo.header']


def test_writing_without_fsync(tmp_path, monkeypatch):
    monkeypatch.setattr(FileDataManager, 'fsync', False)
    store(FileWriter(str(tmp_path), 'foo'), message(b'x'))
    assert (tmp_path / 'foo').read_bytes() == b'x'


def test_an_existing_file_of_that_name_is_replaced(tmp_path):
    (tmp_path / 'foo').write_bytes(b'old')
    store(FileWriter(str(tmp_path), 'foo'), message(b'new'))
    assert (tmp_path / 'foo').read_bytes() == b'new'


def test_written_files_are_notified_with_directory_and_path(
        tmp_path, events):
    written = events(gocept.amqprun.interfaces.IFileWritten)
    store(FileWriter(str(tmp_path), 'foo'), message())
    [event] = written
    assert (event.directory, event.path, event.error) == (
        str(tmp_path), 'foo', None)


def test_failed_write_is_notified_with_its_error(tmp_path, events):
    written = events(gocept.amqprun.interfaces.IFileWritten)
    (tmp_path / 'out').write_text('in the way')
    with pytest.raises(OSError):
        store(FileWriter(str(tmp_path / 'out'), 'foo'), message())
    [event] = written
    assert event.directory == str(tmp_path / 'out')
    assert isinstance(event.error, OSError)
