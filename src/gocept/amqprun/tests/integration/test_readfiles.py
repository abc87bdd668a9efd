"""<amqp:readfiles> end to end: main() in-process against the real broker.
"""
import os
import shutil
import threading
import time

import pytest

from gocept.amqprun.testing import wait_for


# The configuration of the seed README, verbatim.
README_READFILES = '''\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:amqp="http://namespaces.gocept.com/amqp">

  <include package="gocept.amqprun" file="meta.zcml" />

  <amqp:readfiles
    directory="/path/to/input-directory"
    routing_key="test.data"
    />
</configure>
'''

#: The README configuration polling ten times a second.
FAST_READFILES = README_READFILES.replace(
    'routing_key="test.data"',
    'routing_key="test.data"\n    poll_interval="0.1"')


def site_zcml(zcml, directory):
    return zcml.replace('/path/to/input-directory', str(directory))


def deliver(maildir, name, content):
    """Put a file into the Maildir the proper way: tmp/, then new/."""
    tmp = maildir / 'tmp' / name
    tmp.write_bytes(content)
    os.rename(tmp, maildir / 'new' / name)


def listing(directory):
    return sorted(os.listdir(directory))


def reader_threads():
    return [thread for thread in threading.enumerate()
            if thread.name == 'amqprun-readfiles']


@pytest.fixture
def maildir(tmp_path):
    return tmp_path / 'input'


@pytest.fixture(autouse=True)
def no_reader_survives():
    """Every reader thread a test started is gone after it."""
    yield
    wait_for(lambda: not reader_threads(), 10,
             message='Reader threads survived the test')


def test_readme_configuration_sends_a_file_and_moves_it_to_cur(
        amqp_main, amqp_client, maildir):
    amqp_client.expect_message_on('test.data')
    amqp_main(site_zcml(README_READFILES, maildir), workers=0)
    assert listing(maildir) == ['cur', 'new', 'tmp']
    deliver(maildir, 'foo.xml', b'contents')
    message = amqp_client.wait_for_message()
    assert message.body == b'contents'
    assert message.properties['application_headers'] == {
        'X-Filename': 'foo.xml'}
    assert message.properties['content_type'] == 'text/xml'
    assert message.properties['delivery_mode'] == 2
    assert '.gocept.amqprun@' in message.properties['message_id']
    wait_for(lambda: listing(maildir / 'cur') == ['foo.xml'])
    assert listing(maildir / 'new') == []
    assert (maildir / 'cur' / 'foo.xml').read_bytes() == b'contents'


def test_fifty_files_at_once_arrive_exactly_once(
        amqp_main, amqp_client, maildir):
    amqp_client.expect_message_on('test.data')
    amqp_main(site_zcml(FAST_READFILES, maildir), workers=0)
    for number in range(50):
        (maildir / 'tmp' / str(number)).write_bytes(b'%d' % number)
    for number in range(50):  # as fast as possible: a scan may run
        os.rename(maildir / 'tmp' / str(number),
                  maildir / 'new' / str(number))
    messages = amqp_client.wait_for_messages(50)
    assert sorted(int(m.body) for m in messages) == list(range(50))
    assert sorted(m.properties['application_headers']['X-Filename']
                  for m in messages) == sorted(str(n) for n in range(50))
    amqp_client.assert_no_message()
    wait_for(lambda: len(listing(maildir / 'cur')) == 50)
    assert listing(maildir / 'new') == []


def test_refused_publish_leaves_the_file_in_new_until_the_broker_takes_it(
        amqp_main, amqp_client, amqp_broker, amqp_vhost, maildir):
    amqp_client.expect_message_on('test.data')
    main = amqp_main(site_zcml(FAST_READFILES, maildir), workers=0)
    user = amqp_broker.username
    # No write permission: the broker refuses every publish (the commit
    # fails as it does when the broker is gone).
    amqp_broker._ctl('set_permissions', '-p', amqp_vhost, user,
                     '.*', '^$', '.*')
    try:
        deliver(maildir, 'foo.xml', b'contents')
        wait_for(lambda: main.log.count('it stays in new/') >= 2)
        assert listing(maildir / 'new') == ['foo.xml']
        assert listing(maildir / 'cur') == []
    finally:
        amqp_broker._ctl('set_permissions', '-p', amqp_vhost, user,
                         '.*', '.*', '.*')
    message = amqp_client.wait_for_message(timeout=30)
    assert message.body == b'contents'
    wait_for(lambda: listing(maildir / 'cur') == ['foo.xml'])
    amqp_client.assert_no_message()


def test_poison_files_go_to_failed_and_the_normal_files_after_them_arrive(
        amqp_main, amqp_client, maildir, tmp_path):
    amqp_client.expect_message_on('test.data')
    main = amqp_main(site_zcml(FAST_READFILES, maildir), workers=0,
                     amqp_extra='max_message_size 1KB')
    secret = tmp_path / 'secret'
    secret.write_bytes(b'secret outside the Maildir')
    poison = ['1-oversized', '3-link', '5-fifo', '7-directory']
    (maildir / 'tmp' / poison[0]).write_bytes(b'x' * 1025)
    os.rename(maildir / 'tmp' / poison[0], maildir / 'new' / poison[0])
    os.symlink(secret, maildir / 'new' / poison[1])
    os.mkfifo(maildir / 'new' / poison[2])
    os.mkdir(maildir / 'new' / poison[3])
    if os.geteuid() != 0:
        # Root reads any file; test_readfiles (unit) scans as nobody.
        poison.append('9-unreadable')
        deliver(maildir, poison[-1], b'unreadable')
        os.chmod(maildir / 'new' / poison[-1], 0)
    normal = ['2-normal', '4-normal', '6-normal', '8-normal', '9z-normal']
    for name in normal:
        deliver(maildir, name, name.encode())
    started = time.monotonic()
    messages = amqp_client.wait_for_messages(len(normal), timeout=10)
    assert time.monotonic() - started < 3  # a few poll intervals at most
    assert sorted(m.body for m in messages) == [n.encode() for n in normal]
    amqp_client.assert_no_message()
    wait_for(lambda: listing(maildir / 'failed') == sorted(poison))
    assert listing(maildir / 'cur') == normal
    assert listing(maildir / 'new') == []
    assert main.log.count('moved it to failed/') == len(poison)
    assert main.thread.is_alive()


def test_removed_new_directory_stops_the_process_with_status_1(
        amqp_main, maildir):
    main = amqp_main(site_zcml(FAST_READFILES, maildir), workers=0)
    shutil.rmtree(maildir / 'new')
    main.thread.join(30)
    assert not main.thread.is_alive()
    assert main.stop() == 1
    assert main.log.count('Unhandled exception, terminating.') == 1
    assert 'FileNotFoundError' in main.log


def test_shutdown_stops_the_reader_thread(amqp_main, maildir):
    main = amqp_main(site_zcml(README_READFILES, maildir), workers=0)
    wait_for(reader_threads)
    started = time.monotonic()
    assert main.stop() == 0
    assert time.monotonic() - started < 5
    assert not reader_threads()
    assert 'Stopped watching %s' % maildir in main.log
