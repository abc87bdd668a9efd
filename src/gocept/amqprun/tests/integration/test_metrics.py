"""``<metrics>`` end to end: the daemon (``main()`` in-process) against the
real broker, scraped with urllib and read back with prometheus_client's
parser; ``amqprun-status`` as the console script and in-process."""
import json
import re
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import prometheus_client.parser
import pytest
import transaction

import gocept.amqprun.channelops
import gocept.amqprun.message
import gocept.amqprun.status
import gocept.amqprun.testing
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.integration import handlers
from gocept.amqprun.tests.integration import test_faults
from gocept.amqprun.tests.integration.faults_tally import numbered
from gocept.amqprun.tests.integration.faults_tally import publish
from gocept.amqprun.tests.integration.test_faults import FAST_RECONNECT
from gocept.amqprun.tests.integration.test_faults import free_port
from gocept.amqprun.tests.integration.test_main import zcml


#: The test configuration plus a ``<metrics>`` section.
TEMPLATE = gocept.amqprun.testing.CONFIG_TEMPLATE + """\
<metrics>
  address ${metrics_address}
  liveness-timeout ${liveness_timeout}
</metrics>
"""


@pytest.fixture(autouse=True)
def reset_handlers():
    handlers.reset()
    yield
    handlers.reset()


@pytest.fixture
def daemon(tmp_path, clean_registry, amqp_broker, amqp_vhost):
    """Factory: ``daemon(zcml, broker=..., port=..., **make_config
    options)`` runs ``main()`` with ``<metrics>``; returns the started
    ``MainThread`` with ``config`` and ``url(path)``; stopped after."""
    started = []

    def start(site_zcml, broker=amqp_broker, virtual_host=amqp_vhost,
              port=None, liveness_timeout=30, **options):
        port = free_port() if port is None else port
        config = gocept.amqprun.testing.make_config(
            str(tmp_path), broker, virtual_host, site_zcml, config=TEMPLATE,
            name='metrics-%d' % len(started),
            metrics_address='127.0.0.1:%d' % port,
            liveness_timeout=liveness_timeout, **options)
        runner = gocept.amqprun.testing.MainThread(
            config, log_path=gocept.amqprun.testing.log_path_of(config, {}))
        started.append(runner)
        runner.start()
        runner.config = config
        runner.url = 'http://127.0.0.1:%d' % port
        return runner

    yield start
    for runner in started:
        if runner.thread.is_alive():
            assert runner.stop() == 0
    assert not [thread for thread in threading.enumerate()
                if thread.name == 'amqprun-metrics']


