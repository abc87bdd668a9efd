"""Tests for gocept.amqprun.readfiles: the Maildir reader without a broker.
"""
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest
import transaction
import zope.component
import zope.component.event  # noqa: F401 (events reach handlers)
import zope.event
import zope.interface
import zope.interface.verify

import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.process
from gocept.amqprun.readfiles import Maildir
from gocept.amqprun.readfiles import MaildirReader
from gocept.amqprun.readfiles import filename_header
from gocept.amqprun.readfiles import register_reader
from gocept.amqprun.testing import subprocess_environment
from gocept.amqprun.testing import wait_for


class FakeSender:
    """ISender that "publishes" when the transaction commits.

    ``fail`` makes the commit fail, like a broker that is down. ``on_send``
    is called with each message (to meddle with the Maildir meanwhile).
    """

    max_message_size = 1024

    def __init__(self, maildir):
        self.maildir = maildir
        self.sent = []
        self.fail = False
        self.on_send = None
        #: Whether the file was still in new/ when the commit happened.
        self.in_new_at_commit = []

    def send(self, message):
        if self.on_send is not None:
            self.on_send(message)
        # As the real session does (ISender.send).
        gocept.amqprun.message.check_size(message, self.max_message_size)
        transaction.get().join(FakeAMQPDataManager(self, message))


class FakeAMQPDataManager:
    """Commits a FakeSender's message in vote, as the real one does."""

    transaction_manager = None

    def __init__(self, sender, message):
        self.sender = sender
        self.message = message

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def tpc_vote(self, txn):
        if self.sender.fail:
            raise gocept.amqprun.interfaces.CommitFailed('broker is down')
        name = self.message.header.headers['X-Filename']
        self.sender.in_new_at_commit.append(os.path.exists(
            os.path.join(self.sender.maildir, 'new', name)))
        self.sender.sent.append(self.message)

    def sortKey(self):
        return '~~gocept.amqprun'


def deliver(maildir, name, content=b'contents'):
    """Put a file into the Maildir the proper way: tmp/, then new/."""
    tmp = os.path.join(maildir, 'tmp', name)
    with open(tmp, 'wb') as f:
        f.write(content)
    os.rename(tmp, os.path.join(maildir, 'new', name))


def listing(maildir, subdirectory):
    return sorted(os.listdir(os.path.join(maildir, subdirectory)))


@pytest.fixture
def maildir(tmp_path):
    return str(tmp_path / 'maildir')


@pytest.fixture
def sender(maildir):
    return FakeSender(maildir)


@pytest.fixture
def reader(maildir):
    reader = MaildirReader(maildir, 'test.data', poll_interval=0.01)
    yield reader
    reader.stop()
    if reader.thread is not None:
        reader.thread.join(5)
        assert not reader.thread.is_alive(), 'reader thread survived'


@pytest.fixture
def stop_requests(monkeypatch):
    """Record calls of ``process.request_stop`` instead of stopping."""
    calls = []
    monkeypatch.setattr(gocept.amqprun.process, 'request_stop',
                        lambda *args: calls.append(args))
    return calls


@pytest.fixture(autouse=True)
def clean_transaction():
    transaction.abort()
    yield
    transaction.abort()


# -- the Maildir -------------------------------------------------------------

def test_reader_prepares_the_maildir(maildir):
    MaildirReader(maildir, 'test.data')
    assert listing(maildir, '.') == ['cur', 'new', 'tmp']
    MaildirReader(maildir, 'test.data')  # existing directories are fine


def test_something_in_the_way_of_the_maildir_is_an_error(tmp_path):
    (tmp_path / 'maildir').mkdir()
    (tmp_path / 'maildir' / 'new').write_text('')
    with pytest.raises(FileExistsError):
        MaildirReader(str(tmp_path / 'maildir'), 'test.data')


def test_new_files_are_sorted_without_dot_files(maildir, reader):
    for name in ['b', 'a', '.hidden', 'c']:
        deliver(maildir, name)
    os.mkdir(os.path.join(maildir, 'new', 'subdirectory'))
    assert Maildir(maildir).new_files() == ['a', 'b', 'c', 'subdirectory']


