"""Fault injection: the daemon under load while things fail around it.

Every test counts what arrived with an independent client
(``faults_tally``): each numbered message's reply arrives exactly once, or
once plus copies flagged ``redelivered`` by the broker. Connections are cut
and stalled with ``faults_proxy.FaultProxy``; the broker is restarted; the
daemon runs in-process (``main.run`` in a thread) or as a ``server``
subprocess that gets SIGTERM or SIGKILL.
"""
import collections
import os
import signal
import socket
import threading
import time
import uuid

import pytest
import transaction
import zope.component

import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.testing
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.integration import faults_handlers
from gocept.amqprun.tests.integration.faults_handlers import REPLY_KEY
from gocept.amqprun.tests.integration.faults_tally import FULL
from gocept.amqprun.tests.integration.faults_tally import Replies
from gocept.amqprun.tests.integration.faults_tally import connect
from gocept.amqprun.tests.integration.faults_tally import declare_queue
from gocept.amqprun.tests.integration.faults_tally import message_id
from gocept.amqprun.tests.integration.faults_tally import numbered
from gocept.amqprun.tests.integration.faults_tally import publish


#: Reconnect at once and often: the tests wait for it.
FAST_RECONNECT = ('reconnect_delay 0.1', 'reconnect_max_delay 0.5')


def zcml(*names):
    """Site ZCML registering the named handlers of ``faults_handlers``."""
    registrations = ''.join(
        '<utility component="gocept.amqprun.tests.integration.'
        'faults_handlers.%s" name="%s" />\n' % (name, name)
        for name in names)
    return ('<configure xmlns="http://namespaces.zope.org/zope">\n'
            '<include package="gocept.amqprun" />\n%s</configure>\n'
            % registrations)


def write_config(directory, broker, virtual_host, *names, workers=2,
                 amqp_port=None, amqp_extra=(), worker_extra=(),
                 settings=()):
    """Write site ZCML and config file into ``directory``; return its path.
    """
    os.makedirs(directory, exist_ok=True)
    mapping = dict(
        broker.config_mapping(virtual_host), workers=workers,
        amqp_extra='\n  '.join(amqp_extra),
        worker_extra='\n  '.join(worker_extra),
        settings='\n  '.join(settings), log_level='INFO',
        log_path=os.path.join(directory, 'server.log'))
    if amqp_port is not None:
        mapping['amqp_port'] = amqp_port
    return gocept.amqprun.testing.write_config(
        directory, zcml(*names), gocept.amqprun.testing.CONFIG_TEMPLATE,
        mapping)


def log_lines(config_path, level):
    """The lines of the daemon's log file at ``level``."""
    path = os.path.join(os.path.dirname(config_path), 'server.log')
    with open(path, encoding='utf-8', errors='replace') as f:
        return [line for line in f if ' %s ' % level in line]


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


# -- fixtures ----------------------------------------------------------------

pytestmark = pytest.mark.usefixtures('no_thread_survives')


@pytest.fixture
def daemon(tmp_path, clean_registry):
    """Factory: run ``main.run`` in a thread with a config for the faults.

    ``daemon(broker, vhost, 'handler', ..., **write_config options)``
    returns a started ``testing.MainThread``; it is stopped after the test.
    """
    started = []

    def start(broker, virtual_host, *names, **options):
        config = write_config(str(tmp_path / 'inprocess'), broker,
                              virtual_host, *names, **options)
        runner = gocept.amqprun.testing.MainThread(config)
        started.append(runner)
        runner.start()
        assert runner.server is not None and runner.server.running
        return runner

    yield start
    for runner in started:
        if runner.thread.is_alive():
            assert runner.stop() == 0


@pytest.fixture
def processes():
    """Factory for ``server`` subprocesses; any still running is killed."""
    started = []

    def start(config_path):
        process = gocept.amqprun.testing.ServerProcess(config_path)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.kill()


