"""Tests for gocept.amqprun.server: the I/O thread's step methods.

The server is put into a "connected" state with FakeChannels (and, for
``start()``, a fake py-amqp connection class); no socket is opened. Its
wake-up pipe is the only file descriptor involved.
"""
import logging
import os
import select
import socket
import ssl
import threading
import time

import amqp.exceptions
import amqp.spec
import pytest
import transaction
import zope.component
import zope.interface.verify

import gocept.amqprun.datamanager
import gocept.amqprun.topology
from gocept.amqprun.channelops import Commit
from gocept.amqprun.channelops import Reject
from gocept.amqprun.connection import Parameters
from gocept.amqprun.handler import Handler
from gocept.amqprun.interfaces import AccessRefused
from gocept.amqprun.interfaces import BrokerUnreachable
from gocept.amqprun.interfaces import CommitFailed
from gocept.amqprun.interfaces import ConfigurationError
from gocept.amqprun.interfaces import ConnectionLost
from gocept.amqprun.interfaces import DeclareRefused
from gocept.amqprun.interfaces import IExchange
from gocept.amqprun.interfaces import IHandler
from gocept.amqprun.interfaces import ILoop
from gocept.amqprun.interfaces import ISender
from gocept.amqprun.interfaces import IServer
from gocept.amqprun.interfaces import QueueUnavailable
from gocept.amqprun.interfaces import RecoverableError
from gocept.amqprun.interfaces import TLSError
from gocept.amqprun.server import Delivery
from gocept.amqprun.server import Server
from gocept.amqprun.session import Session
from gocept.amqprun.tests.unit.fakes import FakeAMQPMessage
from gocept.amqprun.tests.unit.fakes import FakeBroker
from gocept.amqprun.tests.unit.fakes import FakeChannel
from gocept.amqprun.tests.unit.fakes import FakeServer
from gocept.amqprun.tests.unit.fakes import FakeTransport
from gocept.amqprun.tests.unit.fakes import close_server
from gocept.amqprun.tests.unit.fakes import error_of
from gocept.amqprun.tests.unit.fakes import outgoing_message
from gocept.amqprun.tests.unit.fakes import received_message
from gocept.amqprun.tests.unit.fakes import resolved
from gocept.amqprun.topology import Exchange


class FakeConnection:
    """The py-amqp connection as the server's loop sees it."""

    heartbeat = 0

    def __init__(self, close_error=None):
        self.close_error = close_error
        self.calls = []
        self.transport = FakeTransport()

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
    server.history.connected()
    server._channel = FakeChannel()
    server._send_channel = FakeChannel()
    server._scratch = FakeBroker().scratch()
    yield server
    close_server(server)


@pytest.fixture
def unconnected():
    server = make_server()
    yield server
    close_server(server)


def delivered(tag, generation=1):
    return Delivery(generation, tag)


def reconnect(server):
    """Put the server into the state of its next connection."""
    server.connection = FakeConnection()
    server.history.connected()
    server._channel = FakeChannel()
    server._send_channel = FakeChannel()
    server._scratch = FakeBroker().scratch()


# -- the interfaces and the any-thread API ----------------------------------

def test_server_provides_ILoop_and_ISender(unconnected):
    assert zope.interface.verify.verifyObject(ILoop, unconnected)
    assert zope.interface.verify.verifyObject(ISender, unconnected)
    assert zope.interface.verify.verifyObject(IServer, unconnected)


def test_fake_server_provides_IServer_like_the_real_one():
    assert zope.interface.verify.verifyObject(IServer, FakeServer())


def test_server_is_not_running_before_start(unconnected):
    assert not unconnected.running
    assert unconnected.wait_until_running(0) is False


def test_submit_queues_the_op_and_wakes_the_loop(unconnected):
    op = Commit(None, [])
    unconnected.submit(op)
    assert list(unconnected.commits._ops) == [op]
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
        unconnected._wake_pending = False  # as if racing wake-ups
        unconnected._wake()
        unconnected._wake()
    unconnected._drain_wake_pipe()