def test_filename_header_replaces_what_is_not_utf8():
    assert filename_header('foo.xml') == 'foo.xml'
    assert filename_header(os.fsdecode(b'caf\xe9.xml')) == 'caf\ufffd.xml'


# -- scanning ----------------------------------------------------------------

def test_empty_new_directory_sends_nothing(reader, sender):
    assert reader.scan(sender) == 0
    assert sender.sent == []


def test_file_is_sent_and_moved_to_cur_after_the_commit(
        maildir, reader, sender):
    deliver(maildir, 'foo.xml', b'contents')
    assert reader.scan(sender) == 1
    (message,) = sender.sent
    assert message.body == b'contents'
    assert message.routing_key == 'test.data'
    assert message.exchange == 'amq.topic'
    assert message.header.content_type == 'text/xml'
    assert message.header.headers == {'X-Filename': 'foo.xml'}
    assert message.header.message_id
    assert sender.in_new_at_commit == [True]
    assert listing(maildir, 'new') == []
    assert listing(maildir, 'cur') == ['foo.xml']


def test_files_are_sent_to_the_readers_exchange(maildir, sender):
    reader = MaildirReader(maildir, 'test.data', exchange='invalidations')
    deliver(maildir, 'foo.xml')
    assert reader.scan(sender) == 1
    assert sender.sent[0].exchange == 'invalidations'


def test_files_are_sent_in_name_order_each_in_its_own_transaction(
        maildir, reader, sender):
    for name in ['2', '1', '3']:
        deliver(maildir, name, name.encode())
    assert reader.scan(sender) == 3
    assert [m.body for m in sender.sent] == [b'1', b'2', b'3']
    assert listing(maildir, 'cur') == ['1', '2', '3']


def test_failing_commit_leaves_the_file_in_new(
        maildir, reader, sender, caplog):
    deliver(maildir, 'a')
    deliver(maildir, 'b')
    sender.fail = True
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.readfiles'):
        assert reader.scan(sender) == 0
    assert listing(maildir, 'new') == ['a', 'b']
    assert listing(maildir, 'cur') == []
    assert 'it stays in new/ and is sent again' in caplog.text
    assert 'broker is down' in caplog.text
    assert caplog.text.count('failed') == 1  # stopped at the first file
    sender.fail = False
    assert reader.scan(sender) == 2
    assert listing(maildir, 'cur') == ['a', 'b']


def test_file_that_vanishes_before_it_is_read_is_skipped(
        maildir, reader, sender, caplog):
    deliver(maildir, 'a')
    deliver(maildir, 'b')
    deliver(maildir, 'c')
    sender.on_send = lambda message: (
        message.header.headers['X-Filename'] == 'a'
        and os.remove(os.path.join(maildir, 'new', 'b')))
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.readfiles'):
        assert reader.scan(sender) == 3
    assert [m.header.headers['X-Filename'] for m in sender.sent] == ['a', 'c']
    assert 'b vanished from' in caplog.text


def test_non_utf8_file_names_are_sent(maildir, reader, sender):
    name = os.fsdecode(b'caf\xe9')
    deliver(maildir, name)
    reader.scan(sender)
    assert sender.sent[0].header.headers['X-Filename'] == 'caf\ufffd'
    assert listing(maildir, 'cur') == [name]


def test_removed_new_directory_is_an_os_error(maildir, reader, sender):
    shutil.rmtree(os.path.join(maildir, 'new'))
    with pytest.raises(FileNotFoundError):
        reader.scan(sender)


def test_failing_move_after_the_commit_is_an_os_error(
        maildir, reader, sender):
    deliver(maildir, 'a')
    shutil.rmtree(os.path.join(maildir, 'cur'))
    with pytest.raises(FileNotFoundError):
        reader.scan(sender)
    assert len(sender.sent) == 1
    assert listing(maildir, 'new') == ['a']


def test_stop_ends_a_scan_after_the_current_file(maildir, reader, sender):
    deliver(maildir, 'a')
    deliver(maildir, 'b')
    sender.on_send = lambda message: reader.stop()
    assert reader.scan(sender) == 1
    assert listing(maildir, 'new') == ['b']