def get(url, timeout=5):
    """``(HTTP status, body)`` of a GET with urllib."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def probe(runner, path):
    """``(HTTP status, JSON document)`` of /healthz or /readyz."""
    status, body = get(runner.url + path)
    return status, json.loads(body)


def scrape(runner):
    """Every sample of /metrics, parsed: {(name, labels): value}."""
    status, body = get(runner.url + '/metrics')
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in prometheus_client.parser
            .text_string_to_metric_families(body.decode('utf-8'))
            for sample in family.samples}


def sample(runner, name, **labels):
    return scrape(runner).get((name, tuple(sorted(labels.items()))))


def wait_for_sample(runner, name, expected, timeout=10, **labels):
    wait_for(lambda: sample(runner, name, **labels) == expected, timeout,
             message='%s%r is %r, not %r' % (
                 name, labels, sample(runner, name, **labels), expected))


def test_counters_equal_the_messages_sent_and_the_parser_reads_the_page(
        daemon, amqp_client):
    runner = daemon(zcml('echo', 'fail_then_reply'), workers=3)
    amqp_client.expect_message_on('test.response')
    for number in range(20):
        amqp_client.send_message(b'%d' % number, 'test.routing')
    amqp_client.wait_for_messages(20)
    wait_for_sample(runner, 'amqprun_messages_total', 20, handler='echo',
                    outcome='handled')
    runner.server.send(gocept.amqprun.message.Message(
        {}, b'outside', routing_key='test.response'))
    transaction.commit()
    wait_for_sample(runner, 'amqprun_sent_messages_total', 1,
                    outcome='committed')
    samples = scrape(runner)

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]
    assert value('amqprun_messages_total', handler='fail_then_reply',
                 outcome='handled') == 0
    assert value('amqprun_handling_seconds_count', handler='echo') == 20
    assert value('amqprun_commit_batch_size_sum') == 21
    assert value('amqprun_commit_seconds_count') >= 1
    assert value('amqprun_connected') == 1
    assert value('amqprun_ready') == 1
    assert value('amqprun_workers_alive') == 3
    assert value('amqprun_workers_configured') == 3
    assert value('amqprun_broker_info', node='%s:%s' % (
        runner.server.parameters.hostname, runner.server.parameters.port)
    ) == 1
    assert value('process_resident_memory_bytes') > 0
    result = subprocess.run(
        [gocept.amqprun.testing.script('amqprun-status'), runner.config],
        capture_output=True, text=True, timeout=30,
        env=gocept.amqprun.testing.subprocess_environment())
    assert result.returncode == 0, result.stderr
    assert re.match(r'ready: node \S+, handled 20, failed 0, backlog 0\n$',
                    result.stdout), result.stdout


def test_retries_and_the_dead_letter_are_counted(daemon, amqp_client):
    handlers.failures_left[b'poison'] = 10
    runner = daemon(zcml('fail_then_reply'), port=0, worker_extra='\n  '.join(
        ['max-attempts 3', 'retry-delay 0',
         'dead-letter-routing-key test.dead']))
    # Port 0: the INFO line tells which one the daemon listens on.
    port = re.search(r'Serving metrics on http://127\.0\.0\.1:(\d+)/metrics',
                     runner.log).group(1)
    runner.url = 'http://127.0.0.1:%s' % port
    amqp_client.expect_message_on('test.dead')
    amqp_client.send_message(b'poison', 'test.fail')
    amqp_client.wait_for_message()
    wait_for_sample(runner, 'amqprun_messages_total', 1,
                    handler='fail_then_reply', outcome='dead-lettered')
    assert sample(runner, 'amqprun_messages_total',
                  handler='fail_then_reply', outcome='retried') == 2
    assert sample(runner, 'amqprun_messages_total',
                  handler='fail_then_reply', outcome='handled') == 0
    ready, document = gocept.amqprun.status.ask(runner.url + '/readyz', 5)
    assert ready and (document['handled'], document['failed']) == (0, 3)


def test_broker_restart_turns_readiness_503_and_back_while_alive(
        daemon, restartable_broker):  # noqa: F811 (the fixture)
    broker, vhost = restartable_broker
    runner = daemon(zcml('echo'), broker=broker, virtual_host=vhost,
                    amqp_extra='\n  '.join(
                        ('heartbeat_interval 2',) + FAST_RECONNECT))
    assert probe(runner, '/readyz')[0] == 200
    restart = threading.Thread(target=broker.node.restart,
                               name='test-broker-restart')
    restart.start()
    try:
        # Within the heartbeat bound (2 x 2 s) of the broker going away.
        wait_for(lambda: probe(runner, '/readyz')[0] == 503, 10)
        status, document = probe(runner, '/readyz')
        assert document['status'] == 'reconnecting', document
        assert document['reason'].startswith('Lost the connection to ')
        status, document = probe(runner, '/healthz')
        assert (status, document['status']) == (200, 'alive')
        assert gocept.amqprun.status.run([runner.config]) == 1
    finally:
        restart.join(120)
    wait_for(lambda: probe(runner, '/readyz')[0] == 200, 60)
    assert probe(runner, '/healthz')[0] == 200
    assert sample(runner, 'amqprun_reconnects_total') >= 1
    losses = sum(value for (name, _), value in scrape(runner).items()
                 if name == 'amqprun_connection_losses_total')
    assert losses >= 1


def test_a_queue_refusing_replies_turns_readiness_503_until_they_are_in(
        full_reply_queue, daemon, amqp_broker, amqp_vhost):
    runner = daemon(test_faults.zcml('numbers'), workers=2,
                    amqp_extra='\n  '.join(FAST_RECONNECT))
    bodies = numbered(2)
    publish(amqp_broker, amqp_vhost, bodies, 'faults.number')
    wait_for(lambda: probe(runner, '/readyz')[1]['status'] == 'republishing',
             30, message='readiness never said republishing')
    status, document = probe(runner, '/readyz')
    assert status == 503
    assert document['reason'].startswith('A queue refused ')
    assert sample(runner, 'amqprun_messages_to_republish') >= 1
    test_faults.make_room_and_wait_for(amqp_broker, amqp_vhost, bodies)
    wait_for(lambda: probe(runner, '/readyz')[0] == 200, 30)
    assert sample(runner, 'amqprun_messages_to_republish') == 0
    assert sample(runner, 'amqprun_commits_held') == 0


@pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnhandledThreadExceptionWarning')
def test_a_worker_thread_that_dies_makes_healthz_503(daemon, amqp_client):
    runner = daemon(zcml('die'), workers=2)
    assert probe(runner, '/healthz')[0] == 200
    amqp_client.send_message(b'x', 'test.die')
    wait_for(lambda: probe(runner, '/healthz')[0] == 503, 10)
    document = probe(runner, '/healthz')[1]
    assert document['status'] == 'worker-died'
    assert '1 of 2 worker thread(s) died: amqprun-worker-' in (
        document['reason'])
    assert sample(runner, 'amqprun_workers_alive') == 1
    assert probe(runner, '/readyz')[0] == 200  # ready, but not alive


class Wedge(gocept.amqprun.channelops.ChannelOp):
    """An op that keeps the I/O thread until it is released."""

    def __init__(self):
        super().__init__(None)
        self.release = threading.Event()

    def execute(self, channel):
        self.release.wait(30)


def test_a_wedged_io_thread_makes_healthz_503_until_it_turns_again(daemon):
    runner = daemon(zcml('echo'), liveness_timeout=1)
    wedge = Wedge()
    runner.server.submit(wedge)
    try:
        wait_for(lambda: probe(runner, '/healthz')[0] == 503, 10)
        document = probe(runner, '/healthz')[1]
        assert document['status'] == 'stalled'
        assert 'The I/O loop has not turned for' in document['reason']
    finally:
        wedge.release.set()
    wedge.wait(10)
    wait_for(lambda: probe(runner, '/healthz')[0] == 200, 10)


def test_an_address_in_use_is_one_critical_line_and_exit_1(daemon):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match='status 1') as info:
            daemon(zcml('echo'), port=port)
    critical = [line for line in str(info.value).splitlines()
                if ' CRITICAL ' in line]
    assert len(critical) == 1
    assert ('Cannot start: Cannot serve metrics on 127.0.0.1:%d (<metrics> '
            'address): Address already in use' % port) in critical[0]


def test_status_cannot_ask_when_nothing_listens(daemon, capsys):
    runner = daemon(zcml('echo'))
    runner.stop()
    assert gocept.amqprun.status.run([runner.config]) == 2
    assert 'Connection refused' in capsys.readouterr().err


def test_a_client_that_sends_nothing_does_not_hold_up_the_probes(daemon):
    runner = daemon(zcml('echo'))
    port = int(runner.url.rsplit(':', 1)[1])
    with socket.create_connection(('127.0.0.1', port)):
        status, _ = get(runner.url + '/healthz', timeout=2)
    assert status == 200
