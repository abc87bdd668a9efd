"""Tests for gocept.amqprun.server: the I/O thread's step methods.

The server is put into a "connected" state with FakeChannels (and, for
``start()``, a fake py-amqp connection class); no socket is opened. Its
wake-up pipe is the only file descriptor involved.
"""
import logging
import select
import threading
import time

import amqp.exceptions
import pytest
import transaction
import zope.component
import zope.interface.verify

import gocept.amqprun.datamanager
from gocept.amqprun.channelops import Commit
from gocept.amqprun.channelops import Reject
from gocept.amqprun.connection import Parameters
from gocept.amqprun.handler import Handler
from gocept.amqprun.interfaces import AccessRefused
from gocept.amqprun.interfaces import BrokerUnreachable
from gocept.amqprun.interfaces import CommitFailed
from gocept.amqprun.interfaces import ConfigurationError
from gocept.amqprun.interfaces import ConnectionLost
from gocept.amqprun.interfaces import IHandler
from gocept.amqprun.interfaces import ILoop
from gocept.amqprun.interfaces import ISender
from gocept.amqprun.interfaces import RecoverableError
from gocept.amqprun.message import Message
from gocept.amqprun.server import Delivery
from gocept.amqprun.connection import OpChannel
from gocept.amqprun.server import Server
from gocept.amqprun.server import describe
from gocept.amqprun.session import Session
from gocept.amqprun.tests.unit.fakes import FakeAMQPMessage
from gocept.amqprun.tests.unit.fakes import FakeChannel
from gocept.amqprun.tests.unit.fakes import close_server
from gocept.amqprun.tests.unit.fakes import outgoing_message
from gocept.amqprun.tests.unit.fakes import received_message


class FakeConnection:
    """The py-amqp connection as the server's loop sees it."""

    heartbeat = 0

    def __init__(self, close_error=None):
        self.close_error = close_error
        self.calls = []

    def close(self):
        self.calls.append('close')
        if self.close_error is not None:
            raise self.close_error

    def collect(self):
        self.calls.append('collect')


@pytest.fixture
def keep_thread_name():
    """start() names the calling thread; give the test thread its name back.
    """
    thread = threading.current_thread()
    name = thread.name
    yield
    thread.name = name


def make_server(**kw):
    kw.setdefault('prefetch_count', 2)
    return Server(Parameters(**kw))


@pytest.fixture
def server():
    """A server in the state of a connection of generation 1."""
    server = make_server()
    server.connection = FakeConnection()
    server._generation = 1
    server._channel = FakeChannel()
    server._send_channel = FakeChannel()
    yield server
    close_server(server)


@pytest.fixture
def unconnected():
    server = make_server()
    yield server
    close_server(server)


def resolved(op):
    return op._done.is_set()


def error_of(op):
    """The error ``op`` was resolved with (None for success)."""
    assert resolved(op), '%r was not resolved' % op
    try:
        op.wait(0)
    except Exception as error:
        return error
    return None


def delivered(tag, generation=1):
    return Delivery(generation, tag)


def reconnect(server):
    """Put the server into the state of its next connection."""
    server.connection = FakeConnection()
    server._generation += 1
    server._channel = FakeChannel()
    server._send_channel = FakeChannel()


class FakeEncodingChannel(FakeChannel):
    """Encodes the properties of a publish as py-amqp does on the wire."""

    def __init__(self):
        super().__init__()
        self.published = []

    def basic_publish(self, amqp_message, exchange, routing_key):
        amqp_message._serialize_properties()
        self.published.append(amqp_message.body)


# -- the interfaces and the any-thread API ----------------------------------

def test_server_provides_ILoop_and_ISender(unconnected):
    assert zope.interface.verify.verifyObject(ILoop, unconnected)
    assert zope.interface.verify.verifyObject(ISender, unconnected)


def test_server_is_not_running_before_start(unconnected):
    assert not unconnected.running
    assert unconnected.wait_until_running(0) is False