def report(name, duplicates, flagged):
    print('\n%s: %d duplicate(s), %d flagged redelivered'
          % (name, duplicates, flagged))


# -- 1. connection cut -------------------------------------------------------

def test_cut_connection_reconnects_and_every_reply_arrives_once(
        proxy, daemon, amqp_broker, amqp_vhost, replies):
    daemon(amqp_broker, amqp_vhost, 'numbers', workers=4,
           amqp_port=proxy.port, amqp_extra=FAST_RECONNECT)
    bodies = numbered(1000)
    publish(amqp_broker, amqp_vhost, bodies, 'faults.number')
    replies.wait_for_count(250)
    assert proxy.cut() == 1
    replies.wait_for_count(len(replies.copies) + 250)
    assert proxy.cut() == 1
    replies.wait_for(bodies, timeout=60)
    replies.drain(0.5)  # late duplicates would show up now
    report('cut', *replies.check(bodies))
    assert proxy.accepted >= 3  # it reconnected after each cut


# -- 2. broker restart -------------------------------------------------------

def queue_length(broker, virtual_host, queue):
    connection = connect(broker, virtual_host)
    try:
        _, count, _ = connection.channel().queue_declare(queue, passive=True)
        return count
    finally:
        connection.close()


def test_broker_restart_loses_no_persistent_message(
        daemon, restartable_broker):
    broker, vhost = restartable_broker
    reply_queue = 'faults.replies.%s' % uuid.uuid4().hex[:8]
    Replies(broker, vhost, REPLY_KEY, queue=reply_queue).close()  # durable
    main = daemon(broker, vhost, 'numbers', workers=4,
                  amqp_extra=FAST_RECONNECT, settings=['faults.sleep 0.002'])
    bodies = numbered(1500)
    publish(broker, vhost, bodies, 'faults.number')
    wait_for(lambda: queue_length(broker, vhost, reply_queue) >= 300,
             timeout=30, interval=0.1)
    broker.node.restart()
    replies = Replies(broker, vhost, REPLY_KEY, queue=reply_queue)
    try:
        replies.wait_for(bodies, timeout=60)
        replies.drain(0.5)
        report('restart', *replies.check(bodies))
        assert main.thread.is_alive() and main.server.running
    finally:
        replies.delete()


# -- 3. stalled connection, heartbeat timeout --------------------------------

def test_stalled_connection_is_detected_and_replaced(
        proxy, daemon, amqp_broker, amqp_vhost, replies):
    daemon(amqp_broker, amqp_vhost, 'numbers', workers=2,
           amqp_port=proxy.port, settings=['faults.sleep 0.01'],
           amqp_extra=('heartbeat_interval 1', 'connect_timeout 2')
           + FAST_RECONNECT)

    def stall_until_replaced(connections):
        # Stalled, a new connection attempt is accepted by the proxy (and
        # stalled, too) once the daemon gave up on the silent one.
        proxy.stall()
        stalled = time.monotonic()
        wait_for(lambda: proxy.accepted > connections, timeout=10,
                 message='The stalled connection was not replaced.')
        detected = time.monotonic() - stalled
        proxy.resume()
        return detected

    # Idle: only heartbeats flow, so the missed heartbeats tell.
    idle = numbered(50)
    publish(amqp_broker, amqp_vhost, idle, 'faults.number')
    replies.wait_for(idle, timeout=20)
    detected_idle = stall_until_replaced(1)
    # Busy: a commit waits for the broker's answer; its time-out tells.
    busy = numbered(300)
    publish(amqp_broker, amqp_vhost, busy, 'faults.number')
    replies.wait_for_count(len(idle) + 50)
    detected_busy = stall_until_replaced(proxy.accepted)
    replies.wait_for(idle + busy, timeout=60)
    replies.drain(0.5)
    report('stall', *replies.check(idle + busy))
    # two heartbeat intervals (1 s) and some slack
    assert detected_idle < 4, 'Took %.1f s to notice' % detected_idle
    assert detected_busy < 4, 'Took %.1f s to notice' % detected_busy


