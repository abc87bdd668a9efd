"""Tests for gocept.amqprun.metrics: health, readiness, the counters and
the WSGI application, with a FakeServer, fake workers and a fake clock
(no socket; the HTTP server is tested in tests/integration/test_metrics.py).
"""
import io
import json
import wsgiref.util

import prometheus_client.parser
import pytest
import zope.event

import gocept.amqprun.interfaces
from gocept.amqprun.interfaces import FileSent
from gocept.amqprun.interfaces import FileWritten
from gocept.amqprun.interfaces import MessageHandled
from gocept.amqprun.interfaces import ProcessStopping
from gocept.amqprun.interfaces import SendFinished
from gocept.amqprun.metrics import Application
from gocept.amqprun.metrics import Health
from gocept.amqprun.metrics import Metrics
from gocept.amqprun.tests.unit.fakes import FakeServer
from gocept.amqprun.tests.unit.fakes import received_message


class FakeWorker:
    """A worker thread that is alive until it dies."""

    def __init__(self, name, alive=True):
        self.name = name
        self.alive = alive

    def is_alive(self):
        return self.alive


class FakePool:

    def __init__(self, amount=2):
        self.amount = amount
        self.workers = [FakeWorker('amqprun-worker-%d' % (number + 1))
                        for number in range(amount)]


class Clock:
    """Monotonic and wall clock in one, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def server():
    server = FakeServer()
    server.history.connected()
    return server


@pytest.fixture
def pool():
    return FakePool()


@pytest.fixture
def health(server, pool, clock):
    return Health(server, pool, liveness_timeout=30, expects_consumers=True,
                  clock=clock, wall_clock=clock)


@pytest.fixture
def metrics(health, registry):
    metrics = Metrics(health, ['alpha', 'beta'])
    for subscriber, interface in metrics.subscriptions():
        registry.registerHandler(subscriber, (interface,))
    return metrics


def families(metrics):
    """The exposition page read back by prometheus_client's parser."""
    text = prometheus_client.generate_latest(metrics.registry).decode()
    return {family.name: family for family in
            prometheus_client.parser.text_string_to_metric_families(text)}


def value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


# -- liveness ----------------------------------------------------------------

def test_live_while_the_io_loop_turns_and_every_worker_lives(
        health, server, clock):
    server.last_turn = clock.now
    clock.now += 30
    assert health.liveness() == (True, 'alive', None)


def test_a_stalled_io_loop_is_not_live(health, server, clock):
    server.last_turn = clock.now
    clock.now += 31
    live, status, reason = health.liveness()
    assert (live, status) == (False, 'stalled')
    assert reason == ('The I/O loop has not turned for 31.0 s '
                      '(liveness-timeout 30 s)')


def test_an_io_loop_that_never_started_counts_from_the_start(
        health, clock):
    clock.now += 29
    assert health.liveness()[0]
    clock.now += 2
    assert health.liveness()[1] == 'stalled'


def test_a_dead_worker_thread_is_not_live(health, server, pool, clock):
    server.last_turn = clock.now
    pool.workers[1].alive = False
    assert health.liveness() == (
        False, 'worker-died', '1 of 2 worker thread(s) died: amqprun-worker-2')


def test_stopping_is_live_although_workers_end(health, metrics, pool):
    zope.event.notify(ProcessStopping())
    pool.workers[0].alive = False
    assert health.liveness()[:2] == (True, 'stopping')


# -- readiness ---------------------------------------------------------------

def test_ready_when_connected_and_consuming(health):
    assert health.readiness() == (True, 'ready', None)
    assert health.node() == 'localhost:5672'


def test_connecting_before_the_first_connection(health, server):
    server.running = False
    assert health.readiness() == (
        False, 'connecting', 'Connecting to the AMQP broker at '
        'localhost:5672')
    assert health.node() is None


def test_reconnecting_names_the_loss(health, server):
    server.running = False
    server.history.lose(ConnectionResetError('reset by peer'), 0)
    assert health.readiness() == (
        False, 'reconnecting', 'Lost the connection to localhost:5672: '
        'ConnectionResetError: reset by peer')


