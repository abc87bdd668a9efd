"""The ``server`` script as an operator runs it: a separate process."""
import os
import signal
import subprocess
import sys

import pytest

import gocept.amqprun.testing


EXAMPLE = os.path.join(os.path.dirname(__file__), '..', '..', '..', '..',
                       '..', 'examples', 'quickstart')


def server(config, **kw):
    """Run the ``server`` console script to its end."""
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), 'server'), config],
        capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture
def example_config(amqp_broker, amqp_vhost, tmp_path):
    """The quick start's app.conf for this test's broker."""
    with open(os.path.join(EXAMPLE, 'app.conf.in')) as f:
        template = f.read()
    return gocept.amqprun.testing.write_config(
        str(tmp_path), '', template,
        dict(hostname=amqp_broker.hostname, port=amqp_broker.port,
             username=amqp_broker.username, password=amqp_broker.password,
             virtual_host=amqp_vhost, here=os.path.abspath(EXAMPLE)))


@pytest.fixture
def example_server(example_config):
    """The quick start daemon as a subprocess (killed after the test)."""
    process = gocept.amqprun.testing.ServerProcess(
        example_config, env=dict(os.environ, PYTHONPATH=EXAMPLE))
    yield process
    process.kill()


def test_readme_example_replies_and_stops_cleanly_on_sigterm(
        example_server, amqp_client):
    amqp_client.expect_message_on('test.thank.messages')
    example_server.start().wait_for_output('Process started')
    amqp_client.send_message(b'Hi', 'test.routing', message_id='<q@s>')
    reply = amqp_client.wait_for_message()
    assert reply.body == 'Thank you for your message.'
    assert reply.properties['content_type'] == 'text/plain'
    assert reply.properties['correlation_id'] == '<q@s>'
    assert reply.properties['application_headers']['references'] == '<q@s>'
    example_server.signal(signal.SIGTERM)
    assert example_server.wait(30) == 0
    assert 'Received signal 15, terminating.' in example_server.output
    assert 'Exiting' in example_server.output


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_with_pending_messages_exits_zero_and_loses_nothing(
        example_server, amqp_client, signum):
    example_server.start().wait_for_output('Process started')
    for number in range(50):
        amqp_client.send_message(str(number), 'test.routing')
    example_server.signal(signum)
    assert example_server.wait(30) == 0
    handled = example_server.output.count('Handled message')
    assert handled + amqp_client.queue_length('test.queue') >= 50
    amqp_client.channel.queue_purge('test.queue')


def test_invalid_config_names_file_line_and_problem(tmp_path):
    config = tmp_path / 'bad.conf'
    config.write_text('<amqp-server>\n  port 5672\n</amqp-server>\n')
    result = server(str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(config) in lines[0]
    assert 'line' in lines[0]


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = server(str(tmp_path / 'missing.conf'))
    assert result.returncode == 2
    assert 'missing.conf' in result.stderr


def test_usage_error_without_config_file():
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), 'server')],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert 'usage: server' in result.stderr


def write(tmp_path, zcml, amqp_broker, amqp_vhost):
    mapping = dict(amqp_broker.config_mapping(amqp_vhost), workers=1,
                   settings='', amqp_extra='', worker_extra='',
                   log_level='INFO', log_path='STDOUT')
    return gocept.amqprun.testing.write_config(
        str(tmp_path), zcml, gocept.amqprun.testing.CONFIG_TEMPLATE, mapping)


def the_critical_line_of_a_failed_start(config):
    """Run the server script, which must fail: return its one CRITICAL line.
    """
    result = server(config)
    assert result.returncode == 1
    critical = [line for line in result.stdout.splitlines()
                if 'CRITICAL' in line]
    assert len(critical) == 1, result.stdout
    assert 'Cannot connect' not in result.stdout
    return critical[0]


def test_zcml_error_names_the_file_and_exits_non_zero(
        tmp_path, amqp_broker, amqp_vhost):
    config = write(tmp_path, '<configure><utility component="no.such.x"/>'
                   '</configure>', amqp_broker, amqp_vhost)
    critical = the_critical_line_of_a_failed_start(config)
    assert 'Invalid ZCML file' in critical
    assert 'site.zcml' in critical


def test_two_handlers_on_one_queue_is_a_configuration_error(
        tmp_path, amqp_broker, amqp_vhost):
    config = write(tmp_path, """
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="gocept.amqprun" />
  <utility component="gocept.amqprun.tests.integration.handlers.echo"
           name="one" />
  <utility component="gocept.amqprun.tests.integration.handlers.echo"
           name="two" />
</configure>""", amqp_broker, amqp_vhost)
    result = server(config)
    assert result.returncode == 1
    assert "Queue 'test.queue' is bound to two handlers" in result.stdout


def test_queue_existing_with_other_arguments_is_one_critical_line(
        tmp_path, amqp_broker, amqp_vhost, amqp_client):
    amqp_client.channel.queue_declare(
        'test.queue.clash', durable=True, auto_delete=False,
        arguments={'x-queue-type': 'quorum'})
    config = write(tmp_path, """
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="gocept.amqprun" />
  <utility name="clash" component=
    "gocept.amqprun.tests.integration.handlers.classic_on_a_quorum_queue" />
</configure>""", amqp_broker, amqp_vhost)
    critical = the_critical_line_of_a_failed_start(config)
    assert "The broker refused queue 'test.queue.clash'" in critical
    assert 'PRECONDITION_FAILED' in critical
    amqp_client.channel.queue_delete('test.queue.clash')
