"""The daemon over TLS against a real TLS listener.

The README example (``examples/quickstart``) runs as the ``server``
script with its ``<amqp-server>`` section extended by TLS keys, against
the session's TLS node (``amqp_tls_broker``: verifies a client certificate
when shown one) and the one that requires a client certificate
(``amqp_mtls_broker``). Test messages go in through the nodes' plain
AMQP port. Start-ups that must fail run the script to its end and look at
its one CRITICAL line.
"""
import os
import ssl
import subprocess
import sys
import threading
import time

import pytest

import gocept.amqprun.interfaces
import gocept.amqprun.testing
from gocept.amqprun.connection import Parameters
from gocept.amqprun.connection import connect
from gocept.amqprun.server import Server
from gocept.amqprun.testing import Client
from gocept.amqprun.testing.broker import temporary_vhost


EXAMPLE = os.path.join(os.path.dirname(__file__), '..', '..', '..', '..',
                       '..', 'examples', 'quickstart')

#: Start-up attempts of a daemon that must fail: a refusal that looks
#: like a network error is retried that often, not forever.
STARTUP_ATTEMPTS = 2


@pytest.fixture(scope='module')
def tls_vhost(amqp_tls_broker):
    """A virtual host of the TLS node for this module."""
    with temporary_vhost(amqp_tls_broker) as name:
        yield name


@pytest.fixture(scope='module')
def mtls_vhost(amqp_mtls_broker):
    """A virtual host of the node requiring client certificates."""
    with temporary_vhost(amqp_mtls_broker) as name:
        yield name


def example_config(directory, broker, virtual_host, *tls_lines, port=None):
    """The quick start's app.conf for the TLS port of ``broker`` (or
    ``port``), with ``tls_lines`` (and few start-up attempts) in
    ``<amqp-server>``."""
    with open(os.path.join(EXAMPLE, 'app.conf.in')) as f:
        template = f.read()
    extra = ''.join('  %s\n' % line for line in tls_lines + (
        'startup_attempts %d' % STARTUP_ATTEMPTS, 'reconnect_delay 0.2'))
    template = template.replace('</amqp-server>', extra + '</amqp-server>')
    return gocept.amqprun.testing.write_config(
        str(directory), '', template,
        dict(hostname='localhost', port=port or broker.ssl_port,
             username=broker.username, password=broker.password,
             virtual_host=virtual_host, here=os.path.abspath(EXAMPLE)))


def env_with_example():
    """The environment of the example daemon: it imports its handler
    module from the example's directory."""
    env = gocept.amqprun.testing.subprocess_environment()
    env['PYTHONPATH'] = os.pathsep.join(
        [os.path.abspath(EXAMPLE), env['PYTHONPATH']])
    return env


def replies_once(config, broker, virtual_host):
    """Run the example daemon: it answers one message; SIGTERM, exit 0.

    Returns its output.
    """
    daemon = gocept.amqprun.testing.ServerProcess(
        config, env=env_with_example())
    client = Client(broker, virtual_host)
    try:
        client.expect_message_on('test.thank.messages')
        daemon.start(wait=True)
        client.send_message(b'Hi', 'test.routing', message_id='<tls@test>')
        reply = client.wait_for_message(30)
        assert reply.body == 'Thank you for your message.'
        assert reply.properties['correlation_id'] == '<tls@test>'
        assert daemon.stop(30) == 0
    finally:
        daemon.kill()
        client.channel.queue_purge('test.queue')
        client.close()
    return daemon.output


def failed_start(config):
    """Run the example daemon, which must fail at start-up.

    Returns (its one CRITICAL line, its output, seconds it ran).
    """
    started = time.monotonic()
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), 'server'), config],
        capture_output=True, text=True, timeout=60, env=env_with_example())
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    critical = [line for line in result.stdout.splitlines()
                if 'CRITICAL' in line]
    assert len(critical) == 1, result.stdout
    return critical[0], result.stdout, seconds


def test_readme_example_over_tls_with_verification_works(
        amqp_tls_broker, tls_vhost, tmp_path):
    certificates = amqp_tls_broker.certificates
    config = example_config(tmp_path, amqp_tls_broker, tls_vhost,
                            'ssl true', 'ssl_ca_file %s'
                            % certificates.ca_file)
    output = replies_once(config, amqp_tls_broker, tls_vhost)
    assert 'AMQP connection to localhost:%d opened.' % (
        amqp_tls_broker.ssl_port) in output
    assert 'WARNING' not in output


def test_wrong_ca_is_one_critical_line_and_exit_1_without_retrying(
        amqp_tls_broker, tls_vhost, tmp_path):
    certificates = amqp_tls_broker.certificates
    config = example_config(tmp_path, amqp_tls_broker, tls_vhost,
                            'ssl true', 'ssl_ca_file %s'
                            % certificates.other_ca_file)
    critical, output, _ = failed_start(config)
    assert 'TLS handshake with the AMQP broker at localhost:%d failed' % (
        amqp_tls_broker.ssl_port) in critical
    assert 'the certificate does not verify' in critical
    assert 'retrying' not in output
    assert 'Cannot connect' not in output


