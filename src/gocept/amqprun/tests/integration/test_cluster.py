"""Production topology against real brokers: several nodes, a broker that
blocks publishing (a resource alarm), TLS and a three-node cluster.

The node-list and alarm tests use the test run's broker; the alarm is
raised on it for one test and always cleared again.
"""
import contextlib
import signal
import socket
import threading
import time


import gocept.amqprun.testing
from gocept.amqprun.connection import Parameters
from gocept.amqprun.server import Server


ECHO = 'gocept.amqprun.tests.integration.handlers.echo'

#: Seconds the daemon of the alarm test gives running handlers at
#: shutdown; it must exit within that (plus its own start-up and stop).
SHUTDOWN_TIMEOUT = 2


def closed_port():
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(server):
    """Run ``server`` in a thread; stop and join it afterwards."""
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive()


def test_first_node_down_at_start_up_starts_on_the_second_without_waiting(
        amqp_broker, amqp_vhost):
    live = '%s:%s' % (amqp_broker.hostname, amqp_broker.port)
    parameters = Parameters(
        hostname='127.0.0.1:%d %s' % (closed_port(), live),
        username=amqp_broker.username, password=amqp_broker.password,
        virtual_host=amqp_vhost, reconnect_delay=30, startup_attempts=1)
    started = time.monotonic()
    with running(Server(parameters, setup_handlers=False)) as server:
        assert server.wait_until_running(10)
        assert time.monotonic() - started < 10  # no 30 s back-off
        assert server.node == live


@contextlib.contextmanager
def memory_alarm(broker):
    """A memory alarm on ``broker`` (publishing blocked) until the end."""
    broker.ctl('set_vm_memory_high_watermark', '0.0000001')
    try:
        gocept.amqprun.testing.wait_for(
            lambda: 'memory' in broker.ctl(
                'eval', 'rabbit_alarm:get_alarms().'),
            timeout=20, message='the memory alarm did not go off')
        yield
    finally:
        broker.ctl('set_vm_memory_high_watermark', '0.4')


def test_a_blocked_broker_holds_commits_and_sigterm_still_stops_in_time(
        amqp_broker, amqp_vhost, amqp_client, tmp_path):
    amqp_client.channel.queue_declare('test.queue', durable=True,
                                      auto_delete=False)
    amqp_client.channel.queue_bind('test.queue', 'amq.topic', 'test.routing')
    amqp_client.expect_message_on('test.response')
    for number in range(20):
        amqp_client.send_message(str(number).encode(), 'test.routing')
    config = gocept.amqprun.testing.make_config(
        str(tmp_path), amqp_broker, amqp_vhost,
        gocept.amqprun.testing.site_zcml(ECHO), workers=2,
        log_path='STDOUT',
        worker_extra='shutdown-timeout %s' % SHUTDOWN_TIMEOUT)
    with memory_alarm(amqp_broker):
        daemon = gocept.amqprun.testing.ServerProcess(config)
        try:
            daemon.start(wait=True)
            daemon.wait_for_output('publishing blocked by the broker: ')
            daemon.wait_for_output('Handling routing key')
            started = time.monotonic()
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
            assert time.monotonic() - started < SHUTDOWN_TIMEOUT + 5
        finally:
            daemon.kill()
        output = daemon.output
        assert 'publishing blocked by the broker: ' in output
        assert 'commits wait' in output
        assert 'Dropping the connection to ' in output
        assert 'Handled message' not in output
        # A second daemon, started during the alarm, finishes everything
        # once it clears (the broker requeues what the first one had only
        # once it reads that connection again, after the alarm).
        daemon = gocept.amqprun.testing.ServerProcess(config)
        daemon.start(wait=True)
    try:
        daemon.wait_for_output('publishing unblocked by the broker')
        replies = amqp_client.wait_for_messages(20, timeout=30)
        assert sorted(int(reply.body.split(b' ')[1]) for reply in replies) \
            == list(range(20))
        assert daemon.stop(30) == 0
    finally:
        daemon.kill()