def test_wake_ups_before_a_drain_write_one_byte(unconnected):
    for _ in range(3):
        unconnected.submit(Commit(None, []))
    assert os.read(unconnected._wake_r, 4096) == b'!'


def test_submit_between_drain_read_and_commit_is_seen_by_the_next_pass(
        unconnected):
    # The loop drains the pipe, then looks at the op queue: an op submitted
    # before the drain finished must not wait for the poll timeout.
    unconnected.submit(Commit(None, []))
    os.read(unconnected._wake_r, 4096)  # the loop's read ...
    late = Commit(None, [])
    unconnected.submit(late)  # ... a worker's submit, no write needed ...
    unconnected._wake_pending = False  # ... the rest of the drain
    assert unconnected.commits.poll_timeout(1.0) == 0
    assert late in unconnected.commits._ops


def test_submit_after_the_drain_wakes_the_loop(unconnected):
    unconnected.submit(Commit(None, []))
    unconnected._drain_wake_pipe()
    unconnected.submit(Commit(None, []))
    assert select.select([unconnected._wake_r], [], [], 0)[0]


def test_send_outside_handler_publishes_nothing_on_abort(unconnected):
    unconnected.send(outgoing_message())
    transaction.abort()
    assert list(unconnected.commits._ops) == []


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
    server._commit_due()
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


def deliver(server, tag):
    """Have the server receive a message with delivery ``tag``; return its
    Delivery."""
    server.on_delivery(FakeAMQPMessage(
        b'', dict(delivery_tag=tag, routing_key='route')),
        Handler('queue', 'routing', lambda m: None), 'name', 1)
    return server.tasks.get_nowait().message.delivery


@pytest.fixture
def gathering_server():
    """A connected server whose passes wait up to 10 s for recent
    handlers."""
    server = make_server(commit_delay=10)
    reconnect(server)
    yield server
    close_server(server)


def test_a_commit_waits_for_the_handler_of_a_message_just_received(
        gathering_server):
    server = gathering_server
    first, second = deliver(server, 1), deliver(server, 2)
    server.submit(Commit(first, []))
    server._commit_due()
    assert server._channel.calls == []
    server.submit(Commit(second, []))
    server._commit_due()
    assert server._channel.names == ['basic_ack', 'basic_ack', 'tx_commit']


def test_the_last_pass_before_the_stop_does_not_wait(gathering_server):
    server = gathering_server
    first, _ = deliver(server, 1), deliver(server, 2)
    op = Commit(first, [])
    server.submit(op)
    server.stop()
    server._serve()
    assert server._channel.names == ['basic_ack', 'tx_commit']
    assert error_of(op) is None


def test_ops_on_the_other_channel_are_not_left_hanging(server):
    # The send channel's batch comes first and fails; the ack waits in the
    # consume channel's batch.
    server._send_channel.fail['tx_commit'] = ConnectionResetError('reset')
    send = Commit(None, [outgoing_message()])
    ack = Commit(delivered(1), [])
    server.submit(send)
    server.submit(ack)
    with pytest.raises(ConnectionResetError):
        server._commit_due()
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
        server._commit_due()
    server._lose_connection(ConnectionResetError('reset'))
    assert isinstance(error_of(ack), CommitFailed)
    assert not resolved(send)
    reconnect(server)
    server._commit_due()
    assert error_of(send) is None
    assert server._send_channel.names == ['basic_publish', 'tx_commit']


def test_message_of_a_failed_commit_is_not_published_later(
        server, monkeypatch):
    monkeypatch.setattr(gocept.amqprun.datamanager, 'COMMIT_TIMEOUT', 0)
    server.send(outgoing_message())
    with pytest.raises(CommitFailed):
        transaction.commit()
    server._commit_due()  # the I/O thread gets to it afterwards
    assert server._send_channel.calls == []


# -- delayed ops --------------------------------------------------------------

