"""The ``amqprun-send`` console script against the real broker."""
import io
import socket
import subprocess
import sys
import threading

import pytest

import gocept.amqprun.send
import gocept.amqprun.testing
from gocept.amqprun.testing import wait_for


SCRIPT = gocept.amqprun.testing.script('amqprun-send')


def amqprun_send(*args, input=b''):
    """Run the console script; return the CompletedProcess (text output)."""
    result = subprocess.run([SCRIPT] + list(args), input=input,
                            capture_output=True, timeout=60)
    result.stdout = result.stdout.decode()
    result.stderr = result.stderr.decode()
    return result


class Result:
    """What ``send.main()`` did in-process: exit status and output."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


@pytest.fixture
def send_in_process(monkeypatch, capsys):
    """Run ``gocept.amqprun.send.main()`` in this process (same checks as
    the console script, seen by coverage)."""
    def send(*args, input=b''):
        stdin = io.TextIOWrapper(io.BytesIO(input))
        monkeypatch.setattr(sys, 'stdin', stdin)
        logging_state = gocept.amqprun.testing.LoggingState()
        try:
            with pytest.raises(SystemExit) as exit:
                gocept.amqprun.send.main(list(args))
        finally:
            logging_state.restore()
        out, err = capsys.readouterr()
        return Result(exit.value.code, out, err)
    return send


@pytest.fixture
def config(amqp_config):
    """A daemon configuration file for the module's virtual host."""
    return amqp_config(gocept.amqprun.testing.site_zcml())


def free_port():
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_body_from_stdin_with_headers_and_content_type(config, amqp_client):
    amqp_client.expect_message_on('test.send.#')
    result = amqprun_send(config, 'test.send.stdin', '--header', 'a=1',
                          '-H', 'X-Filename=name=with=equals.txt',
                          '--content-type', 'text/plain',
                          input=b'body \xc3\xbc\n')
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    message = amqp_client.wait_for_message()
    assert message.body == b'body \xc3\xbc\n'
    assert message.delivery_info['routing_key'] == 'test.send.stdin'
    assert message.delivery_info['exchange'] == 'amq.topic'
    assert message.properties['content_type'] == 'text/plain'
    assert message.properties['delivery_mode'] == 2
    assert message.headers == {'a': '1', 'X-Filename': 'name=with=equals.txt'}
    assert result.stdout == message.properties['message_id'] + '\n'
    assert message.properties['message_id'].startswith('<')


def test_body_from_a_file(send_in_process, config, amqp_client, tmp_path):
    body = tmp_path / 'body.bin'
    body.write_bytes(bytes(range(256)) * 100)
    amqp_client.expect_message_on('test.send.file')
    result = send_in_process(config, 'test.send.file', '--file', str(body),
                             '-H', 'X-Filename=body.bin',
                             '-t', 'application/octet-stream')
    assert result.returncode == 0, result.stderr
    message = amqp_client.wait_for_message()
    assert message.body == body.read_bytes()
    assert message.headers == {'X-Filename': 'body.bin'}
    assert message.properties['content_type'] == 'application/octet-stream'
    assert result.stdout == message.properties['message_id'] + '\n'


def test_empty_body(send_in_process, config, amqp_client):
    amqp_client.expect_message_on('test.send.empty')
    assert send_in_process(config, 'test.send.empty').returncode == 0
    assert not amqp_client.wait_for_message().body  # py-amqp gives ''


def test_other_exchange(send_in_process, config, amqp_client):
    amqp_client.channel.queue_bind(
        amqp_client.receive_queue, 'amq.direct', 'test.send.direct')
    result = send_in_process(config, 'test.send.direct', '-e',
                             'amq.direct', input=b'direct')
    assert result.returncode == 0, result.stderr
    message = amqp_client.wait_for_message()
    assert message.body == b'direct'
    assert message.delivery_info['exchange'] == 'amq.direct'


def one_line(result):
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('amqprun-send: ')
    return lines[0]


def test_unreachable_broker_is_one_line_and_status_1(
        amqp_broker, amqp_config):
    port = free_port()
    config = amqp_config(gocept.amqprun.testing.site_zcml(),
                         amqp_port=port)
    result = amqprun_send(config, 'test.send', input=b'x')
    assert result.returncode == 1
    line = one_line(result)
    assert 'Cannot connect to the AMQP broker at %s:%s' % (
        amqp_broker.hostname, port) in line
    assert result.stdout == ''