def test_tls_to_the_plain_amqp_port_says_so(
        amqp_tls_broker, tls_vhost, tmp_path):
    config = example_config(tmp_path, amqp_tls_broker, tls_vhost,
                            'ssl true', port=amqp_tls_broker.port)
    critical, output, _ = failed_start(config)
    assert 'localhost:%d' % amqp_tls_broker.port in critical
    assert 'the port does not speak TLS' in critical
    assert 'retrying' not in output


def test_tls_without_verification_works_and_warns(
        amqp_tls_broker, tls_vhost, tmp_path):
    config = example_config(tmp_path, amqp_tls_broker, tls_vhost,
                            'ssl true', 'ssl_verify false')
    output = replies_once(config, amqp_tls_broker, tls_vhost)
    [warning] = [line for line in output.splitlines() if 'WARNING' in line]
    assert 'TLS without verification (ssl_verify false)' in warning
    assert 'localhost:%d' % amqp_tls_broker.ssl_port in warning
    assert 'not authenticated' in warning


def test_broker_requiring_a_client_certificate_refuses_a_daemon_without(
        amqp_mtls_broker, mtls_vhost, tmp_path):
    certificates = amqp_mtls_broker.certificates
    config = example_config(tmp_path, amqp_mtls_broker, mtls_vhost,
                            'ssl true', 'ssl_ca_file %s'
                            % certificates.ca_file)
    critical, output, seconds = failed_start(config)
    assert 'localhost:%d' % amqp_mtls_broker.ssl_port in critical
    assert 'client certificate' in critical
    assert 'ssl_cert_file' in critical
    assert seconds < 30


def test_broker_requiring_a_client_certificate_takes_ours(
        amqp_mtls_broker, mtls_vhost, tmp_path):
    certificates = amqp_mtls_broker.certificates
    config = example_config(
        tmp_path, amqp_mtls_broker, mtls_vhost, 'ssl true',
        'ssl_ca_file %s' % certificates.ca_file,
        'ssl_cert_file %s' % certificates.client_cert_file,
        'ssl_key_file %s' % certificates.client_key_file)
    output = replies_once(config, amqp_mtls_broker, mtls_vhost)
    assert 'AMQP connection to localhost:%d opened.' % (
        amqp_mtls_broker.ssl_port) in output


# -- Parameters(ssl=SSLContext) -----------------------------------------------

def context(ca_file, client_certificate=None):
    """A verifying SSLContext; with a (cert, key) pair to present."""
    result = ssl.create_default_context(cafile=ca_file)
    if client_certificate:
        result.load_cert_chain(*client_certificate)
    return result


def test_a_ready_ssl_context_is_used_as_it_is(amqp_mtls_broker, mtls_vhost):
    certificates = amqp_mtls_broker.certificates
    parameters = Parameters(
        hostname='localhost', port=amqp_mtls_broker.ssl_port,
        virtual_host=mtls_vhost, ssl=context(
            certificates.ca_file, (certificates.client_cert_file,
                                   certificates.client_key_file)))
    connection = connect(parameters)
    try:
        assert connection.transport.sock.getpeercert()['subject'] == (
            (('commonName', 'localhost'),),)
        assert connection.transport.sock.version() in ('TLSv1.2', 'TLSv1.3')
    finally:
        connection.close()
    # A context without the client certificate is refused: ours was used.
    parameters.tls_context = context(certificates.ca_file)
    with pytest.raises(gocept.amqprun.interfaces.TLSError,
                       match='client certificate'):
        connect(parameters)


def test_a_ready_ssl_context_serves_a_server(amqp_tls_broker, tls_vhost):
    parameters = Parameters(
        hostname='localhost', port=amqp_tls_broker.ssl_port,
        virtual_host=tls_vhost,
        ssl=context(amqp_tls_broker.certificates.ca_file))
    server = Server(parameters, setup_handlers=False)
    thread = threading.Thread(
        target=server.start, daemon=True)
    thread.start()
    try:
        assert server.wait_until_running(10)
        assert server.node == 'localhost:%d' % amqp_tls_broker.ssl_port
    finally:
        server.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert server.error is None


def test_the_host_name_is_checked_also_when_connecting_by_address(
        amqp_tls_broker, tls_vhost):
    certificates = amqp_tls_broker.certificates
    parameters = Parameters(
        hostname='127.0.0.1', port=amqp_tls_broker.ssl_port,
        virtual_host=tls_vhost, ssl=True, ssl_ca_file=certificates.ca_file,
        ssl_server_hostname='rabbit.example.com')
    with pytest.raises(gocept.amqprun.interfaces.TLSError,
                       match='127.0.0.1:%d failed: the certificate does not '
                       'verify .*mismatch' % amqp_tls_broker.ssl_port):
        connect(parameters)
    parameters.ssl_server_hostname = 'localhost'
    connect(parameters).close()