def test_delayed_reject_is_not_executed_before_its_time(server):
    op = Reject(delivered(1), delay=60, now=time.time())
    server.submit(op)
    server._commit_due()
    assert server._channel.calls == []
    assert not resolved(op)
    assert list(server.commits._ops) == []
    server._commit_due()
    assert server._channel.calls == []


def test_poll_timeout_is_zero_with_pending_ops(server):
    server.submit(Commit(None, []))
    assert server._poll_timeout() == 0


def test_poll_timeout_is_poll_interval_when_idle(server):
    assert server._poll_timeout() == server.poll_interval


def test_heartbeat_tick_runs_once_per_quarter_interval(server):
    ticks = []
    server.connection.heartbeat = 4
    server.connection.heartbeat_tick = lambda: ticks.append(True)
    for now in (100, 100.5, 100.99, 101, 101.5, 102):
        server._tick_heartbeat(now)
    assert len(ticks) == 3


def test_heartbeat_tick_is_skipped_without_heartbeat(server):
    server.connection.heartbeat_tick = None  # would fail if called
    server._tick_heartbeat(100)


def test_poll_timeout_is_zero_with_frames_in_the_read_buffer(server):
    server.connection.transport._read_buffer = b'\x01'
    assert server._poll_timeout() == 0


def test_poll_timeout_follows_the_heartbeat(server):
    server.connection.heartbeat = 2
    assert server._poll_timeout() == 0.5


def test_poll_timeout_wakes_up_for_the_next_delayed_op(server):
    server.submit(Reject(delivered(1), delay=0.3, now=time.time()))
    server._commit_due()
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
    assert ('queue_bind', ('arguments', {}), ('exchange', 'amq.topic'),
            ('queue', 'queue.1'), ('routing_key', 'a')) in calls
    assert ('queue_bind', ('arguments', {}), ('exchange', 'amq.topic'),
            ('queue', 'queue.1'), ('routing_key', 'b')) in calls
    assert ('queue_bind', ('arguments', {}), ('exchange', 'amq.topic'),
            ('queue', 'queue.2'), ('routing_key', 'c')) in calls
    names = server._channel.names
    assert names.index('tx_commit') > names.index('queue_bind')
    assert ('basic_qos', 0, 2, False) in calls
    assert names.index('basic_qos') < names.index('basic_consume')
    assert sorted(call[1] for call in calls
                  if call[0] == 'basic_consume') == ['queue.1', 'queue.2']
    assert server.consuming
    assert sorted(server._consumer_tags) == ['ctag1', 'ctag2']


def test_declare_and_consume_declares_registered_exchanges_before_binding(
        server, registry):
    zope.component.provideUtility(
        Exchange('orders', 'direct'), IExchange, name='orders')
    handler = register('one', 'queue.1', 'new')
    handler.exchange = 'orders'
    server._declare_and_consume()
    names = server._channel.names
    assert names.index('exchange_declare') < names.index('queue_bind')
    assert dict(server._channel.calls[0][1:])['exchange'] == 'orders'
    bind = server._channel.calls[names.index('queue_bind')]
    assert dict(bind[1:])['exchange'] == 'orders'


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
    server._commit_due()
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
    server._commit_due()
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
        server._connect(server.parameters.nodes[0])
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
        assert server.history.generation == 1
        assert server.node == 'broker:1234'
        server._disconnect()
        assert server.node is None
    finally:
        close_server(server)


def test_connect_without_setup_handlers_declares_nothing(fake_amqp,
                                                         registry):
    register('one', 'queue.1', 'a')
    server = Server(Parameters(), setup_handlers=False)
    try:
        server._connect(server.parameters.nodes[0])
        consume, send = fake_amqp.instances[0].channels
        assert consume.names == ['tx_select']
    finally:
        close_server(server)


def test_each_connect_is_a_new_generation(fake_amqp, registry):
    server = make_server()
    try:
        server._connect(server.parameters.nodes[0])
        server._disconnect()
        server._connect(server.parameters.nodes[0])
        assert server.history.generation == 2
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