# -- 4. poison message -------------------------------------------------------

def test_poison_message_is_dead_lettered_after_max_attempts_without_spinning(
        daemon, amqp_broker, amqp_vhost, replies):
    dead = Replies(amqp_broker, amqp_vhost, 'faults.dead')
    try:
        main = daemon(amqp_broker, amqp_vhost, 'poison', workers=2,
                      worker_extra=('retry-delay 0.5', 'max-attempts 3',
                                    'dead-letter-routing-key faults.dead'))
        good = numbered(100)
        poison = good[0].split(b':')[0] + b':poison'
        publish(amqp_broker, amqp_vhost, good[:50], 'faults.poison')
        publish(amqp_broker, amqp_vhost, [poison], 'faults.poison')
        publish(amqp_broker, amqp_vhost, good[50:], 'faults.poison')
        replies.wait_for(good, timeout=30)
        dead.wait_for([poison], timeout=30)
        replies.drain(1.5)  # time enough for a 4th attempt, if it came
        report('poison', *replies.check(good))
        [message] = dead.messages
        headers = message.properties['application_headers']
        assert headers['x-amqprun-attempts'] == 3
        assert headers['x-amqprun-error'].startswith(
            'RuntimeError: poison message')
        assert headers['x-amqprun-routing-key'] == 'faults.poison'
        assert message.properties['message_id'] == (
            message_id(poison))
        attempts = [at for _, at in faults_handlers.calls_for(poison)]
        assert len(attempts) == 3
        gaps = [later - earlier
                for earlier, later in zip(attempts, attempts[1:])]
        assert min(gaps) >= 0.45, gaps  # retry-delay 0.5, no hot loop
        assert poison not in replies.copies
        # The server keeps running and handling.
        assert main.thread.is_alive() and main.server.running
        after = numbered(1)
        publish(amqp_broker, amqp_vhost, after, 'faults.poison')
        replies.wait_for(after, timeout=10)
    finally:
        dead.close()


def test_reply_that_cannot_be_encoded_fails_its_message_not_the_connection(
        proxy, daemon, amqp_broker, amqp_vhost, replies):
    dead = Replies(amqp_broker, amqp_vhost, 'faults.dead')
    try:
        daemon(amqp_broker, amqp_vhost, 'unsendable', workers=2,
               amqp_port=proxy.port,
               worker_extra=('retry-delay 0.2', 'max-attempts 2',
                             'dead-letter-routing-key faults.dead'))
        good = numbered(100)
        bad = good[0].split(b':')[0] + b':unsendable'
        publish(amqp_broker, amqp_vhost, good[:50] + [bad] + good[50:],
                'faults.unsendable')
        replies.wait_for(good, timeout=30)
        dead.wait_for([bad], timeout=30)
        replies.drain(0.5)
        report('unsendable', *replies.check(good))
        [message] = dead.messages
        headers = message.properties['application_headers']
        assert headers['x-amqprun-attempts'] == 2
        assert 'Cannot publish' in headers['x-amqprun-error']
        assert len(faults_handlers.calls_for(bad)) == 2
        # The other messages' commits were not dragged down with it.
        assert proxy.accepted == 1
    finally:
        dead.close()


# -- 4a. a queue that refuses the replies -------------------------------------

@pytest.fixture
def full_queue_daemon(full_reply_queue, daemon, amqp_broker, amqp_vhost):
    """A daemon of ``numbers`` whose replies go to a full ``FULL`` queue."""
    return daemon(amqp_broker, amqp_vhost, 'numbers', workers=2,
                  amqp_extra=FAST_RECONNECT)


def refusals(runner):
    """How often the daemon logged that the full queue refused replies: in
    a transaction applied only in part, or when published again."""
    return sum('refused one of its publishes' in line
               or 'published again (' in line
               for line in log_lines(runner.config_path, 'WARNING'))


