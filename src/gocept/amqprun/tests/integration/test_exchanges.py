"""Handlers on direct, fanout and headers exchanges declared from ZCML,
against the real broker.

One daemon (``main()`` in-process) serves the routing tests of this module;
what reached which handler is counted from the replies they send to the
fanout exchange ``REPLIES``. The broker restart and the bad-input cases run
the ``server`` script as an operator does.
"""
import os

import pytest

import gocept.amqprun.testing
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.integration.exchanges_handlers import REPLIES
from gocept.amqprun.tests.integration.exchanges_handlers import REPORT
from gocept.amqprun.tests.integration.test_faults import FAST_RECONNECT
from gocept.amqprun.tests.integration.test_process import server
from gocept.amqprun.tests.integration.test_process import write
from gocept.amqprun.xmlheader import header_filename
from gocept.amqprun.xmlheader import is_header_file
from gocept.amqprun.xmlheader import loads


HANDLERS = 'gocept.amqprun.tests.integration.exchanges_handlers.'

SITE_ZCML = '''\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:amqp="http://namespaces.gocept.com/amqp">
  <include package="gocept.amqprun" />

  <amqp:exchange name="test.orders" type="direct" />
  <amqp:exchange name="test.invalidations" type="fanout" />
  <amqp:exchange name="test.documents" type="headers" />
  <amqp:exchange name="test.replies" type="fanout" />

  <utility component="${handlers}orders" name="orders" />
  <utility component="${handlers}invalidate_a" name="invalidate_a" />
  <utility component="${handlers}invalidate_b" name="invalidate_b" />
  <utility component="${handlers}all_of" name="all_of" />
  <utility component="${handlers}any_of" name="any_of" />

  <amqp:writefiles
    routing_key="invoice"
    queue_name="test.exchanges.files"
    directory="${output}"
    exchange="test.orders"
    />

  <amqp:readfiles
    directory="${maildir}"
    routing_key="ignored.by.fanout"
    exchange="test.invalidations"
    poll_interval="0.1"
    />
</configure>
'''


@pytest.fixture(scope='module')
def directories(tmp_path_factory):
    """(config directory, writefiles output, readfiles Maildir)."""
    root = tmp_path_factory.mktemp('exchanges')
    return root, root / 'output', root / 'maildir'


@pytest.fixture(scope='module')
def daemon(amqp_broker, amqp_vhost, directories):
    """The module's daemon, ``main()`` in a thread."""
    root, output, maildir = directories
    gocept.amqprun.testing.reset_registry()
    config = gocept.amqprun.testing.make_config(
        str(root), amqp_broker, amqp_vhost, SITE_ZCML, handlers=HANDLERS,
        output=output, maildir=maildir, amqp_extra='\n  '.join(FAST_RECONNECT))
    runner = gocept.amqprun.testing.MainThread(
        config, log_path=gocept.amqprun.testing.log_path_of(config, {}))
    runner.start()
    yield runner
    assert runner.stop() == 0
    gocept.amqprun.testing.reset_registry()


@pytest.fixture
def replies(daemon, amqp_client):
    """The test's client, receiving every reply of the handlers."""
    amqp_client.expect_message_on('', exchange=REPLIES)
    return amqp_client


def received(client, count):
    """The bodies of the next ``count`` replies, sorted."""
    return sorted(message.body for message in
                  client.wait_for_messages(count))


def assert_nothing_more(daemon, client):
    """Once every handler is done, no further reply is on the broker."""
    daemon.wait_for_processing()
    message = client.channel.basic_get(client.receive_queue, no_ack=True)
    assert message is None, 'Unexpected reply: %r' % message.body


def test_direct_exchange_delivers_only_the_matching_key(daemon, replies):
    replies.send_message(b'old', 'order.old', exchange='test.orders')
    replies.send_message(b'new', 'order.new', exchange='test.orders')
    assert received(replies, 1) == [b'orders: new']
    assert_nothing_more(daemon, replies)


def test_handler_replies_to_another_exchange_correlated(daemon, replies):
    replies.send_message(b'new', 'order.new', exchange='test.orders',
                         message_id='<order@test>')
    (reply,) = replies.wait_for_messages(1)
    assert reply.delivery_info['exchange'] == REPLIES
    assert reply.delivery_info['routing_key'] == 'orders'
    assert reply.properties['correlation_id'] == '<order@test>'


def test_fanout_exchange_reaches_both_handler_queues(daemon, replies):
    replies.send_message(b'cache', 'whatever', exchange='test.invalidations')
    assert received(replies, 2) == [
        b'invalidate_a: cache', b'invalidate_b: cache']
    assert_nothing_more(daemon, replies)