def test_declare_refused_after_a_reconnect_is_fatal_without_retry(
        fake_amqp, registry, keep_thread_name, monkeypatch, caplog):
    register('one', 'queue.1', 'a')
    declares = []

    def declare(channel, handlers, exchanges):
        declares.append(channel)
        if len(declares) > 1:
            raise DeclareRefused("The broker refused queue 'queue.1': "
                                 "PRECONDITION_FAILED")
    monkeypatch.setattr(gocept.amqprun.topology, 'declare', declare)
    server = make_server(reconnect_delay=0)
    monkeypatch.setattr(server, '_serve', lambda: (_ for _ in ()).throw(
        ConnectionResetError('reset')))
    try:
        with caplog.at_level(logging.WARNING, 'gocept.amqprun.server'):
            server.start()
    finally:
        close_server(server)
    assert isinstance(server.error, DeclareRefused)
    assert len(fake_amqp.instances) == 2
    critical = [r.getMessage() for r in caplog.records
                if r.levelno == logging.CRITICAL]
    assert critical == ["The broker refused queue 'queue.1': "
                        "PRECONDITION_FAILED"]


def test_start_after_stop_returns_at_once(fake_amqp, keep_thread_name):
    server = make_server()
    try:
        server.stop()
        server.start()
    finally:
        close_server(server)
    assert fake_amqp.instances == []
    assert server.error is None


# -- several broker nodes -----------------------------------------------------

def hosts(fake_amqp):
    """The node each connection attempt went to."""
    return [connection.kw['host'] for connection in fake_amqp.instances]


def run_until(server, monkeypatch, serve_steps):
    """start() with ``_serve`` doing ``serve_steps`` in turn (each a
    callable; the last one stops the server); back-offs are recorded.
    """
    sleeps = []
    steps = list(serve_steps)

    def serve():
        step = steps.pop(0)
        if not steps:
            server._should_stop = True
        step()
    monkeypatch.setattr(server, '_serve', serve)
    monkeypatch.setattr(server, '_sleep', sleeps.append)
    try:
        server.start()
    finally:
        close_server(server)
    return sleeps


def lose():
    raise ConnectionResetError('reset')


def nothing():
    pass


def test_first_node_down_at_start_up_starts_on_the_second_without_waiting(
        fake_amqp, registry, keep_thread_name, monkeypatch, caplog):
    fake_amqp.connect_errors = [ConnectionRefusedError('refused')]
    server = make_server(hostname='rabbit1 rabbit2', reconnect_delay=60)
    seen = []
    with caplog.at_level(logging.INFO, 'gocept.amqprun.server'):
        sleeps = run_until(server, monkeypatch,
                           [lambda: seen.append(server.node)])
    assert hosts(fake_amqp) == ['rabbit1:5672', 'rabbit2:5672']
    assert sleeps == []
    assert seen == ['rabbit2:5672']
    assert server.node is None and server.error is None
    messages = [r.getMessage() for r in caplog.records]
    assert ('Cannot connect to the AMQP broker at rabbit1:5672: '
            'ConnectionRefusedError: refused') in messages
    assert 'AMQP connection to rabbit2:5672 opened.' in messages


def test_after_a_loss_the_next_node_is_tried_first(
        fake_amqp, registry, keep_thread_name, monkeypatch, caplog):
    server = make_server(hostname='rabbit1 rabbit2 rabbit3')
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.server'):
        sleeps = run_until(server, monkeypatch, [lose, lose, lose, nothing])
    assert hosts(fake_amqp) == ['rabbit1:5672', 'rabbit2:5672',
                                'rabbit3:5672', 'rabbit1:5672']
    assert sleeps == []
    assert ('Lost the connection to rabbit2:5672: ConnectionResetError: '
            'reset; reconnecting') in [r.getMessage() for r in caplog.records]