def make_room(broker, virtual_host):
    """Empty the full queue."""
    with connect(broker, virtual_host) as connection:
        connection.channel().queue_purge('faults.full')


def wait_for_replies_in_full_queue(broker, virtual_host, bodies):
    """Wait until the replies to ``bodies`` are in the (once) full queue."""
    replies = Replies(broker, virtual_host, REPLY_KEY, queue='faults.full',
                      arguments=FULL)
    try:
        replies.wait_for(bodies, timeout=60)
    finally:
        replies.delete()


def make_room_and_wait_for(broker, virtual_host, bodies):
    """Empty the full queue; wait until the replies to ``bodies`` came."""
    make_room(broker, virtual_host)
    wait_for_replies_in_full_queue(broker, virtual_host, bodies)


def messages_kept(broker, virtual_host, queue):
    """How many messages the broker keeps in ``queue``: ready, or
    delivered and not acknowledged."""
    output = broker.ctl('list_queues', '-q', '--no-table-headers', '-p',
                        virtual_host, 'name', 'messages')
    counts = dict(line.split() for line in output.splitlines())
    return int(counts[queue])


def test_replies_a_full_queue_refuses_are_published_again_not_lost(
        full_queue_daemon, amqp_broker, amqp_vhost):
    # RabbitMQ applies the acks of such a transaction and then fails it
    # ("partial tx completion"): the requests are gone, the replies must
    # not be.
    bodies = numbered(3)
    publish(amqp_broker, amqp_vhost, bodies, 'faults.number')
    wait_for(lambda: refusals(full_queue_daemon) >= 1, 30,
             message='the broker refused no publish')
    make_room_and_wait_for(amqp_broker, amqp_vhost, bodies)
    assert queue_length(amqp_broker, amqp_vhost, 'faults.numbers') == 0
    assert not log_lines(full_queue_daemon.config_path, 'ERROR')


def test_while_a_queue_refuses_replies_no_further_request_is_acknowledged(
        full_queue_daemon, amqp_broker, amqp_vhost):
    # Acknowledged with their replies refused, requests would live on in
    # the daemon's memory only, until the queue takes the replies.
    first = numbered(1, 'first')
    publish(amqp_broker, amqp_vhost, first, 'faults.number')
    wait_for(lambda: refusals(full_queue_daemon) >= 1, 30,
             message='the broker refused no publish')
    later = numbered(6)
    publish(amqp_broker, amqp_vhost, later, 'faults.number')
    # The republish of the first reply is refused twice more meanwhile.
    wait_for(lambda: refusals(full_queue_daemon) >= 3, 30,
             message='the republish was not tried again')
    assert messages_kept(amqp_broker, amqp_vhost, 'faults.numbers') == len(
        later)
    assert any('Commits that publish where the broker refused' in line
               for line in log_lines(full_queue_daemon.config_path, 'INFO'))
    # Only the first refusal cost the connection (it closed the consumer
    # channel); the republishes' refusals cost the scratch channel.
    losses = [line for line in log_lines(full_queue_daemon.config_path,
                                         'WARNING')
              if 'Lost the connection' in line]
    assert len(losses) == 1, losses
    # A result for another destination is not held.
    declare_queue(amqp_broker, amqp_vhost, 'faults.elsewhere',
                  'faults.elsewhere')
    full_queue_daemon.server.send(gocept.amqprun.message.Message(
        {}, b'elsewhere', routing_key='faults.elsewhere'))
    transaction.commit()
    assert queue_length(amqp_broker, amqp_vhost, 'faults.elsewhere') == 1
    make_room_and_wait_for(amqp_broker, amqp_vhost, first + later)
    assert queue_length(amqp_broker, amqp_vhost, 'faults.numbers') == 0
    assert not log_lines(full_queue_daemon.config_path, 'ERROR')