def test_submit_queues_the_op_and_wakes_the_loop(unconnected):
    op = Commit(None, [])
    unconnected.submit(op)
    assert list(unconnected._ops) == [op]
    readable, _, _ = select.select([unconnected._wake_r], [], [], 0)
    assert readable == [unconnected._wake_r]
    unconnected._drain_wake_pipe()
    assert select.select([unconnected._wake_r], [], [], 0)[0] == []


def test_every_submit_after_a_drain_wakes_the_loop_again(unconnected):
    for _ in range(3):
        unconnected.submit(Commit(None, []))
        assert select.select([unconnected._wake_r], [], [], 0)[0]
        unconnected._drain_wake_pipe()


def test_wake_survives_a_full_pipe(unconnected):
    for _ in range(100000 // 4096 + 50):
        unconnected._wake()
        unconnected._wake()
    unconnected._drain_wake_pipe()


def test_send_outside_handler_publishes_nothing_on_abort(unconnected):
    unconnected.send(outgoing_message())
    transaction.abort()
    assert list(unconnected._ops) == []


def test_send_outside_handler_publishes_on_send_channel_at_commit(server):
    message = outgoing_message()
    outcome = []

    def send_and_commit():
        try:
            server.send(message)
            transaction.commit()
            outcome.append('committed')
        except Exception as error:  # pragma: no cover (reported below)
            outcome.append(error)

    sender = threading.Thread(target=send_and_commit)
    sender.start()
    # Act as the I/O loop: wait for the wake-up, then carry the op out.
    assert select.select([server._wake_r], [], [], 10)[0]
    server._drain_wake_pipe()
    server._execute_ops()
    sender.join(10)
    assert outcome == ['committed']
    assert server._send_channel.names == ['basic_publish', 'tx_commit']
    assert server._channel.calls == []


def test_send_reuses_the_threads_session(unconnected):
    unconnected.send(outgoing_message(b'1'))
    unconnected.send(outgoing_message(b'2'))
    session = unconnected._local.session
    assert [m.body for m in session.messages] == [b'1', b'2']


def test_send_inside_handling_joins_the_handlers_session(unconnected):
    session = Session(unconnected, received_message())
    message = outgoing_message()
    with unconnected.handling(session) as handled:
        assert handled is session
        unconnected.send(message)
    assert session.messages == [message]
    assert getattr(unconnected._local, 'session', None) is None


def test_handling_restores_the_previous_session(unconnected):
    unconnected.send(outgoing_message(b'outside'))
    outside = unconnected._local.session
    with unconnected.handling(Session(unconnected)):
        pass
    assert unconnected._local.session is outside


def test_stop_sets_the_flag_and_wakes_the_loop(unconnected):
    unconnected.stop()
    assert unconnected._should_stop
    assert select.select([unconnected._wake_r], [], [], 0)[0]


# -- deliveries ---------------------------------------------------------------

def test_on_delivery_puts_a_task_with_the_message(server):
    handler = Handler('queue', 'routing', lambda m: None)
    amqp_message = FakeAMQPMessage(
        b'body', dict(delivery_tag=7, routing_key='route.ü',
                      redelivered=True, exchange='amq.topic'),
        dict(message_id='<id@x>', content_type='text/plain',
             application_headers={'references': '<a@x>'}))
    server.on_delivery(amqp_message, handler, 'name', 1)
    task = server.tasks.get_nowait()
    assert task.handler is handler
    assert task.handler_name == 'name'
    message = task.message
    assert isinstance(message.body, bytes)
    assert message.body == b'body'
    assert isinstance(message.routing_key, str)
    assert message.routing_key == 'route.ü'
    assert message.delivery_tag == 7
    assert message.redelivered is True
    assert message.exchange == 'amq.topic'
    assert message.header.message_id == '<id@x>'
    assert message.header.content_type == 'text/plain'
    assert message.header.headers == {'references': '<a@x>'}
    assert message.delivery.generation == 1
    assert message.delivery.tag == 7


def test_on_delivery_without_exchange_and_redelivered(server):
    handler = Handler('queue', 'routing', lambda m: None)
    server.on_delivery(FakeAMQPMessage(
        b'', dict(delivery_tag=1, routing_key='route')), handler, 'n', 1)
    message = server.tasks.get_nowait().message
    assert message.redelivered is False
    assert message.exchange == 'amq.topic'
    assert message.header.headers is None


def test_consume_callback_keeps_the_generation_it_was_made_in(server):
    handler = Handler('queue', 'routing', lambda m: None)
    callback = server._on_delivery_callback(handler, 'name')
    server._generation = 2
    callback(FakeAMQPMessage(b'', dict(delivery_tag=1, routing_key='r')))
    assert server.tasks.get_nowait().message.delivery.generation == 1


# -- executing ops: group commit ---------------------------------------------

def test_several_commits_on_one_channel_share_one_tx_commit(server):
    reply_1, reply_2 = outgoing_message(b'1'), outgoing_message(b'2')
    ops = [Commit(delivered(1), [reply_1]),
           Commit(delivered(2), [reply_2]),
           Commit(delivered(3), [])]
    for op in ops:
        server.submit(op)
    server._execute_ops()
    channel = server._channel
    assert channel.names == [
        'basic_ack', 'basic_publish', 'basic_ack', 'basic_publish',
        'basic_ack', 'tx_commit']
    assert [call[1] for call in channel.calls
            if call[0] == 'basic_ack'] == [1, 2, 3]
    assert [error_of(op) for op in ops] == [None, None, None]
    assert server._send_channel.calls == []
    assert list(server._ops) == []


def test_ops_of_both_channels_are_committed_once_per_channel(server):
    ack, send = Commit(delivered(1), []), Commit(None, [outgoing_message()])
    server.submit(ack)
    server.submit(send)
    server._execute_ops()
    assert server._channel.names == ['basic_ack', 'tx_commit']
    assert server._send_channel.names == ['basic_publish', 'tx_commit']
    assert error_of(ack) is None
    assert error_of(send) is None


def test_execute_ops_without_ops_commits_nothing(server):
    server._execute_ops()
    assert server._channel.calls == []
    assert server._send_channel.calls == []


def test_published_message_carries_body_properties_and_routing(server):
    message = Message(dict(message_id='<id@x>', timestamp=12, foo='bar'),
                      b'body', routing_key='route', exchange='ex')
    server.submit(Commit(None, [message]))
    server._execute_ops()
    [publish, commit] = server._send_channel.calls
    assert publish == (
        'basic_publish', b'body',
        dict(message_id='<id@x>', timestamp=12, delivery_mode=2,
             application_headers={'foo': 'bar'}),
        'ex', 'route')


def test_op_with_stale_generation_fails_with_ConnectionLost(server):
    stale = Commit(delivered(1, generation=0), [outgoing_message()])
    reject = Reject(delivered(2, generation=0))
    server.submit(stale)
    server.submit(reject)
    server._execute_ops()
    assert isinstance(error_of(stale), ConnectionLost)
    assert isinstance(error_of(reject), ConnectionLost)
    assert server._channel.calls == []
    assert server._send_channel.calls == []


def test_stale_op_does_not_disturb_current_ones(server):
    stale, current = Commit(delivered(1, 0), []), Commit(delivered(2), [])
    server.submit(stale)
    server.submit(current)
    server._execute_ops()
    assert isinstance(error_of(stale), ConnectionLost)
    assert error_of(current) is None
    assert server._channel.calls == [('basic_ack', 2), ('tx_commit',)]


@pytest.mark.parametrize('error', [
    ConnectionResetError('reset'),
    amqp.exceptions.RecoverableConnectionError('connection gone'),
    amqp.exceptions.PreconditionFailed('unknown delivery tag'),
], ids=['socket', 'connection', 'channel'])
def test_failed_tx_commit_fails_every_op_of_the_batch(error):
    server = make_server()
    try:
        server._generation = 1
        server._channel = FakeChannel(tx_commit=error)
        ops = [Commit(delivered(1), [outgoing_message()]),
               Commit(delivered(2), []),
               Reject(delivered(3))]
        with pytest.raises(type(error)):
            server._commit_batch(server._channel, ops)
        errors = [error_of(op) for op in ops]
        assert all(isinstance(e, CommitFailed) for e in errors)
        assert len({id(e) for e in errors}) == 1
    finally:
        close_server(server)


def test_connection_error_during_execute_fails_the_batch_uncommitted(
        server):
    server._channel.fail['basic_publish'] = BrokenPipeError('pipe')
    first = Commit(delivered(1), [outgoing_message()])
    second = Commit(delivered(2), [])
    with pytest.raises(BrokenPipeError):
        server._commit_batch(server._channel, [first, second])
    assert isinstance(error_of(first), RecoverableError)
    assert isinstance(error_of(second), RecoverableError)
    assert 'tx_commit' not in server._channel.names


def test_ops_on_the_other_channel_are_not_left_hanging(server):
    # The send channel's batch comes first and fails; the ack waits in the
    # consume channel's batch.
    server._send_channel.fail['tx_commit'] = ConnectionResetError('reset')
    send = Commit(None, [outgoing_message()])
    ack = Commit(delivered(1), [])
    server.submit(send)
    server.submit(ack)
    with pytest.raises(ConnectionResetError):
        server._execute_ops()
    server._lose_connection(ConnectionResetError('reset'))  # as _run does
    assert isinstance(error_of(send), RecoverableError)
    assert isinstance(error_of(ack), RecoverableError)
    assert server._channel is None


def test_sends_on_the_other_channel_wait_for_the_next_connection(server):
    server._channel.fail['tx_commit'] = ConnectionResetError('reset')
    ack = Commit(delivered(1), [])
    send = Commit(None, [outgoing_message()])
    server.submit(ack)
    server.submit(send)
    with pytest.raises(ConnectionResetError):
        server._execute_ops()
    server._lose_connection(ConnectionResetError('reset'))
    assert isinstance(error_of(ack), CommitFailed)
    assert not resolved(send)
    reconnect(server)
    server._execute_ops()
    assert error_of(send) is None
    assert server._send_channel.names == ['basic_publish', 'tx_commit']


def test_unpublishable_message_fails_alone_and_the_rest_commits(server):
    good = Commit(delivered(1), [outgoing_message(b'good')])
    bad = Commit(delivered(2), [Message(dict(timestamp='yesterday'), b'')])
    server._commit_batch(server._channel, [good, bad])
    assert isinstance(error_of(bad), CommitFailed)
    assert error_of(good) is None
    names = server._channel.names
    assert names[-1] == 'tx_commit'
    assert 'tx_rollback' in names
    after_rollback = server._channel.calls[names.index('tx_rollback') + 1:]
    assert [call[0] for call in after_rollback] == [
        'basic_ack', 'basic_publish', 'tx_commit']
    assert after_rollback[0] == ('basic_ack', 1)


def test_message_with_unencodable_header_fails_alone(server):
    good = Commit(None, [outgoing_message(b'good')])
    bad = Commit(None, [outgoing_message(b'bad', custom=object())])
    channel = FakeEncodingChannel()
    server._commit_batch(channel, [bad, good])
    assert isinstance(error_of(bad), CommitFailed)
    assert error_of(good) is None
    assert channel.published == [b'good']


def test_message_of_a_failed_commit_is_not_published_later(
        server, monkeypatch):
    monkeypatch.setattr(gocept.amqprun.datamanager, 'COMMIT_TIMEOUT', 0)
    server.send(outgoing_message())
    with pytest.raises(CommitFailed):
        transaction.commit()
    server._execute_ops()  # the I/O thread gets to it afterwards
    assert server._send_channel.calls == []


# -- delayed ops --------------------------------------------------------------

def test_delayed_reject_is_not_executed_before_its_time(server):
    op = Reject(delivered(1), delay=60, now=time.time())
    server.submit(op)
    server._execute_ops()
    assert server._channel.calls == []
    assert not resolved(op)
    assert list(server._ops) == []
    server._execute_ops()
    assert server._channel.calls == []


def test_delayed_reject_is_executed_once_due(server):
    op = Reject(delivered(1), delay=5, now=time.time() - 10)
    server.submit(op)
    server._execute_ops()
    assert server._channel.calls == [
        ('basic_reject', 1, True), ('tx_commit',)]
    assert error_of(op) is None


def test_delayed_reject_waits_while_later_ops_pass_it(server):
    delayed = Reject(delivered(1), delay=60, now=time.time())
    commit = Commit(delivered(2), [])
    server.submit(delayed)
    server.submit(commit)
    server._execute_ops()
    assert server._channel.calls == [('basic_ack', 2), ('tx_commit',)]
    assert not resolved(delayed)


def test_due_delayed_ops_run_in_order_of_their_time(server):
    now = time.time()
    later = Reject(delivered(1), delay=60, now=now - 100)
    sooner = Reject(delivered(2), delay=60, now=now - 110)
    server._delayed = []
    server.submit(later)
    server.submit(Reject(delivered(3), delay=600, now=now))
    server._execute_ops()
    server.submit(sooner)
    server._execute_ops()
    tags = [call[1] for call in server._channel.calls
            if call[0] == 'basic_reject']
    assert tags == [1, 2]
    assert len(server._delayed) == 1


def test_poll_timeout_is_zero_with_pending_ops(server):
    server.submit(Commit(None, []))
    assert server._poll_timeout() == 0


def test_poll_timeout_is_poll_interval_when_idle(server):
    assert server._poll_timeout() == server.poll_interval


def test_poll_timeout_follows_the_heartbeat(server):
    server.connection.heartbeat = 2
    assert server._poll_timeout() == 0.5


def test_poll_timeout_wakes_up_for_the_next_delayed_op(server):
    server.submit(Reject(delivered(1), delay=0.3, now=time.time()))
    server._execute_ops()
    assert 0 < server._poll_timeout() <= 0.3


# -- declaring and consuming --------------------------------------------------

def register(name, queue, routing_key, arguments=None):
    handler = Handler(queue, routing_key, lambda m: None,
                      arguments=arguments)
    zope.component.provideUtility(handler, IHandler, name=name)
    return handler


def test_declare_and_consume_binds_and_consumes_every_handler(
        server, registry):
    register('one', 'queue.1', ['a', 'b'], {'x-message-ttl': 60000})
    register('two', 'queue.2', 'c')
    server._declare_and_consume()
    calls = server._channel.calls
    assert ('queue_declare', ('arguments', {'x-message-ttl': 60000}),
            ('auto_delete', False), ('durable', True), ('exclusive', False),
            ('queue', 'queue.1')) in calls
    assert ('queue_bind', ('exchange', 'amq.topic'), ('queue', 'queue.1'),
            ('routing_key', 'a')) in calls
    assert ('queue_bind', ('exchange', 'amq.topic'), ('queue', 'queue.1'),
            ('routing_key', 'b')) in calls
    assert ('queue_bind', ('exchange', 'amq.topic'), ('queue', 'queue.2'),
            ('routing_key', 'c')) in calls
    names = server._channel.names
    assert names.index('tx_commit') > names.index('queue_bind')
    assert ('basic_qos', 0, 2, False) in calls
    assert names.index('basic_qos') < names.index('basic_consume')
    assert sorted(call[1] for call in calls
                  if call[0] == 'basic_consume') == ['queue.1', 'queue.2']
    assert server.consuming
    assert sorted(server._consumer_tags) == ['ctag1', 'ctag2']


def test_consumer_callback_queues_tasks_for_its_handler(server, registry):
    handler = register('one', 'queue.1', 'a')
    server._declare_and_consume()
    [callback] = server._channel.callbacks.values()
    callback(FakeAMQPMessage(b'x', dict(delivery_tag=1, routing_key='a')))
    task = server.tasks.get_nowait()
    assert task.handler is handler
    assert task.handler_name == 'one'


def test_declare_without_handlers_does_not_consume(server, registry):
    server._declare_and_consume()
    assert server._channel.names == ['tx_commit']
    assert not server.consuming


def test_declare_after_stop_consuming_does_not_consume(server, registry):
    register('one', 'queue.1', 'a')
    server._stop_consuming = True
    server._declare_and_consume()
    assert 'basic_consume' not in server._channel.names
    assert 'queue_declare' in server._channel.names


def test_two_handlers_on_one_queue_are_a_configuration_error(
        server, registry):
    register('one', 'queue', 'a')
    register('two', 'queue', 'b')
    with pytest.raises(ConfigurationError, match="'queue'"):
        server._declare_and_consume()
    assert server._channel.calls == []


def test_stop_consuming_cancels_every_consumer(server, registry):
    register('one', 'queue.1', 'a')
    register('two', 'queue.2', 'b')
    server._declare_and_consume()
    server._cancel_consumers_if_asked()
    assert 'basic_cancel' not in server._channel.names
    server.stop_consuming()
    server._cancel_consumers_if_asked()
    assert sorted(call[1] for call in server._channel.calls
                  if call[0] == 'basic_cancel') == ['ctag1', 'ctag2']
    assert not server.consuming
    server._cancel_consumers_if_asked()
    assert server._channel.names.count('basic_cancel') == 2


# -- losing the connection ----------------------------------------------------

def test_lost_connection_fails_pending_and_delayed_ops(server):
    server._running.set()
    server.consuming = True
    connection = server.connection
    pending = Commit(delivered(1), [])
    delayed = Reject(delivered(2), delay=60, now=time.time())
    server.submit(delayed)
    server._execute_ops()
    server.submit(pending)
    server._lose_connection(ConnectionResetError('reset'))
    assert isinstance(error_of(pending), ConnectionLost)
    assert isinstance(error_of(delayed), ConnectionLost)
    assert not server.running
    assert not server.consuming
    assert connection.calls in (['close'], ['collect'])
    assert server.connection is None
    assert server._channel is None and server._send_channel is None


def test_lost_connection_keeps_sends_for_the_next_connection(server):
    send = Commit(None, [outgoing_message()])
    server.submit(send)
    server._lose_connection(ConnectionResetError('reset'))
    assert not resolved(send)
    reconnect(server)
    server._execute_ops()
    assert error_of(send) is None


def test_lost_connection_drops_queued_deliveries_but_not_stop_signals(
        server):
    handler = Handler('queue', 'routing', lambda m: None)
    server.on_delivery(FakeAMQPMessage(
        b'', dict(delivery_tag=1, routing_key='r')), handler, 'n', 1)
    stop = object()
    server.tasks.put(stop)
    server._lose_connection(ConnectionResetError('reset'))
    assert server.tasks.get_nowait() is stop
    assert server.tasks.empty()


def test_stopped_server_fails_everything_pending(fake_amqp, keep_thread_name):
    server = make_server()
    send = Commit(None, [outgoing_message()])
    reject = Reject(delivered(1), delay=60, now=time.time())
    server.submit(send)
    server.submit(reject)
    try:
        server.stop()
        server.start()
    finally:
        close_server(server)
    assert isinstance(error_of(send), ConnectionLost)
    assert isinstance(error_of(reject), ConnectionLost)


def test_disconnect_collects_a_connection_that_cannot_close(server):
    connection = server.connection = FakeConnection(
        close_error=OSError('broken'))
    server._disconnect()
    assert connection.calls == ['close', 'collect']


def test_disconnect_without_connection_does_nothing(unconnected):
    unconnected._disconnect()
    assert unconnected.connection is None


# -- start(): connecting ------------------------------------------------------

def test_connect_opens_consume_and_send_channels_in_tx_mode(
        fake_amqp, registry):
    server = make_server(hostname='broker', port=1234, username='user',
                         password='secret', virtual_host='vhost',
                         heartbeat_interval=30)
    try:
        server._connect()
        [connection] = fake_amqp.instances
        assert connection.kw == dict(
            host='broker:1234', userid='user', password='secret',
            virtual_host='vhost', heartbeat=30, connect_timeout=10.0,
            ssl=False)
        consume, send = connection.channels
        assert server._channel is consume
        assert server._send_channel is send
        for channel in (consume, send):
            assert channel.calls[0] == ('tx_select',)
            assert channel.auto_decode is False
        assert server._generation == 1
    finally:
        close_server(server)


def test_connect_without_setup_handlers_declares_nothing(fake_amqp,
                                                         registry):
    register('one', 'queue.1', 'a')
    server = Server(Parameters(), setup_handlers=False)
    try:
        server._connect()
        consume, send = fake_amqp.instances[0].channels
        assert consume.names == ['tx_select']
    finally:
        close_server(server)


def test_each_connect_is_a_new_generation(fake_amqp, registry):
    server = make_server()
    try:
        server._connect()
        server._disconnect()
        server._connect()
        assert server._generation == 2
        assert fake_amqp.instances[0].calls[-1] in ('close', 'collect')
    finally:
        close_server(server)


def test_start_gives_up_after_the_startup_attempts(
        fake_amqp, registry, keep_thread_name, caplog):
    fake_amqp.connect_errors = [ConnectionRefusedError('refused')] * 3
    server = make_server(hostname='broker', startup_attempts=3,
                         reconnect_delay=0)
    pending = Commit(None, [])
    server.submit(pending)
    try:
        with caplog.at_level(logging.WARNING, 'gocept.amqprun.server'):
            server.start()
    finally:
        close_server(server)
    assert isinstance(server.error, BrokerUnreachable)
    assert 'broker:5672' in str(server.error)
    assert 'gave up after 3 attempts' in str(server.error)
    assert len(fake_amqp.instances) == 3
    assert not server.running
    assert isinstance(error_of(pending), ConnectionLost)
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1
    assert threading.current_thread().name == 'amqprun-io'


def test_start_stops_at_once_when_the_broker_refuses_access(
        fake_amqp, registry, keep_thread_name):
    fake_amqp.connect_errors = [
        amqp.exceptions.AccessRefused('ACCESS_REFUSED')]
    server = make_server(username='user', virtual_host='vhost')
    try:
        server.start()
    finally:
        close_server(server)
    assert isinstance(server.error, AccessRefused)
    assert "'user'" in str(server.error)
    assert "'vhost'" in str(server.error)
    assert len(fake_amqp.instances) == 1


def test_start_after_stop_returns_at_once(fake_amqp, keep_thread_name):
    server = make_server()
    try:
        server.stop()
        server.start()
    finally:
        close_server(server)
    assert fake_amqp.instances == []
    assert server.error is None


# -- OpChannel and describe ---------------------------------------------------

def test_op_channel_publishes_empty_body_for_none():
    channel = FakeChannel()
    OpChannel(channel).publish(Message(dict(message_id='id'), None))
    [call] = channel.calls
    assert call[1] == b''
    assert call[3:] == ('amq.topic', '')


def test_op_channel_passes_ack_and_reject_through():
    channel = FakeChannel()
    op_channel = OpChannel(channel)
    op_channel.basic_ack(3)
    op_channel.basic_reject(4, True)
    assert channel.calls == [('basic_ack', 3), ('basic_reject', 4, True)]


def test_describe_names_the_error_class_once():
    assert describe(ConnectionRefusedError('refused')) == (
        'ConnectionRefusedError: refused')
    assert describe(EOFError()) == 'EOFError'
    assert describe(amqp.exceptions.RecoverableConnectionError(
        'RecoverableConnectionError: gone')) == (
        'RecoverableConnectionError: gone')