def test_broker_that_does_not_answer_in_time_is_status_1(
        send_in_process, amqp_config):
    with socket.socket() as silent:  # accepts connections, never speaks
        silent.bind(('127.0.0.1', 0))
        silent.listen()
        port = silent.getsockname()[1]
        config = amqp_config(gocept.amqprun.testing.site_zcml(),
                             amqp_port=port, amqp_extra='connect_timeout 5')
        result = send_in_process(config, 'test.send', '--timeout', '0.5',
                                 input=b'x')
    assert result.returncode == 1
    assert one_line(result) == (
        'amqprun-send: No connection to the AMQP broker at 127.0.0.1:%s '
        'within 0.5 s' % port)
    wait_for(lambda: not [thread for thread in threading.enumerate()
                          if thread.name == 'amqprun-io'], 10,
             message='The I/O thread of amqprun-send did not stop')


def test_publish_the_broker_refuses_is_status_1(send_in_process, config):
    result = send_in_process(config, 'test.send', '-e', 'no.such.exchange',
                             input=b'x')
    assert result.returncode == 1
    line = one_line(result)
    assert 'did not take the message' in line
    assert 'no.such.exchange' in line


def test_body_above_max_message_size_is_one_line_and_status_1(
        send_in_process, amqp_config):
    config = amqp_config(gocept.amqprun.testing.site_zcml(),
                         amqp_extra='max_message_size 4')
    result = send_in_process(config, 'test.send', input=b'12345')
    assert result.returncode == 1
    assert '5 bytes, above max_message_size 4' in one_line(result)


def test_refused_credentials_are_one_line_and_status_1(
        send_in_process, amqp_config):
    config = amqp_config(gocept.amqprun.testing.site_zcml(),
                         amqp_password='wrong')
    result = send_in_process(config, 'test.send', input=b'x')
    assert result.returncode == 1
    assert 'refused user' in one_line(result)


def test_invalid_config_file_is_one_line_and_status_2(
        send_in_process, tmp_path):
    config = tmp_path / 'bad.conf'
    config.write_text('<amqp-server>\n  port many\n</amqp-server>\n')
    result = send_in_process(str(config), 'test.send')
    assert result.returncode == 2
    line = one_line(result)
    assert str(config) in line
    assert 'line' in line


def test_missing_config_file_is_one_line_and_status_2(
        send_in_process, tmp_path):
    result = send_in_process(str(tmp_path / 'missing.conf'), 'test.send')
    assert result.returncode == 2
    assert 'missing.conf' in one_line(result)


def test_missing_body_file_is_one_line_and_status_2(
        send_in_process, config, tmp_path):
    result = send_in_process(config, 'test.send', '--file',
                             str(tmp_path / 'nothing.txt'))
    assert result.returncode == 2
    assert one_line(result) == (
        'amqprun-send: Cannot read %s: No such file or directory'
        % (tmp_path / 'nothing.txt'))


def test_header_without_value_is_a_usage_error(send_in_process, config):
    result = send_in_process(config, 'test.send', '--header', 'novalue')
    assert result.returncode == 2
    assert "expected KEY=VALUE, got 'novalue'" in result.stderr
    assert result.stderr.startswith('usage: amqprun-send')


def test_attempts_must_be_positive(send_in_process, config):
    result = send_in_process(config, 'test.send', '--attempts', '0')
    assert result.returncode == 2
    assert one_line(result) == 'amqprun-send: --attempts must be at least 1'


def test_usage_error_without_arguments():
    result = amqprun_send()
    assert result.returncode == 2
    assert result.stderr.startswith('usage: amqprun-send')
    assert 'CONFIG' in result.stderr


def test_help_describes_the_command():
    result = amqprun_send('--help')
    assert result.returncode == 0
    assert 'usage: amqprun-send' in result.stdout
    for option in ('--file', '--header', '--content-type', '--exchange'):
        assert option in result.stdout


def test_verbose_logs_the_connection(send_in_process, config, amqp_client):
    amqp_client.expect_message_on('test.send.verbose')
    result = send_in_process(config, 'test.send.verbose', '-v', input=b'v')
    assert result.returncode == 0
    assert 'AMQP connection to' in result.stderr
    assert amqp_client.wait_for_message().body == b'v'