def test_stop_while_replies_wait_for_a_full_queue_is_bounded_and_says_why(
        full_reply_queue, daemon, amqp_broker, amqp_vhost):
    runner = daemon(amqp_broker, amqp_vhost, 'numbers', workers=2,
                    amqp_extra=FAST_RECONNECT,
                    worker_extra=('shutdown-timeout 1',))
    publish(amqp_broker, amqp_vhost, numbered(1, 'first'), 'faults.number')
    wait_for(lambda: refusals(runner) >= 1, 30,
             message='the broker refused no publish')
    publish(amqp_broker, amqp_vhost, numbered(2), 'faults.number')
    # One worker waits for the republish, the other for its held commit.
    wait_for(lambda: runner.server.held == 1, 30,
             message='no reply was held')
    began = time.monotonic()
    assert runner.stop() == 0
    assert time.monotonic() - began < 15
    # The held requests went back to the broker; the first one's reply is
    # the one the daemon could not save, and it says so.
    assert messages_kept(amqp_broker, amqp_vhost, 'faults.numbers') == 2
    [error] = log_lines(runner.config_path, 'ERROR')
    assert 'Could not publish again the 1 message(s)' in error
    assert 'they may be lost' in error
    assert any('1 commit(s) were not carried out' in line
               for line in log_lines(runner.config_path, 'WARNING'))
    with connect(amqp_broker, amqp_vhost) as connection:
        connection.channel().queue_purge('faults.numbers')  # for the next


def test_a_stop_publishes_refused_replies_the_queue_takes_by_then(
        full_reply_queue, daemon, amqp_broker, amqp_vhost):
    runner = daemon(amqp_broker, amqp_vhost, 'numbers', workers=2,
                    amqp_extra=FAST_RECONNECT,
                    worker_extra=('shutdown-timeout 1',))
    first = numbered(1, 'first')
    publish(amqp_broker, amqp_vhost, first, 'faults.number')
    # Refused four times: the next attempt is 4 s away.
    wait_for(lambda: refusals(runner) >= 4, 30,
             message='the republish was not refused often enough')
    make_room(amqp_broker, amqp_vhost)
    assert runner.stop() == 0
    assert not log_lines(runner.config_path, 'ERROR')
    wait_for_replies_in_full_queue(amqp_broker, amqp_vhost, first)


# -- 4b. a reply the broker refuses ------------------------------------------

#: What the refused-reply tests configure: 8 workers, quick retries, a
#: max_message_size the ``:too-large`` reply exceeds.
REFUSED_OPTIONS = dict(workers=8, amqp_extra=('max_message_size 1KB',))
POISON_KINDS = ['missing-exchange', 'too-large', 'user-id']


@pytest.fixture
def outcomes(daemon):
    """body -> [IMessageHandled outcome, ...] of the daemon's messages
    (subscribed in the registry the ``daemon`` fixture cleaned)."""
    recorded = collections.defaultdict(list)

    def record(event):
        recorded[event.message.body].append(event.outcome)
    zope.component.provideHandler(
        record, (gocept.amqprun.interfaces.IMessageHandled,))
    return recorded


def publish_with_poison(amqp_broker, amqp_vhost, kind, count=300):
    """``count`` numbered messages with one poison among them (at 100);
    return (good bodies, poison body)."""
    good = numbered(count)
    poison = good[0].split(b':')[0] + b':' + kind.encode()
    publish(amqp_broker, amqp_vhost, good[:100] + [poison] + good[100:],
            'faults.refused')
    return good, poison


def assert_neighbours_unharmed(good, replies, outcomes):
    """Every good message was answered once and never failed."""
    for body in good:
        assert len(replies.copies[body]) == 1, (body, replies.copies[body])
        assert set(outcomes[body]) <= {
            gocept.amqprun.interfaces.HANDLED,
            gocept.amqprun.interfaces.RETURNED}, (body, outcomes[body])
        assert outcomes[body][-1] == gocept.amqprun.interfaces.HANDLED


