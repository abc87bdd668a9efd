"""Production topology against real brokers: several nodes, a broker that
blocks publishing (a resource alarm) and a three-node cluster.

The node-list and alarm tests use the test run's broker; the alarm is
raised on it for one test and always cleared again. The ``cluster`` tests
share the session's three-node cluster (``amqp_cluster``): they kill,
stop and start its nodes, and leave all three running. Their daemon is
the ``server`` script in a subprocess; a producer and a counting client
of their own (``faults_tally``) talk to the cluster independently. TLS:
``test_tls.py``.
"""
import contextlib
import re
import signal
import socket
import threading
import time

import pytest

import gocept.amqprun.testing
from gocept.amqprun.connection import Parameters
from gocept.amqprun.server import Server
from gocept.amqprun.testing import wait_for
from gocept.amqprun.testing.broker import temporary_vhost
from gocept.amqprun.tests.integration.faults_handlers import QUORUM
from gocept.amqprun.tests.integration.faults_handlers import REPLY_KEY
from gocept.amqprun.tests.integration.faults_tally import Producer
from gocept.amqprun.tests.integration.faults_tally import Replies
from gocept.amqprun.tests.integration.faults_tally import declare_queue
from gocept.amqprun.tests.integration.faults_tally import message_id
from gocept.amqprun.tests.integration.faults_tally import numbered


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


# -- a three-node cluster ----------------------------------------------------

#: Seconds from the ``kill -9`` of the daemon's node until replies flow
#: again through another node, without restarting the daemon (what
#: docs/cluster.rst promises). Measured on a loaded two-core machine:
#: see the test's output.
FAILOVER_BOUND = 15

#: The daemon's settings for the cluster: heartbeats every 2 s, reconnect
#: at once and often.
CLUSTER_SETTINGS = ('heartbeat_interval 2', 'reconnect_delay 0.2',
                    'reconnect_max_delay 1')

QUORUM_HANDLER = 'gocept.amqprun.tests.integration.faults_handlers.quorum'

OPENED = re.compile(r'AMQP connection to (\S+) opened\.')


@pytest.fixture
def cluster_vhost(amqp_cluster):
    """A fresh virtual host of the shared cluster for one test."""
    with temporary_vhost(amqp_cluster) as name:
        yield name


@pytest.fixture
def cluster_daemon(amqp_cluster, cluster_vhost, tmp_path):
    """Factory: the ``server`` script for the quorum handler, connected to
    all nodes of the cluster (killed after the test)."""
    started = []

    def start():
        mapping = dict(
            amqp_cluster.config_mapping(cluster_vhost),
            amqp_extra='\n  '.join(CLUSTER_SETTINGS), workers=4,
            worker_extra='', settings='', log_level='INFO',
            log_path='STDOUT')
        config = gocept.amqprun.testing.write_config(
            str(tmp_path), gocept.amqprun.testing.site_zcml(QUORUM_HANDLER),
            gocept.amqprun.testing.CONFIG_TEMPLATE, mapping)
        daemon = gocept.amqprun.testing.ServerProcess(config)
        started.append(daemon)
        return daemon.start(wait=True, timeout=60)
    yield start
    for daemon in started:
        daemon.kill()


def address(node):
    """``host:port`` of a cluster node, as the daemon logs it."""
    return '%s:%d' % (node.hostname, node.port)


def connected_node(cluster, daemon, connections):
    """The node of the daemon's ``connections``-th connection (from 1)."""
    opened = wait_for(
        lambda: OPENED.findall(daemon.output)[connections - 1:], 60,
        message='no connection #%d:\n%s' % (connections, daemon.output))
    [node] = [node for node in cluster.nodes if address(node) == opened[0]]
    return node


def wait_until_replicated(cluster, vhost, timeout=60):
    """Wait until every quorum queue of ``vhost`` has all its members
    online (a restarted node has caught up)."""
    def replicated():
        output = cluster.ctl('list_queues', '-q', '--no-table-headers',
                             '-p', vhost, 'name', 'type', 'online')
        return all(line.count('@') == cluster.size
                   for line in output.splitlines() if 'quorum' in line)
    wait_for(replicated, timeout, interval=0.5,
             message='quorum queues of %s not replicated' % vhost)