# -- the loop ----------------------------------------------------------------

@pytest.fixture
def registered_sender(clean_registry, sender):
    zope.component.provideUtility(sender, gocept.amqprun.interfaces.ISender)
    return sender


def test_reader_provides_iloop(reader):
    assert zope.interface.verify.verifyObject(
        gocept.amqprun.interfaces.ILoop, reader)
    assert repr(reader) == "<MaildirReader %s -> 'test.data'>" % (
        reader.maildir.path)


def test_loop_sends_files_until_stopped(
        maildir, reader, registered_sender, stop_requests):
    reader.on_process_started(None)
    assert reader.wait_until_running(5)
    assert reader.thread.name == 'amqprun-readfiles'
    deliver(maildir, 'foo.xml')
    wait_for(lambda: listing(maildir, 'cur') == ['foo.xml'])
    assert [m.body for m in registered_sender.sent] == [b'contents']
    reader.on_process_stopping(None)
    assert not reader.thread.is_alive()
    assert not reader.running
    assert stop_requests == []


def test_process_started_twice_starts_one_thread(
        reader, registered_sender):
    reader.on_process_started(None)
    thread = reader.thread
    reader.on_process_started(None)
    assert reader.thread is thread


def test_reader_can_be_started_again_after_a_stop(
        maildir, reader, registered_sender):
    reader.on_process_started(None)
    reader.on_process_stopping(None)
    reader.on_process_started(None)
    assert reader.wait_until_running(5)
    deliver(maildir, 'again')
    wait_for(lambda: listing(maildir, 'cur') == ['again'])


def test_stopping_a_reader_that_never_started(reader):
    reader.on_process_stopping(None)
    assert reader.thread is None


def test_stopping_waits_a_bounded_time(
        maildir, reader, registered_sender, caplog):
    entered = threading.Event()
    release = threading.Event()

    def block(message):
        entered.set()
        release.wait(10)

    registered_sender.on_send = block
    deliver(maildir, 'slow')
    reader.stop_timeout = 0.05
    reader.on_process_started(None)
    assert entered.wait(5)
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.readfiles'):
        reader.on_process_stopping(None)
    assert 'did not stop within 0.05 s' in caplog.text
    release.set()
    reader.thread.join(5)
    assert listing(maildir, 'cur') == ['slow']


def test_file_system_error_stops_the_process_once(
        maildir, reader, registered_sender, stop_requests, caplog):
    reader.on_process_started(None)
    assert reader.wait_until_running(5)
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.readfiles'):
        shutil.rmtree(os.path.join(maildir, 'new'))
        reader.thread.join(5)
    assert not reader.thread.is_alive()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().startswith(
        'Unhandled exception, terminating.')
    assert 'FileNotFoundError' in errors[0].getMessage()
    assert len(stop_requests) == 1
    assert stop_requests[0][0] == 1
    assert maildir in stop_requests[0][1]


def test_missing_sender_stops_the_process(
        reader, clean_registry, stop_requests):
    reader.start()  # returns at once
    assert len(stop_requests) == 1


# -- registration ------------------------------------------------------------

def test_register_reader_hooks_the_reader_to_the_process_events(
        maildir, registered_sender):
    reader = register_reader(maildir, 'test.data', 0.01, 'invalidations')
    assert reader.poll_interval == 0.01
    assert reader.exchange == 'invalidations'
    assert listing(maildir, '.') == ['cur', 'new', 'tmp']
    try:
        zope.event.notify(gocept.amqprun.interfaces.ProcessStarted())
        assert reader.wait_until_running(5)
        deliver(maildir, 'x')
        wait_for(lambda: listing(maildir, 'cur') == ['x'])
    finally:
        zope.event.notify(gocept.amqprun.interfaces.ProcessStopping())
    assert not reader.thread.is_alive()


