"""<amqp:writefiles> end to end: main() in-process against the real broker.
"""
import datetime
import os

import pytest

from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.integration import files_subscribers
from gocept.amqprun.xmlheader import header_filename
from gocept.amqprun.xmlheader import loads


#: Failed messages come back quickly.
FAST = 'retry-delay 0.1'

# The configurations of the seed README, verbatim.
README_BASIC = '''\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:amqp="http://namespaces.gocept.com/amqp">

  <include package="gocept.amqprun" file="meta.zcml" />

  <amqp:writefiles
    routing_key="test.data"
    queue_name="test.queue"
    directory="/path/to/output-directory"
    />
</configure>
'''

README_ROUTING_KEYS = '''\
    <amqp:writefiles
      routing_key="test.foo test.bar"
      queue_name="test.queue"
      directory="/path/to/output-directory"
      />
'''

README_PATTERN = '''\
    <amqp:writefiles
      routing_key="test.data"
      queue_name="test.queue"
      directory="/path/to/output-directory"
      pattern="${routing_key}/${date}/${msgid}-${unique}.xml"
      />
'''

README_ARGUMENTS = '''\
    <amqp:writefiles
      routing_key="test.foo test.bar"
      queue_name="test.queue"
      directory="/path/to/output-directory"
      arguments="
      x-ha-policy = all
      "
      />
'''


#: Registers a MessageStored subscriber that raises (when told to).
SUBSCRIBER = '''\
  <subscriber
    handler="gocept.amqprun.tests.integration.files_subscribers.fail_to_store"
    for="gocept.amqprun.interfaces.IMessageStored" />
'''


def site_zcml(snippet, directory):
    """The site ZCML of a README snippet writing to ``directory``, escaped
    for the configuration template."""
    if '<configure' not in snippet:
        snippet = (
            '<configure xmlns="http://namespaces.zope.org/zope"\n'
            '           xmlns:amqp="http://namespaces.gocept.com/amqp">\n'
            '  <include package="gocept.amqprun" file="meta.zcml" />\n'
            '%s</configure>\n' % snippet)
    return snippet.replace(
        '/path/to/output-directory', str(directory)).replace('$', '$$')