def test_blocked_by_the_broker_is_not_ready(health, server):
    server.blocked = 'low on memory'
    assert health.readiness() == (
        False, 'blocked', 'The broker blocks publishing: low on memory')


def test_refused_messages_waiting_to_be_published_again_is_not_ready(
        health, server):
    server.republishing = 3
    assert health.readiness() == (
        False, 'republishing', 'A queue refused 3 message(s); commits that '
        'publish there wait until they are published again')


def test_node_comes_from_the_server_when_it_knows_it(health, server):
    server.node = 'rabbit-2:5672'
    assert health.node() == 'rabbit-2:5672'


def test_not_consuming_is_not_ready(health, server):
    server.consuming = False
    assert health.readiness()[:2] == (False, 'not-consuming')


def test_not_consuming_on_purpose_is_ready(server, pool, clock):
    server.consuming = False
    health = Health(server, pool, 30, expects_consumers=False, clock=clock)
    assert health.readiness()[0]


def test_stopping_is_not_ready(health, metrics):
    zope.event.notify(ProcessStopping())
    assert health.readiness()[:2] == (False, 'stopping')


def test_since_is_when_the_status_began(health, server, clock):
    clock.now = 0
    assert health.document(health.readiness) == (True, {
        'status': 'ready', 'reason': None,
        'since': '1970-01-01T00:00:00+00:00'})
    clock.now = 60
    health.sample()
    since = health.document(health.readiness)[1]['since']
    assert since == '1970-01-01T00:00:00+00:00'
    server.running = False
    clock.now = 75
    health.sample()
    clock.now = 90
    ok, document = health.document(health.readiness)
    assert (ok, document['status']) == (False, 'connecting')
    assert document['since'] == '1970-01-01T00:01:15+00:00'


# -- counters ----------------------------------------------------------------

def handled(name, outcome, duration=0.5):
    return MessageHandled(received_message(), name, outcome, duration)


def test_every_handler_and_outcome_starts_at_zero(metrics):
    for name in ('alpha', 'beta'):
        for outcome in gocept.amqprun.interfaces.OUTCOMES:
            assert value(metrics, 'amqprun_messages_total', handler=name,
                         outcome=outcome) == 0
        assert value(metrics, 'amqprun_handling_seconds_count',
                     handler=name) == 0


def test_outcomes_are_counted_by_handler(metrics):
    for event in [handled('alpha', 'handled'), handled('alpha', 'handled'),
                  handled('alpha', 'retried'), handled('beta', 'handled', 2)]:
        zope.event.notify(event)
    assert value(metrics, 'amqprun_messages_total', handler='alpha',
                 outcome='handled') == 2
    assert value(metrics, 'amqprun_messages_total', handler='alpha',
                 outcome='retried') == 1
    assert value(metrics, 'amqprun_handling_seconds_count',
                 handler='alpha') == 3
    assert value(metrics, 'amqprun_handling_seconds_sum',
                 handler='beta') == 2
    assert metrics.count(('handled',)) == 3


def test_commits_are_observed(metrics):
    metrics.on_commit(3, 0.004)
    assert value(metrics, 'amqprun_commit_batch_size_sum') == 3
    assert value(metrics, 'amqprun_commit_batch_size_bucket', le='2.0') == 0
    assert value(metrics, 'amqprun_commit_seconds_bucket', le='0.005') == 1


def test_sends_outside_handlers_are_counted_by_outcome(metrics):
    zope.event.notify(SendFinished(2))
    zope.event.notify(SendFinished(1, RuntimeError('failed')))
    assert value(metrics, 'amqprun_sent_messages_total',
                 outcome='committed') == 2
    assert value(metrics, 'amqprun_sent_messages_total',
                 outcome='failed') == 1


def test_files_are_counted_by_directory(metrics):
    zope.event.notify(FileWritten('/out', 'a'))
    zope.event.notify(FileWritten('/out', 'b', OSError('full')))
    zope.event.notify(FileSent('/in', 'c'))
    zope.event.notify(FileSent('/in', 'd', OSError('gone')))
    for name in ('amqprun_files_written_total',
                 'amqprun_file_write_errors_total'):
        assert value(metrics, name, directory='/out') == 1
    for name in ('amqprun_files_sent_total',
                 'amqprun_file_send_failures_total'):
        assert value(metrics, name, directory='/in') == 1