@pytest.mark.parametrize('kind', POISON_KINDS)
def test_refused_reply_is_dead_lettered_alone_and_its_neighbours_commit(
        daemon, amqp_broker, amqp_vhost, replies, outcomes, kind):
    dead = Replies(amqp_broker, amqp_vhost, 'faults.dead')
    try:
        main = daemon(amqp_broker, amqp_vhost, 'refused', worker_extra=(
            'retry-delay 0.2', 'max-attempts 3',
            'dead-letter-routing-key faults.dead'), **REFUSED_OPTIONS)
        good, poison = publish_with_poison(amqp_broker, amqp_vhost, kind)
        replies.wait_for(good, timeout=30)
        dead.wait_for([poison], timeout=30)
        replies.drain(0.3)
        assert_neighbours_unharmed(good, replies, outcomes)
        assert poison not in replies.copies
        assert outcomes[poison][-1] == gocept.amqprun.interfaces.DEAD_LETTERED
        assert outcomes[poison].count(gocept.amqprun.interfaces.RETRIED) == 2
        [message] = dead.messages
        headers = message.properties['application_headers']
        assert headers['x-amqprun-attempts'] == 3
        assert headers['x-amqprun-error'].startswith('PublishRefused: ')
        # Caught before the broker saw it, or (user-id) one reconnect.
        reconnects = main.server.history.generation - 1
        assert reconnects == (1 if kind == 'user-id' else 0)
    finally:
        dead.close()


@pytest.mark.parametrize('kind', POISON_KINDS)
def test_refused_reply_without_dead_letter_never_stops_the_others(
        daemon, amqp_broker, amqp_vhost, replies, outcomes, kind):
    main = daemon(amqp_broker, amqp_vhost, 'refused',
                  worker_extra=('retry-delay 0.2',), **REFUSED_OPTIONS)
    good, poison = publish_with_poison(amqp_broker, amqp_vhost, kind)
    replies.wait_for(good, timeout=30)
    wait_for(lambda: len(faults_handlers.calls_for(poison)) >= 4, 10)
    assert_neighbours_unharmed(good, replies, outcomes)
    assert poison not in replies.copies
    assert main.thread.is_alive() and main.server.running
    assert main.server.history.generation - 1 == (
        1 if kind == 'user-id' else 0)
    after = numbered(1)
    publish(amqp_broker, amqp_vhost, after, 'faults.refused')
    replies.wait_for(after, timeout=10)


# -- 5. SIGTERM under load ---------------------------------------------------

def start_under_load(amqp_broker, amqp_vhost, tmp_path, replies,
                     processes):
    """3000 numbered messages, a daemon that has handled 500 of them.

    Returns (config, numbers, daemon process).
    """
    config = write_config(
        str(tmp_path), amqp_broker, amqp_vhost, 'numbers', workers=4,
        settings=['faults.sleep 0.002'])
    bodies = numbered(3000)
    declare_queue(amqp_broker, amqp_vhost, 'faults.numbers', 'faults.number')
    publish(amqp_broker, amqp_vhost, bodies, 'faults.number')
    first = processes(config)
    replies.wait_for_count(500, timeout=30)
    return config, bodies, first


def restart_and_wait_for_all(config, bodies, replies, processes):
    """Run the daemon again until every number was answered; stop it."""
    second = processes(config)
    replies.wait_for(bodies, timeout=60)
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0, second.output
    replies.drain(0.5)


def test_sigterm_under_load_exits_0_and_nothing_is_lost_or_doubled(
        amqp_broker, amqp_vhost, tmp_path, replies, processes):
    config, bodies, first = start_under_load(
        amqp_broker, amqp_vhost, tmp_path, replies, processes)
    first.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert first.wait(30) == 0, first.output
    stopped_in = time.monotonic() - signalled
    assert stopped_in < 5, 'SIGTERM took %.1f s' % stopped_in
    handled_before = len(replies.copies)
    assert handled_before < len(bodies)
    restart_and_wait_for_all(config, bodies, replies, processes)
    report('sigterm', *replies.check(bodies))
    assert not log_lines(config, 'ERROR')
    assert not log_lines(config, 'CRITICAL')