def files_below(directory):
    """All files below ``directory``, relative, sorted."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


def pairs(directory):
    """{body file: header file} of the files below ``directory``."""
    names = files_below(directory)
    return {name: header_filename(name) for name in names
            if header_filename(name) in names}


def wait_for_pairs(directory, count, timeout=10):
    """Wait until ``count`` complete file pairs (and no temporary files)
    are below ``directory``; return all files."""
    def complete():
        names = files_below(directory)
        return (len(pairs(directory)) >= count
                and not any(os.path.basename(name).startswith('.')
                            for name in names))
    wait_for(complete, timeout, message='Expected %d file pairs in %s, '
             'found %s' % (count, directory, files_below(directory)))
    return files_below(directory)


@pytest.fixture
def output(tmp_path):
    return tmp_path / 'output'


@pytest.fixture(autouse=True)
def fresh_queue(amqp_client):
    """Each test declares test.queue its own way: start without it."""
    amqp_client.channel.queue_delete('test.queue')
    files_subscribers.reset()
    yield
    files_subscribers.reset()


def test_readme_configuration_writes_body_and_header_file(
        amqp_main, amqp_client, output):
    main = amqp_main(site_zcml(README_BASIC, output), worker_extra=FAST)
    message_id = amqp_client.send_message(
        b'<xml>contents</xml>', 'test.data', content_type='text/xml')
    names = wait_for_pairs(output, 1)
    main.wait_for_processing()
    assert len(names) == 2
    ((body_name, header_name),) = pairs(output).items()
    assert body_name.startswith('test.data-')
    assert (output / body_name).read_bytes() == b'<xml>contents</xml>'
    header = loads((output / header_name).read_bytes())
    assert header.message_id == message_id
    assert header.content_type == 'text/xml'
    assert header.delivery_mode == 2
    assert amqp_client.queue_length('test.queue') == 0


def test_readme_configuration_with_two_routing_keys(
        amqp_main, amqp_client, output):
    amqp_main(site_zcml(README_ROUTING_KEYS, output))
    amqp_client.send_message(b'foo', 'test.foo')
    amqp_client.send_message(b'bar', 'test.bar')
    wait_for_pairs(output, 2)
    bodies = sorted((output / name).read_bytes() for name in pairs(output))
    assert bodies == [b'bar', b'foo']
    assert len(files_below(output)) == 4


@pytest.mark.parametrize('snippet', [
    README_PATTERN,
    README_PATTERN.replace('${', '{'),  # the zc.buildout spelling
], ids=['dollar', 'buildout'])
def test_readme_pattern_creates_directories(
        amqp_main, amqp_client, output, snippet):
    amqp_main(site_zcml(snippet, output))
    timestamp = 1302170400
    amqp_client.send_message(b'x', 'test.data', timestamp=timestamp,
                             message_id='<asdf998@example.com>')
    wait_for_pairs(output, 1)
    ((body_name, header_name),) = pairs(output).items()
    date = datetime.datetime.fromtimestamp(timestamp).strftime('%Y-%m-%d')
    directory, name = os.path.split(body_name)
    assert directory == 'test.data/%s' % date
    assert name.startswith('<asdf998@example.com>-')
    assert name.endswith('.xml')
    assert header_name.endswith('.header.xml')
    assert loads((output / header_name).read_bytes()).message_id == (
        '<asdf998@example.com>')


def test_readme_configuration_with_arguments(amqp_main, amqp_client, output):
    amqp_main(site_zcml(README_ARGUMENTS, output))
    amqp_client.send_message(b'x', 'test.bar')
    wait_for_pairs(output, 1)


def test_typed_arguments_reach_queue_declare(
        amqp_main, amqp_client, output):
    amqp_main(site_zcml('''\
    <amqp:writefiles
      routing_key="test.data"
      queue_name="test.queue"
      directory="/path/to/output-directory"
      arguments="
      x-queue-type = quorum
      x-message-ttl = 60000
      "
      />
''', output))
    amqp_client.send_message(b'x', 'test.data')
    wait_for_pairs(output, 1)
    # The broker refuses (PRECONDITION_FAILED) a re-declaration whose
    # arguments differ, so this works only with an int TTL on a quorum
    # queue.
    amqp_client.channel.queue_declare(
        'test.queue', durable=True, auto_delete=False,
        arguments={'x-queue-type': 'quorum', 'x-message-ttl': 60000})


def test_raising_message_stored_subscriber_writes_nothing_and_the_message_comes_back(  # noqa: E501
        amqp_main, amqp_client, output):
    files_subscribers.failures_left[0] = 1000
    zcml = README_BASIC.replace('</configure>', SUBSCRIBER + '</configure>')
    amqp_main(site_zcml(zcml, output), worker_extra=FAST)
    message_id = amqp_client.send_message(b'x', 'test.data')
    wait_for(lambda: len(files_subscribers.stored) >= 3)
    assert files_below(output) == []
    files_subscribers.failures_left[0] = 0
    wait_for_pairs(output, 1)
    assert set(files_subscribers.stored) == {message_id}
    assert len(files_below(output)) == 2


def test_unwritable_directory_keeps_the_message_until_it_is_fixed(
        amqp_main, amqp_client, output):
    output.write_text('a file where the directory belongs')
    main = amqp_main(site_zcml(README_BASIC, output), worker_extra=FAST)
    message_id = amqp_client.send_message(b'keep me', 'test.data')
    wait_for(lambda: 'failed 3 time(s)' in main.log)
    assert 'File exists' in main.log
    assert output.read_text() == 'a file where the directory belongs'
    assert main.server.running
    output.unlink()
    wait_for_pairs(output, 1)
    main.wait_for_processing()
    ((body_name, header_name),) = pairs(output).items()
    assert (output / body_name).read_bytes() == b'keep me'
    assert loads((output / header_name).read_bytes()).message_id == (
        message_id)
    assert len(files_below(output)) == 2
    assert amqp_client.queue_length('test.queue') == 0


HOSTILE_ROUTING_KEYS = [
    '../../etc', '/abs', '..', '.hidden', 'a/../../b', 'a\x00b', '//']


def test_hostile_values_land_inside_the_directory(
        amqp_main, amqp_client, tmp_path, output):
    amqp_main(site_zcml('''\
    <amqp:writefiles
      routing_key="#"
      queue_name="test.queue"
      directory="/path/to/output-directory"
      pattern="{routing_key}/{msgid}/{xfilename}-{unique}"
      />
''', output))
    for routing_key in HOSTILE_ROUTING_KEYS:
        amqp_client.send_message(
            routing_key.encode('utf-8', 'surrogateescape'), routing_key,
            headers={'X-Filename': '../../passwd'}, message_id='<../x@y>')
    count = 2 * len(HOSTILE_ROUTING_KEYS)
    wait_for_pairs(output, len(HOSTILE_ROUTING_KEYS))
    everything = files_below(tmp_path)
    # (the configuration and log files are amqprun-1.*)
    written = [name for name in everything if not name.startswith('amqprun-')]
    assert len(written) == count
    for name in written:
        assert name.startswith('output/')
        assert '..' not in name.split('/')
    bodies = sorted((output / name).read_bytes() for name in pairs(output))
    assert bodies == sorted(key.encode() for key in HOSTILE_ROUTING_KEYS)