def test_one_start_up_attempt_is_a_round_over_all_nodes(
        fake_amqp, registry, keep_thread_name, monkeypatch, caplog):
    fake_amqp.connect_errors = [ConnectionRefusedError('refused')] * 4
    server = make_server(hostname='rabbit1 rabbit2:5673',
                         startup_attempts=2, reconnect_delay=0.5)
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.server'):
        sleeps = run_until(server, monkeypatch, [])
    assert hosts(fake_amqp) == ['rabbit1:5672', 'rabbit2:5673'] * 2
    assert sleeps == [0.5]
    assert isinstance(server.error, BrokerUnreachable)
    assert str(server.error) == (
        'Cannot connect to the AMQP broker at rabbit1:5672, rabbit2:5673: '
        'ConnectionRefusedError: refused (gave up after 2 attempts)')
    assert ('No AMQP broker node of rabbit1:5672, rabbit2:5673 answered '
            '(ConnectionRefusedError: refused); retrying in 0.5 s') in [
        r.getMessage() for r in caplog.records]


def test_back_off_grows_between_failed_rounds_after_a_loss(
        fake_amqp, registry, keep_thread_name, monkeypatch):
    fake_amqp.connect_errors = [None] + [ConnectionRefusedError('down')] * 4
    server = make_server(hostname='rabbit1 rabbit2', reconnect_delay=1,
                         startup_attempts=1)
    sleeps = run_until(server, monkeypatch, [lose, nothing])
    assert hosts(fake_amqp) == ['rabbit1:5672'] + [
        'rabbit2:5672', 'rabbit1:5672'] * 2 + ['rabbit2:5672']
    assert sleeps == [1, 2]


def tls_failure():
    error = ssl.SSLCertVerificationError(1, 'certificate verify failed')
    error.verify_message = 'self-signed certificate'
    return error


def test_a_certificate_that_does_not_verify_at_start_up_is_fatal(
        fake_amqp, registry, keep_thread_name, monkeypatch, caplog):
    fake_amqp.connect_errors = [tls_failure()]
    server = make_server(hostname='rabbit1 rabbit2', ssl=True)
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.server'):
        sleeps = run_until(server, monkeypatch, [])
    assert isinstance(server.error, TLSError)
    assert hosts(fake_amqp) == ['rabbit1:5671']
    assert sleeps == []
    critical = [r.getMessage() for r in caplog.records
                if r.levelno == logging.CRITICAL]
    assert critical == [
        'TLS handshake with the AMQP broker at rabbit1:5671 failed: the '
        'certificate does not verify (self-signed certificate)']


def test_a_node_whose_certificate_fails_later_is_skipped(
        fake_amqp, registry, keep_thread_name, monkeypatch, caplog):
    fake_amqp.connect_errors = [None, tls_failure()]
    server = make_server(hostname='rabbit1 rabbit2 rabbit3', ssl=True)
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.server'):
        sleeps = run_until(server, monkeypatch, [lose, nothing])
    assert hosts(fake_amqp) == ['rabbit1:5671', 'rabbit2:5671',
                                'rabbit3:5671']
    assert sleeps == []
    assert server.error is None
    assert [r.getMessage() for r in caplog.records
            if r.levelno == logging.CRITICAL] == [
        'TLS handshake with the AMQP broker at rabbit2:5671 failed: the '
        'certificate does not verify (self-signed certificate)']


def test_a_queue_without_leader_is_declared_again_after_the_back_off(
        fake_amqp, registry, keep_thread_name, monkeypatch):
    register('one', 'queue.1', 'a')
    declares = []

    def declare(channel, handlers, exchanges=()):
        declares.append(channel)
        if len(declares) == 1:
            raise QueueUnavailable("queue 'queue.1': due to timeout")
    monkeypatch.setattr(gocept.amqprun.topology, 'declare', declare)
    server = make_server(reconnect_delay=0.25)
    sleeps = run_until(server, monkeypatch, [nothing])
    assert server.error is None
    assert len(declares) == 2
    assert sleeps == [0.25]
    assert fake_amqp.instances[0].calls == ['connect', 'collect']


