"""The daemon end to end: main() in-process against the real broker."""
import threading
import time

import pytest
import zope.component

import gocept.amqprun.interfaces
from gocept.amqprun.tests.integration import handlers


def zcml(*names):
    """Site ZCML registering the named handlers of ``handlers``."""
    registrations = ''.join(
        '<utility component="gocept.amqprun.tests.integration.handlers.%s"'
        ' name="%s" />\n' % (name, name) for name in names)
    return ('<configure xmlns="http://namespaces.zope.org/zope">\n'
            '<include package="gocept.amqprun" />\n%s</configure>\n'
            % registrations)


@pytest.fixture(autouse=True)
def reset_handlers():
    handlers.reset()
    yield
    handlers.reset()


def test_reply_arrives_with_message_id_correlation_and_references(
        amqp_main, amqp_client):
    amqp_main(zcml('echo'))
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'hello', 'test.routing',
                             headers={'references': '<a@x>\n<b@x>'},
                             message_id='<orig@x>')
    reply = amqp_client.wait_for_message()
    assert reply.body == b'echo: hello'
    assert reply.properties['correlation_id'] == '<orig@x>'
    assert reply.properties['application_headers']['references'] == (
        '<a@x>\n<b@x>\n<orig@x>')
    assert reply.properties['message_id'].endswith('>')
    assert '.gocept.amqprun@' in reply.properties['message_id']
    assert reply.properties['delivery_mode'] == 2
    assert handlers.received == [('test.routing', b'hello')]


def test_handled_message_is_acked(amqp_main, amqp_client):
    main = amqp_main(zcml('echo'))
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'1', 'test.routing')
    amqp_client.wait_for_message()
    main.stop()
    assert amqp_client.queue_length('test.queue') == 0


def test_all_routing_keys_of_a_list_are_bound(amqp_main, amqp_client):
    amqp_main(zcml('multi'))
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'one', 'test.multi.1')
    amqp_client.send_message(b'two', 'test.multi.2')
    bodies = {m.body for m in amqp_client.wait_for_messages(2)}
    assert bodies == {b'one', b'two'}


def test_queue_arguments_keep_their_types(amqp_main, amqp_client):
    amqp_main(zcml('multi'))
    # Re-declaring with different argument types would be refused by the
    # broker (PRECONDITION_FAILED), so this succeeds only with int values.
    amqp_client.channel.queue_declare(
        'test.queue.multi', durable=True, auto_delete=False,
        arguments={'x-message-ttl': 60000, 'x-max-priority': 5})


def test_failing_handler_publishes_nothing_and_message_comes_back(
        amqp_main, amqp_client):
    handlers.failures_left[b'x'] = 2
    amqp_main(zcml('fail_then_reply'), worker_extra='retry-delay 0.1')
    amqp_client.expect_message_on('test.response')
    started = time.monotonic()
    amqp_client.send_message(b'x', 'test.fail')
    reply = amqp_client.wait_for_message()
    assert reply.body == b'x'
    assert time.monotonic() - started < 5
    assert handlers.received == [('test.fail', b'x')] * 3
    amqp_client.assert_no_message()


def test_failing_vote_of_another_data_manager_publishes_nothing(
        amqp_main, amqp_client):
    amqp_main(zcml('failing_vote'), worker_extra='retry-delay 0')
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'vote', 'test.vote')
    assert amqp_client.wait_for_message().body == b'vote'
    amqp_client.assert_no_message()
    assert len(handlers.received) == 2


def test_savepoints_are_supported(amqp_main, amqp_client):
    amqp_main(zcml('savepoint'))
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'sp', 'test.savepoint')
    assert amqp_client.wait_for_message().body == b'sp'


def test_workers_handle_messages_concurrently(amqp_main, amqp_client):
    amqp_main(zcml('sleep'), workers=10)
    amqp_client.expect_message_on('test.response')
    started = time.monotonic()
    for _ in range(10):
        amqp_client.send_message(b'1', 'test.sleep')
    amqp_client.wait_for_messages(10)
    assert time.monotonic() - started < 4


def handle_slow_then_quick(amqp_main, amqp_client, slow, commit_delay):
    """Two workers get a message sleeping ``slow`` seconds, then one that
    does not sleep; return the bodies of the replies in the order they
    arrived and what the daemon logged at its stop."""
    main = amqp_main(zcml('sleep'), workers=2,
                     amqp_extra='commit_delay %s' % commit_delay)
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(slow, 'test.sleep')
    amqp_client.send_message(b'0', 'test.sleep')
    replies = [reply.body for reply in amqp_client.wait_for_messages(2)]
    main.stop()
    return replies, main.log