@contextlib.contextmanager
def explained_by(cluster, vhost, daemon, missing):
    """A failed wait also names where the messages are: the queues' counts
    on the broker, what the daemon logged about the first ``missing()``
    bodies and the end of its log."""
    try:
        yield
    except AssertionError as e:
        queues = cluster.ctl('list_queues', '-q', '--no-table-headers', '-p',
                             vhost, 'name', 'messages_ready',
                             'messages_unacknowledged', 'leader', 'online')
        lines = daemon.output.splitlines()
        ids = [message_id(body) for body in missing()[:3]]
        about = [line for line in lines if any(id in line for id in ids)]
        raise AssertionError(
            '%s\nqueues:\n%s\ndaemon about %s:\n%s\ndaemon:\n%s' % (
                e, queues, ', '.join(ids), '\n'.join(about),
                '\n'.join(lines[-40:]))) from e


def wait_for_replies(replies, bodies, timeout=60):
    """Wait for the replies to ``bodies``; return those missing after
    ``timeout`` seconds (in number order)."""
    try:
        replies.wait_for(bodies, timeout)
    except AssertionError:
        return replies.missing(bodies)
    return []


def broker_confirmed(body, output):
    """True when the daemon's log says the broker answered the commit of
    ``body``'s message (handled), or that it may have (in doubt): its
    reply is then the broker's to deliver.

    RabbitMQ 3.10 sometimes confirms a transaction whose publishes to a
    quorum queue never arrive while a node stops; a plain py-amqp loop
    shows it too (docs/cluster.rst).
    """
    wanted = message_id(body)
    return any(('Handled message %s ' % wanted in line)
               or ('Message %s ' % wanted in line
                   and 'during the AMQP commit' in line)
               for line in output.splitlines())


def kill_and_wait_for_failover(cluster, daemon, replies, connections):
    """``kill -9`` the daemon's node; return (node, seconds until replies
    flow again through another node).

    Replies count once the daemon consumes again (replies committed
    before the kill have arrived by then).
    """
    victim = connected_node(cluster, daemon, connections)
    killed = time.monotonic()
    victim.kill()
    replies.wait_until(
        lambda: daemon.output.count('Consuming ') > connections, 60,
        'the daemon did not consume again after the loss of %s'
        % victim.nodename)
    assert connected_node(cluster, daemon, connections + 1) is not victim
    before = len(replies.copies)
    replies.wait_until(lambda: len(replies.copies) > before, 60,
                       'no replies after the loss of %s' % victim.nodename)
    return victim, time.monotonic() - killed


def start_stopped_nodes(cluster):
    """Start the nodes a failed test left stopped: tests leave all running.
    """
    for node in cluster.nodes:
        if not node.is_running:  # pragma: no cover (after a failure only)
            node.start()