# -- 6. kill -9 under load ---------------------------------------------------

def test_kill_9_under_load_and_restart_loses_nothing(
        amqp_broker, amqp_vhost, tmp_path, replies, processes):
    config, bodies, first = start_under_load(
        amqp_broker, amqp_vhost, tmp_path, replies, processes)
    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    assert len(replies.copies) < len(bodies)
    restart_and_wait_for_all(config, bodies, replies, processes)
    report('kill -9', *replies.check(bodies))


# -- 7. long handlers --------------------------------------------------------

def test_handler_sleeping_past_the_heartbeat_keeps_the_connection(
        proxy, daemon, amqp_broker, amqp_vhost, replies):
    daemon(amqp_broker, amqp_vhost, 'slow', workers=1,
           amqp_port=proxy.port, amqp_extra=['heartbeat_interval 1'])
    [body] = numbered(1)
    publish(amqp_broker, amqp_vhost, [body], 'faults.slow',
            headers={'sleep': '3.5'})
    replies.wait_for([body], timeout=15)
    replies.drain(0.5)
    assert replies.copies == {body: [False]}
    assert proxy.accepted == 1  # never reconnected
    assert proxy.open_connections == 1


@pytest.fixture
def short_consumer_timeout(amqp_broker):
    """The broker closes channels whose deliveries stay unacked for 2 s.

    RabbitMQ checks once per channel tick (default: a minute); both
    settings are read when a channel opens, so the daemon must connect
    after this fixture. The previous values are restored afterwards.
    """
    names = ('consumer_timeout', 'channel_tick_interval')
    previous = amqp_broker.ctl('eval', '{%s}.' % ', '.join(
        'application:get_env(rabbit, %s)' % name for name in names))
    amqp_broker.ctl(
        'eval', 'application:set_env(rabbit, consumer_timeout, 2000), '
        'application:set_env(rabbit, channel_tick_interval, 250).')
    yield 2.0
    previous = previous.strip().strip('{}').split('},{')
    restore = []
    for name, value in zip(names, previous):
        if value.startswith('ok,'):
            restore.append('application:set_env(rabbit, %s, %s)'
                           % (name, value[3:].strip('{}')))
        else:
            restore.append('application:unset_env(rabbit, %s)' % name)
    amqp_broker.ctl('eval', ', '.join(restore) + '.')


def test_handler_exceeding_consumer_timeout_is_redelivered_flagged_once(
        daemon, amqp_broker, amqp_vhost, replies, short_consumer_timeout):
    # Decision: the broker closes the channel and requeues the delivery;
    # the slow handler's commit fails (its transaction aborts, nothing of
    # it is published), the server logs a WARNING and reconnects, and the
    # redelivery -- flagged -- is handled again. One reply arrives, from
    # the redelivery; the time-out counts as a failed attempt.
    main = daemon(amqp_broker, amqp_vhost, 'slow', workers=2,
                  amqp_extra=FAST_RECONNECT)
    [body] = numbered(1)
    publish(amqp_broker, amqp_vhost, [body], 'faults.slow',
            headers={'sleep': '4.5'})
    replies.wait_for([body], timeout=20)
    # The slow first attempt finishes, its commit fails.
    wait_for(lambda: main.server.tasks.unfinished_tasks == 0, timeout=10)
    replies.drain(0.5)
    assert replies.copies == {body: [True]}
    assert [flag for flag, _ in faults_handlers.calls_for(body)] == [
        False, True]
    warnings = log_lines(main.config_path, 'WARNING')
    assert any('consumer_timeout' in line for line in warnings), warnings


# -- 8. ISender after a reconnect --------------------------------------------