def test_tls_without_verification_warns_at_start_up(
        fake_amqp, keep_thread_name, caplog):
    server = make_server(ssl=True, ssl_verify=False)
    server.stop()
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.server'):
        try:
            server.start()
        finally:
            close_server(server)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        'TLS without verification (ssl_verify false): the connection to '
        'localhost:5671 is encrypted but not authenticated; anyone on the '
        'network path can pose as the broker')


def test_connect_hands_blocked_callbacks_to_the_connection(fake_amqp):
    server = make_server()
    try:
        server._connect(server.parameters.nodes[0])
    finally:
        close_server(server)
    [connection] = fake_amqp.instances
    assert connection.on_unblocked == server._on_unblocked
    assert connection._callbacks[
        amqp.spec.Connection.Blocked] == server._on_blocked


# -- a broker that blocks publishing ------------------------------------------

def test_blocked_broker_is_logged_and_visible(server, caplog):
    server.node = 'rabbit1:5672'
    with caplog.at_level(logging.INFO, 'gocept.amqprun.server'):
        server._on_blocked('low on memory')
        assert server.blocked == 'low on memory'
        server._on_unblocked()
    assert server.blocked is None
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ('WARNING', 'publishing blocked by the broker: low on memory; '
                    'commits wait (node rabbit1:5672)'),
        ('INFO', 'publishing unblocked by the broker; 0 held commit(s) go '
                 'ahead (node rabbit1:5672)')]


def test_blocked_without_reason_says_so(server):
    server._on_blocked()
    assert server.blocked == 'no reason given'


def test_commits_that_publish_wait_for_the_unblock(server):
    publish = Commit(delivered(1), [outgoing_message()])
    ack = Commit(delivered(2), [])
    server.submit(publish)
    server.submit(ack)
    server._on_blocked('low on disk')
    server._commit_due()
    assert server._channel.names == ['basic_ack', 'tx_commit']
    assert not resolved(publish)
    server._on_unblocked()
    server._commit_due()
    assert error_of(publish) is None
    assert server._channel.names[2:] == ['basic_ack', 'basic_publish',
                                         'tx_commit']


def test_stop_during_a_block_gives_held_commits_back_and_drops_the_socket(
        fake_amqp, registry, keep_thread_name, monkeypatch, caplog):
    server = make_server()
    held = Commit(delivered(1), [outgoing_message()])

    def block_and_hold():
        server._on_blocked('low on memory')
        server.submit(held)
        server._commit_due()
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.server'):
        run_until(server, monkeypatch, [block_and_hold])
    assert isinstance(error_of(held), ConnectionLost)
    [connection] = fake_amqp.instances
    assert connection.calls == ['connect', 'collect']
    assert server.blocked is None
    assert ('1 commit(s) were not carried out before the connection '
            'closed: nothing of them was published; the messages they '
            'were to acknowledge go back to the broker') in [
        r.getMessage() for r in caplog.records]


def test_stop_during_a_block_shuts_the_socket_down(server, caplog):
    # The broker stopped reading: a tx.commit waits for the unblock.
    left, right = socket.socketpair()
    try:
        server._socket = left
        server._on_blocked('low on memory')
        with caplog.at_level(logging.WARNING, 'gocept.amqprun.server'):
            server.stop()
        assert right.recv(1) == b''  # the waiting read ends
        assert 'Dropping the connection to ' in caplog.text
        server._disconnect()
        server.stop()  # not blocked any more, nothing to drop
        left.close()
        server._socket = left
        server.blocked = 'low on disk'
        server._abort_blocked_io()  # closed meanwhile: nothing to do
    finally:
        left.close()
        right.close()


def test_stop_when_not_blocked_leaves_the_socket_alone(server):
    server._socket = object()  # would fail if touched
    server.stop()


# -- what observers read -----------------------------------------------------

def test_loop_turns_while_it_waits_to_reconnect(unconnected):
    assert unconnected.last_turn is None
    before = time.monotonic()
    unconnected._sleep(0)
    assert unconnected.last_turn >= before


def test_commit_observers_are_those_of_the_commit_queue(unconnected):
    assert unconnected.commit_observers is unconnected.commits.observers
    assert unconnected.commit_observers == []