def test_headers_exchange_matches_all_or_any_of_the_binding_headers(
        daemon, replies):
    replies.send_message(b'both', headers=REPORT, exchange='test.documents')
    replies.send_message(b'pdf', headers={'format': 'pdf'},
                         exchange='test.documents')
    replies.send_message(b'text', headers={'format': 'txt'},
                         exchange='test.documents')
    assert received(replies, 3) == [
        b'all_of: both', b'any_of: both', b'any_of: pdf']
    assert_nothing_more(daemon, replies)


def test_writefiles_on_a_direct_exchange_stores_only_its_key(
        daemon, amqp_client, directories):
    _, output, _ = directories
    amqp_client.send_message(b'draft', 'invoice.draft',
                             exchange='test.orders')
    amqp_client.send_message(b'<invoice/>', 'invoice',
                             exchange='test.orders')
    wait_for(lambda: output.exists() and len(os.listdir(output)) == 2)
    daemon.wait_for_processing()
    (body,) = [name for name in os.listdir(output)
               if not is_header_file(name)]
    assert body.startswith('invoice-')
    assert (output / body).read_bytes() == b'<invoice/>'
    assert loads((output / header_filename(body)).read_bytes()).message_id


def test_readfiles_publishes_to_a_fanout_exchange(
        daemon, replies, directories):
    _, _, maildir = directories
    (maildir / 'tmp' / 'flush').write_bytes(b'all caches')
    os.rename(maildir / 'tmp' / 'flush', maildir / 'new' / 'flush')
    assert received(replies, 2) == [
        b'invalidate_a: all caches', b'invalidate_b: all caches']
    wait_for(lambda: os.listdir(maildir / 'cur') == ['flush'])
    assert_nothing_more(daemon, replies)


# -- as an operator runs it ---------------------------------------------------

def one_critical_line(result):
    """The only CRITICAL line of a ``server`` run (fails if there are more).
    """
    critical = [line for line in result.stdout.splitlines()
                if 'CRITICAL' in line]
    assert len(critical) == 1, result.stdout
    return critical[0]


def test_handler_bound_to_a_missing_exchange_is_one_critical_line(
        tmp_path, amqp_broker, amqp_vhost):
    config = write(tmp_path, '''
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="gocept.amqprun" />
  <utility component="%sbound_to_a_missing_exchange" name="missing" />
</configure>''' % HANDLERS, amqp_broker, amqp_vhost)
    result = server(config)
    assert result.returncode == 1
    line = one_critical_line(result)
    assert ("The broker refused the binding of queue 'test.exchanges.missing'"
            " to exchange 'test.missing': ") in line
    assert "NOT_FOUND - no exchange 'test.missing'" in line


def test_exchange_existing_with_another_type_is_one_critical_line(
        tmp_path, amqp_broker, amqp_vhost, amqp_client):
    amqp_client.channel.exchange_declare(
        'test.clash', 'fanout', durable=True, auto_delete=False)
    config = write(tmp_path, '''
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:amqp="http://namespaces.gocept.com/amqp">
  <include package="gocept.amqprun" />
  <amqp:exchange name="test.clash" type="direct" />
</configure>''', amqp_broker, amqp_vhost)
    result = server(config)
    assert result.returncode == 1
    line = one_critical_line(result)
    assert "The broker refused exchange 'test.clash': " in line
    assert "inequivalent arg 'type'" in line
    assert "received 'direct' but current is 'fanout'" in line


TRANSIENT_ZCML = '''\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:amqp="http://namespaces.gocept.com/amqp">
  <include package="gocept.amqprun" />
  <amqp:exchange name="test.transient" type="topic" durable="false" />
  <utility component="${handlers}transient" name="transient" />
</configure>
'''


def test_broker_restart_redeclares_the_exchange_and_restores_the_binding(
        restartable_broker, tmp_path):  # noqa: F811 (the fixture)
    broker, vhost = restartable_broker
    config = gocept.amqprun.testing.make_config(
        str(tmp_path), broker, vhost, TRANSIENT_ZCML, handlers=HANDLERS,
        log_path='STDOUT', amqp_extra='\n  '.join(FAST_RECONNECT))
    process = gocept.amqprun.testing.ServerProcess(config)
    try:
        process.start(wait=True)
        broker.node.restart()  # a transient exchange does not survive it
        # "Consuming" is logged once the queue is bound again.
        wait_for(lambda: process.output.count('Consuming 1 queue') == 2,
                 timeout=60, message=process.output)
        assert process.output.count(
            "Declared exchange 'test.transient' (topic)") == 2
        client = gocept.amqprun.testing.Client(broker, vhost)
        try:
            client.expect_message_on('test.transient.reply')
            client.send_message(b'back', 'transient.x',
                                exchange='test.transient')
            assert client.wait_for_message().body == b'transient: back'
        finally:
            client.close()
        assert process.stop() == 0
    finally:
        process.kill()