def test_sent_and_failed_files_are_notified_by_directory(
        maildir, reader, sender, events):
    sent = events(gocept.amqprun.interfaces.IFileSent)
    deliver(maildir, 'a')
    sender.fail = True
    reader.scan(sender)
    sender.fail = False
    reader.scan(sender)
    assert [(event.directory, event.name) for event in sent] == [
        (maildir, 'a'), (maildir, 'a')]
    assert isinstance(sent[0].error, Exception)
    assert sent[1].error is None


# -- poison files ------------------------------------------------------------

def new_path(maildir, name):
    return os.path.join(maildir, 'new', name)


def test_refused_file_goes_to_failed_and_the_next_is_sent_at_once(
        maildir, reader, sender, caplog):
    deliver(maildir, 'a-poison')
    deliver(maildir, 'b-good', b'good')
    original = sender.send

    def send(message):
        if message.header.headers['X-Filename'] == 'a-poison':
            raise gocept.amqprun.interfaces.PublishRefused('refused: size')
        original(message)
    sender.send = send
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.readfiles'):
        assert reader.scan(sender) == 2
    assert listing(maildir, 'failed') == ['a-poison']
    assert listing(maildir, 'cur') == ['b-good']
    assert listing(maildir, 'new') == []
    [record] = caplog.records
    assert record.levelname == 'ERROR'
    assert 'a-poison' in record.getMessage()
    assert 'refused: size' in record.getMessage()
    assert 'moved it to failed/' in record.getMessage()


def test_publish_refused_at_commit_puts_the_file_aside(
        maildir, reader, sender):
    deliver(maildir, 'a')
    sender.fail = True
    original = FakeAMQPDataManager.tpc_vote

    def refuse(self, txn):
        raise gocept.amqprun.interfaces.PublishRefused('no exchange')
    FakeAMQPDataManager.tpc_vote = refuse
    try:
        assert reader.scan(sender) == 1
    finally:
        FakeAMQPDataManager.tpc_vote = original
    assert listing(maildir, 'failed') == ['a']


def test_file_above_max_message_size_is_put_aside_unread(
        maildir, reader, sender, caplog):
    path = new_path(maildir, 'huge')
    with open(path, 'wb') as f:
        f.truncate(8 * 1024 ** 3)  # sparse: reading it would take ages
    deliver(maildir, 'small', b'x' * sender.max_message_size)
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.readfiles'):
        assert reader.scan(sender) == 2
    assert listing(maildir, 'failed') == ['huge']
    assert [m.body for m in sender.sent] == [b'x' * 1024]
    assert '8589934592 bytes, above max_message_size 1024' in caplog.text


def test_file_growing_beyond_the_limit_while_read_is_put_aside(
        maildir, reader, sender, monkeypatch):
    deliver(maildir, 'growing', b'x' * 2000)
    real_fstat = os.fstat

    def fstat_before_growth(fd):
        info = real_fstat(fd)
        return os.stat_result((info.st_mode,) + tuple(info[1:6]) + (10,)
                              + tuple(info[7:]))
    monkeypatch.setattr(os, 'fstat', fstat_before_growth)
    reader.scan(sender)
    assert listing(maildir, 'failed') == ['growing']


def test_symbolic_link_is_never_followed(
        maildir, reader, sender, tmp_path, caplog):
    secret = tmp_path / 'secret'
    secret.write_bytes(b'secret')
    os.symlink(secret, new_path(maildir, 'link'))
    deliver(maildir, 'next')
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.readfiles'):
        assert reader.scan(sender) == 2
    assert [m.header.headers['X-Filename'] for m in sender.sent] == ['next']
    assert listing(maildir, 'failed') == ['link']
    assert os.path.islink(os.path.join(maildir, 'failed', 'link'))
    assert 'a symbolic link' in caplog.text
    assert secret.read_bytes() == b'secret'


def test_dangling_symbolic_link_is_put_aside_too(maildir, reader, sender):
    os.symlink('/nonexistent', new_path(maildir, 'dangling'))
    reader.scan(sender)
    assert listing(maildir, 'failed') == ['dangling']


def test_fifo_is_put_aside_without_blocking(
        maildir, reader, sender, caplog):
    os.mkfifo(new_path(maildir, 'fifo'))
    deliver(maildir, 'next')
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.readfiles'):
        assert reader.scan(sender) == 2
    assert listing(maildir, 'failed') == ['fifo']
    assert listing(maildir, 'cur') == ['next']
    assert 'a FIFO' in caplog.text