class SendingThread:
    """A thread of our own (no worker) that sends through ISender."""

    def __init__(self, name):
        self.requests = []
        self.results = []
        self.thread = threading.Thread(
            target=self._run, name='amqprun-test-%s' % name)
        self._wake = threading.Event()
        self.thread.start()

    def _run(self):
        sender = zope.component.getUtility(
            gocept.amqprun.interfaces.ISender)
        while True:
            self._wake.wait()
            self._wake.clear()
            while self.requests:
                body = self.requests.pop(0)
                if body is None:
                    return
                try:
                    sender.send(gocept.amqprun.message.Message(
                        {}, body, routing_key=REPLY_KEY))
                    transaction.commit()
                    self.results.append((body, None))
                except Exception as e:
                    transaction.abort()
                    self.results.append((body, e))

    def send(self, body, timeout=70):
        """Send ``body`` and commit in the thread; return the error."""
        count = len(self.results)
        self.requests.append(body)
        self._wake.set()
        wait_for(lambda: len(self.results) > count, timeout)
        return self.results[-1][1]

    def stop(self):
        self.requests.append(None)
        self._wake.set()
        self.thread.join(10)


def test_isender_in_other_threads_works_again_after_a_reconnect(
        proxy, daemon, amqp_broker, amqp_vhost, replies):
    main = daemon(amqp_broker, amqp_vhost, 'numbers', workers=1,
                  amqp_port=proxy.port, amqp_extra=FAST_RECONNECT)
    bodies = numbered(5)
    sending = SendingThread('sender')
    try:
        assert sending.send(bodies[0]) is None
        proxy.cut()
        # Sent during the outage: waits for the new connection.
        assert sending.send(bodies[1]) is None
        wait_for(lambda: proxy.accepted >= 2 and main.server.running)
        assert sending.send(bodies[2]) is None
        other = SendingThread('other')
        try:
            assert other.send(bodies[3]) is None
        finally:
            other.stop()
    finally:
        sending.stop()
    # and the test's own thread
    zope.component.getUtility(gocept.amqprun.interfaces.ISender).send(
        gocept.amqprun.message.Message({}, bodies[4], routing_key=REPLY_KEY))
    transaction.commit()
    replies.wait_for(bodies, timeout=20)
    replies.drain(0.5)
    assert {body: len(copies) for body, copies in replies.copies.items()
            } == {body: 1 for body in bodies}


# -- 9. start-up failures ----------------------------------------------------

def test_unreachable_broker_at_startup_exits_non_zero_with_one_critical_line(
        amqp_broker, amqp_vhost, tmp_path, processes):
    port = free_port()
    config = write_config(
        str(tmp_path), amqp_broker, amqp_vhost, 'numbers', amqp_port=port,
        amqp_extra=['startup_attempts 3', 'reconnect_delay 0.1',
                    'connect_timeout 1'])
    started = time.monotonic()
    process = processes(config)
    assert process.wait(30) != 0
    assert time.monotonic() - started < 15
    [critical] = log_lines(config, 'CRITICAL')
    assert '127.0.0.1:%d' % port in critical
    assert 'gave up after 3 attempts' in critical
    assert len(log_lines(config, 'WARNING')) >= 2  # each retry is logged


@pytest.mark.parametrize('change', ['password', 'vhost'])
def test_refused_credentials_exit_non_zero_at_once_naming_user_and_vhost(
        amqp_broker, amqp_vhost, tmp_path, processes, change):
    broker = gocept.amqprun.testing.Broker(
        amqp_broker.hostname, amqp_broker.port, amqp_broker.username,
        'wrong-password' if change == 'password' else amqp_broker.password)
    vhost = amqp_vhost if change == 'password' else 'faults-no-such-vhost'
    config = write_config(str(tmp_path), broker, vhost, 'numbers',
                          amqp_extra=['startup_attempts 5',
                                      'reconnect_delay 2'])
    started = time.monotonic()
    process = processes(config)
    assert process.wait(30) != 0
    # at once: no retries with their 2 s delays
    assert time.monotonic() - started < 5
    [critical] = log_lines(config, 'CRITICAL')
    assert repr(amqp_broker.username) in critical
    assert repr(vhost) in critical
    assert 'refused' in critical