def test_a_quick_handler_commits_together_with_one_begun_just_before(
        amqp_main, amqp_client):
    replies, log = handle_slow_then_quick(
        amqp_main, amqp_client, b'0.2', commit_delay=0.5)
    assert sorted(replies) == [b'0', b'0.2']
    assert 'Committed 2 op(s) in 1 AMQP transaction(s).' in log


def test_a_handler_slower_than_the_commit_delay_is_not_waited_for(
        amqp_main, amqp_client):
    replies, log = handle_slow_then_quick(
        amqp_main, amqp_client, b'1.5', commit_delay=0.3)
    assert replies == [b'0', b'1.5']
    assert 'Committed 2 op(s) in 2 AMQP transaction(s).' in log


def test_commit_delay_0_commits_each_handler_at_once(amqp_main, amqp_client):
    replies, log = handle_slow_then_quick(
        amqp_main, amqp_client, b'0.2', commit_delay=0)
    assert replies == [b'0', b'0.2']
    assert 'Committed 2 op(s) in 2 AMQP transaction(s).' in log


def test_prefetch_bounds_the_deliveries_held_in_memory(
        amqp_main, amqp_client):
    main = amqp_main(zcml('sleep'), workers=2)
    amqp_client.expect_message_on('test.response')
    for _ in range(20):
        amqp_client.send_message(b'0.2', 'test.sleep')
    time.sleep(1)
    # 2 workers -> prefetch 2: at most 2 unacked, the rest waits in the queue
    assert main.server.tasks.qsize() <= 2
    assert amqp_client.queue_length('test.queue.sleep') >= 10
    amqp_client.wait_for_messages(20, timeout=30)


def test_heartbeats_flow_while_a_handler_runs_longer(amqp_main, amqp_client):
    main = amqp_main(zcml('sleep'), workers=1,
                     amqp_extra='heartbeat_interval 1')
    connection = main.server.connection
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'4', 'test.sleep')
    assert amqp_client.wait_for_message(timeout=15).body == b'4'
    assert main.server.connection is connection
    assert handlers.received == [('test.sleep', b'4')]


def test_isender_inside_a_handler_joins_its_transaction(
        amqp_main, amqp_client):
    amqp_main(zcml('send_via_isender'))
    amqp_client.expect_message_on('test.response.*')
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'go', 'test.sender')
    bodies = sorted(m.body for m in amqp_client.wait_for_messages(2))
    assert bodies == [b'returned', b'via sender']


def test_settings_are_available_as_utility_and_on_the_handler(
        amqp_main, amqp_client):
    amqp_main(zcml('settings'),
              settings='test.SETTING.mixed Ümläuten und mehr')
    value = zope.component.getUtility(
        gocept.amqprun.interfaces.ISettings).get('test.SETTING.mixed')
    assert value == 'Ümläuten und mehr'
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'test.SETTING.mixed', 'test.settings')
    reply = amqp_client.wait_for_message()
    # A str body is sent UTF-8 encoded with content_encoding set, so the
    # client decodes it.
    assert reply.properties['content_encoding'] == 'utf-8'
    assert reply.body == 'Ümläuten und mehr'


def test_events_arrive_in_boot_order_and_sending_works_on_start(
        amqp_main, amqp_client):
    events = []

    def record(event):
        events.append(type(event).__name__)
        if gocept.amqprun.interfaces.IConfigFinished.providedBy(event):
            assert zope.component.queryUtility(
                gocept.amqprun.interfaces.ISender) is not None
        if gocept.amqprun.interfaces.IProcessStarted.providedBy(event):
            import transaction
            zope.component.getUtility(
                gocept.amqprun.interfaces.ISender).send(
                    handlers.reply(b'started'))
            transaction.commit()

    amqp_client.expect_message_on('test.response')
    gsm = zope.component.getGlobalSiteManager()
    for iface in (gocept.amqprun.interfaces.IConfigFinished,
                  gocept.amqprun.interfaces.IProcessStarted,
                  gocept.amqprun.interfaces.IProcessStopping):
        gsm.registerHandler(record, (iface,))
    main = amqp_main(zcml('echo'))
    assert amqp_client.wait_for_message().body == b'started'
    assert main.stop() == 0
    assert events == ['ConfigFinished', 'ProcessStarted', 'ProcessStopping']


def test_stop_lets_running_handlers_finish_and_commit(
        amqp_main, amqp_client):
    main = amqp_main(zcml('sleep'), workers=2)
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'1.5', 'test.sleep')
    amqp_client.send_message(b'1.5', 'test.sleep')
    time.sleep(0.5)
    stopper = threading.Thread(target=main.stop)
    stopper.start()
    assert len(amqp_client.wait_for_messages(2)) == 2
    stopper.join()
    assert main.exit_status == 0
    assert amqp_client.queue_length('test.queue.sleep') == 0