def make_socket(path):
    # The socket file stays when the socket is closed.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)


def make_character_device(path):
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip('creating a device needs root (CAP_MKNOD)')


@pytest.mark.parametrize('make, kind', [
    (os.mkdir, 'a directory'),
    (make_socket, 'a socket'),
    (make_character_device, 'a character device'),
])
def test_what_is_no_regular_file_is_put_aside(
        make, kind, maildir, reader, sender, caplog):
    make(new_path(maildir, 'special'))
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.readfiles'):
        reader.scan(sender)
    assert listing(maildir, 'failed') == ['special']
    assert kind in caplog.text


def test_other_open_error_of_a_file_is_fatal(
        maildir, reader, sender, monkeypatch):
    deliver(maildir, 'a')

    def fail(path, flags):
        raise OSError(5, 'Input/output error')
    monkeypatch.setattr(os, 'open', fail)
    with pytest.raises(OSError, match='Input/output'):
        reader.scan(sender)


#: Run in a subprocess as another user (root reads any file): scans a
#: Maildir once with a sender that takes every message. It imports as the
#: user who started it (root's Python may live where others cannot read),
#: then gives up root for the user id given.
SCAN_AS_OTHER_USER = textwrap.dedent('''
    import os
    import sys
    import gocept.amqprun.message
    import gocept.amqprun.readfiles

    gocept.amqprun.message.make_message_id()  # imports what it needs
    if sys.argv[2] != 'None':
        os.setgid(int(sys.argv[2]))
        os.setuid(int(sys.argv[2]))

    class Sender:
        max_message_size = 1024

        def send(self, message):
            pass

    reader = gocept.amqprun.readfiles.MaildirReader(sys.argv[1], 'test')
    print(reader.scan(Sender()))
''')

#: The user who runs the scan: ``nobody`` when the tests run as root.
OTHER_USER = 65534 if os.geteuid() == 0 else None


def scan_as_other_user(maildir):
    """Scan ``maildir`` once in a subprocess that is not root."""
    return subprocess.run(
        [sys.executable, '-c', SCAN_AS_OTHER_USER, maildir, str(OTHER_USER)],
        env=subprocess_environment(), capture_output=True, text=True,
        timeout=60)


@pytest.fixture
def shared_maildir():
    """A Maildir the other user owns (outside root's private tmp_path)."""
    directory = tempfile.mkdtemp(prefix='amqprun-readfiles-')
    maildir = os.path.join(directory, 'maildir')
    MaildirReader(maildir, 'test')
    for path in (directory, maildir, *(
            os.path.join(maildir, name) for name in ('tmp', 'new', 'cur'))):
        os.chmod(path, 0o755)
        if OTHER_USER is not None:
            os.chown(path, OTHER_USER, OTHER_USER)
    yield maildir
    shutil.rmtree(directory)


def test_unreadable_file_is_put_aside(shared_maildir):
    maildir = shared_maildir
    deliver(maildir, 'a-unreadable')
    deliver(maildir, 'b-readable')
    os.chmod(new_path(maildir, 'a-unreadable'), 0)
    if OTHER_USER is not None:
        for name in ('a-unreadable', 'b-readable'):
            os.chown(new_path(maildir, name), OTHER_USER, OTHER_USER)
    result = scan_as_other_user(maildir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '2'
    assert 'no permission to read it' in result.stderr
    assert listing(maildir, 'failed') == ['a-unreadable']
    assert listing(maildir, 'cur') == ['b-readable']


def test_unsearchable_new_directory_is_fatal(shared_maildir):
    maildir = shared_maildir
    deliver(maildir, 'a')
    os.chmod(os.path.join(maildir, 'new'), 0o444)  # list, but no access
    result = scan_as_other_user(maildir)
    assert result.returncode == 1
    assert 'PermissionError' in result.stderr
    os.chmod(os.path.join(maildir, 'new'), 0o755)
    assert listing(maildir, 'new') == ['a']