@pytest.mark.cluster
def test_kill_9_of_the_daemons_node_under_load_loses_no_message(
        amqp_cluster, cluster_vhost, cluster_daemon):
    first, second, third = amqp_cluster.nodes
    bodies = numbered(2000)
    half = len(bodies) // 2
    # The work queue's leader is on the first node (declared through it),
    # the one the daemon connects to; the replies live on the third node,
    # which this test never kills.
    declare_queue(first, cluster_vhost, 'faults.quorum', 'faults.quorum',
                  arguments=QUORUM)
    replies = Replies(third, cluster_vhost, REPLY_KEY,
                      queue='faults.replies', arguments=QUORUM)
    # One producer per half of the load: each kill happens under load.
    producers = [Producer([third, first, second], cluster_vhost, part,
                          'faults.quorum')
                 for part in (bodies[:half], bodies[half:])]
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(start_stopped_nodes, amqp_cluster)
        daemon = cluster_daemon()
        assert connected_node(amqp_cluster, daemon, 1) is first
        producers[0].start()
        cleanup.callback(producers[0].stop)
        replies.wait_for_count(300, 60)
        victim, failover = kill_and_wait_for_failover(
            amqp_cluster, daemon, replies, 1)
        assert victim is first
        first.start()
        wait_until_replicated(amqp_cluster, cluster_vhost)
        producers[1].start()
        cleanup.callback(producers[1].stop)
        replies.wait_for_count(half + 300, 60)
        victim, second_failover = kill_and_wait_for_failover(
            amqp_cluster, daemon, replies, 2)
        assert victim is second
        victim.start()
        for producer in producers:
            producer.finish()
        with explained_by(amqp_cluster, cluster_vhost, daemon,
                          lambda: replies.missing(bodies)):
            replies.wait_for(bodies, 60)
        replies.drain(0.5)  # late copies
    in_doubt = producers[0].in_doubt | producers[1].in_doubt
    duplicates, flagged = replies.check(bodies, in_doubt)
    print('failover after kill -9: %.1f s and %.1f s; %d duplicates, %d '
          'flagged redelivered, %d published twice by the producer'
          % (failover, second_failover, duplicates, flagged, len(in_doubt)))
    assert failover < FAILOVER_BOUND
    assert second_failover < FAILOVER_BOUND
    output = daemon.output
    assert output.count('Process started') == 1  # never restarted
    assert 'Lost the connection to %s' % address(first) in output
    assert 'Lost the connection to %s' % address(second) in output
    assert daemon.stop(30) == 0
    replies.delete()


@pytest.mark.cluster
def test_rolling_restart_of_all_nodes_answers_every_message(
        amqp_cluster, cluster_vhost, cluster_daemon):
    first, second, third = amqp_cluster.nodes
    declare_queue(first, cluster_vhost, 'faults.quorum', 'faults.quorum',
                  arguments=QUORUM)
    # Declared and bound now; counted after the restarts.
    Replies(third, cluster_vhost, REPLY_KEY, queue='faults.replies',
            arguments=QUORUM).close()
    # A trickle of 20 messages a second, until every node was restarted.
    producer = Producer([third, second, first], cluster_vhost,
                        numbered(10000), 'faults.quorum', interval=0.05)
    daemon = cluster_daemon()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(start_stopped_nodes, amqp_cluster)
        producer.start()
        cleanup.callback(producer.stop)
        for node in amqp_cluster.nodes:
            # Drained first, as RabbitMQ asks: a plain stop of the node of
            # a quorum queue's leader can drop publishes it committed
            # (docs/cluster.rst).
            node.restart(drain=True)
            wait_for(lambda: len(amqp_cluster.running_nodes()) == 3, 60,
                     interval=0.5,
                     message='%s did not rejoin' % node.nodename)
            wait_until_replicated(amqp_cluster, cluster_vhost)
    bodies = producer.bodies[:producer.confirmed]
    assert len(bodies) > 100
    replies = Replies(third, cluster_vhost, REPLY_KEY,
                      queue='faults.replies', arguments=QUORUM)
    missing = wait_for_replies(replies, bodies)
    unaccounted = [body for body in missing
                   if not broker_confirmed(body, daemon.output)]
    with explained_by(amqp_cluster, cluster_vhost, daemon,
                      lambda: unaccounted):
        assert not unaccounted, '%d replies missing, e.g. %r' % (
            len(unaccounted), unaccounted[:5])
    replies.drain(0.5)
    duplicates, flagged = replies.check(
        set(bodies) - set(missing), producer.in_doubt)
    print('rolling restart: %d messages, %d duplicates, %d flagged '
          'redelivered, %d published twice, %d dropped by the broker after '
          'it confirmed their commit' % (
              len(bodies), duplicates, flagged, len(producer.in_doubt),
              len(missing)))
    output = daemon.output
    assert output.count('Process started') == 1
    for node in amqp_cluster.nodes:  # the daemon was on each in turn
        assert 'Lost the connection to %s' % address(node) in output
    assert daemon.stop(30) == 0
    replies.delete()