def test_state_is_read_when_scraped(metrics, server, clock):
    server.last_turn = clock.now - 2
    server.tasks.put('waiting')
    server.tasks.put('taken')
    server.tasks.get()
    server.history.lose(EOFError(), 0)
    server.history.connected()
    server.history.lose(TimeoutError('timed out'), 0)
    server.history.connected()
    assert value(metrics, 'amqprun_deliveries_waiting') == 1
    assert value(metrics, 'amqprun_messages_in_handlers') == 1
    assert value(metrics, 'amqprun_io_loop_idle_seconds') == 2
    assert value(metrics, 'amqprun_workers_alive') == 2
    assert value(metrics, 'amqprun_workers_configured') == 2
    assert value(metrics, 'amqprun_connected') == 1
    assert value(metrics, 'amqprun_consuming') == 1
    assert value(metrics, 'amqprun_blocked') == 0
    assert value(metrics, 'amqprun_commits_held') == 0
    assert value(metrics, 'amqprun_messages_to_republish') == 0
    assert value(metrics, 'amqprun_ready') == 1
    assert value(metrics, 'amqprun_live') == 1
    assert value(metrics, 'amqprun_reconnects_total') == 2
    assert value(metrics, 'amqprun_connection_losses_total',
                 reason='network') == 1
    assert value(metrics, 'amqprun_connection_losses_total',
                 reason='timeout') == 1
    assert value(metrics, 'amqprun_connection_losses_total',
                 reason='heartbeat') == 0
    assert value(metrics, 'amqprun_broker_info',
                 node='localhost:5672') == 1


def test_the_parser_reads_the_whole_page(metrics):
    zope.event.notify(handled('alpha', 'dead-lettered'))
    found = families(metrics)
    assert found['amqprun_messages'].type == 'counter'
    assert found['amqprun_handling_seconds'].type == 'histogram'
    assert found['amqprun_broker_info'].type == 'gauge'  # info, as text
    assert 'process_cpu_seconds' in found
    assert 'python_info' in found


def test_status_adds_node_and_counts(metrics, server):
    zope.event.notify(handled('alpha', 'handled'))
    zope.event.notify(handled('beta', 'retried'))
    zope.event.notify(handled('beta', 'returned'))
    zope.event.notify(handled('beta', 'error-handled'))
    server.tasks.put('waiting')
    ready, document = metrics.status()
    assert ready
    assert {key: document[key] for key in (
        'status', 'node', 'handled', 'failed', 'backlog')} == {
            'status': 'ready', 'node': 'localhost:5672', 'handled': 1,
            'failed': 2, 'backlog': 1}


# -- the WSGI application ----------------------------------------------------

def request(metrics, path):
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ['PATH_INFO'] = path
    environ['wsgi.input'] = io.BytesIO()
    answer = {}

    def start_response(status, headers):
        answer['status'], answer['headers'] = status, dict(headers)
    body = b''.join(Application(metrics)(environ, start_response))
    return answer['status'], answer['headers'], body


def test_readyz_answers_503_with_the_state_as_json(metrics, server):
    server.running = False
    status, headers, body = request(metrics, '/readyz')
    assert status == '503 Service Unavailable'
    assert headers['Content-Type'] == 'application/json'
    assert json.loads(body)['status'] == 'connecting'


def test_healthz_answers_200_while_alive(metrics, server, clock):
    server.last_turn = clock.now
    status, _, body = request(metrics, '/healthz')
    assert status == '200 OK'
    assert json.loads(body)['status'] == 'alive'


def test_metrics_answers_the_text_format(metrics):
    status, headers, body = request(metrics, '/metrics')
    assert status == '200 OK'
    assert headers['Content-Type'].startswith('text/plain')
    assert b'amqprun_messages_total{handler="alpha"' in body


def test_other_paths_are_not_found(metrics):
    status, _, body = request(metrics, '/')
    assert status == '404 Not Found'
    assert b'/metrics' in body
