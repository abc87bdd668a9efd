"""Tests for the private RabbitMQ node (gocept.amqprun.testing.broker).

One test starts a real node (about 6-8 s); the others need no broker.
"""
import os
import socket
import uuid

import amqp
import pytest

import gocept.amqprun.testing.broker
from gocept.amqprun.testing.broker import RabbitMQNode


def processes_in(directory):
    """Return the pids of processes whose working directory is `directory`.

    The node starts its children there, so this finds them even when
    their pids were never seen (e.g. after a failed start).
    """
    directory = os.path.realpath(directory)
    return [pid for pid, cwd in working_directories()
            if cwd in (directory, directory + ' (deleted)')]


def working_directories():
    """Yield (pid, working directory) for every process we may inspect."""
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                yield int(name), os.readlink('/proc/%s/cwd' % name)
            except OSError:  # gone meanwhile
                pass


def is_alive(pid):
    """Whether a process (or, for a negative pid, a group) exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def accepts_connections(port):
    """Whether something listens on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=1):
            return True
    except OSError:
        return False


def publish_and_get(node, vhost, body):
    """Publish `body` to a fresh queue in `vhost`; return what comes back."""
    queue = 'test-%s' % uuid.uuid4().hex
    with amqp.Connection(host='%s:%d' % (node.hostname, node.port),
                         userid=node.username, password=node.password,
                         virtual_host=vhost) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, auto_delete=False)
        channel.basic_publish(amqp.Message(body), routing_key=queue)
        # The broker handles one channel's methods in order: the message
        # is in the queue before basic_get is handled.
        message = channel.basic_get(queue, no_ack=True)
        return message.body


def test_node_serves_a_fresh_vhost_and_leaves_nothing_behind_when_stopped():
    node = RabbitMQNode(config_lines=['consumer_timeout = 5000'])
    vhost = 'test-%s' % uuid.uuid4().hex
    with node:
        directory = node.directory
        server_pid, epmd_pid, port = node.server_pid, node.epmd_pid, node.port
        assert is_alive(server_pid) and is_alive(epmd_pid)
        assert accepts_connections(port)
        assert os.path.exists(node.log_file)
        with pytest.raises(RuntimeError, match='already running'):
            node.start()
        with pytest.raises(RuntimeError,
                           match='rabbitmqctl status timed out after'):
            node.ctl('status', timeout=0.01)

        node.add_vhost(vhost)
        assert publish_and_get(node, vhost, b'hello') == b'hello'
        assert node.ctl(
            'eval', 'application:get_env(rabbit, consumer_timeout).'
        ).strip() == '{ok,5000}'
        node.delete_vhost(vhost)
        assert vhost not in node.ctl('-q', 'list_vhosts').split()
        failure = 'rabbitmqctl delete_vhost %s failed: ' % vhost
        with pytest.raises(RuntimeError, match=failure):
            node.delete_vhost(vhost)

    assert not is_alive(server_pid)
    assert not is_alive(-server_pid)  # nothing left in its process group
    assert not is_alive(epmd_pid)
    assert not accepts_connections(port)
    assert not os.path.exists(directory)
    assert processes_in(directory) == []
    assert node.server_pid is None and node.epmd_pid is None
    node.stop()  # idempotent


def test_start_that_times_out_raises_with_the_log_and_stops_everything(
        tmp_path):
    node = RabbitMQNode(directory=str(tmp_path))
    for attempt in range(2):  # the directory can be used again
        with pytest.raises(RuntimeError,
                           match='timed out waiting for') as info:
            node.start(timeout=0)
        assert str(tmp_path / 'log') in str(info.value)
        assert not node.is_running
        assert processes_in(tmp_path) == []
    assert tmp_path.exists()  # not ours to remove


@pytest.fixture
def epmd(monkeypatch, tmp_path):
    """Let the test choose the program the node runs as its epmd."""
    def use(script):
        path = tmp_path / 'fake-epmd'
        path.write_text('#!/bin/sh\n' + script + '\n')
        path.chmod(0o755)
        monkeypatch.setattr(gocept.amqprun.testing.broker, 'EPMD', str(path))
    return use


def test_start_raises_with_the_log_when_a_process_dies_early(epmd):
    epmd('echo epmd cannot start; exit 1')
    with pytest.raises(RuntimeError, match='epmd cannot start') as info:
        RabbitMQNode().start()
    assert 'epmd (pid ' in str(info.value)
    assert 'exited early while waiting for epmd on port' in str(info.value)


def test_stop_kills_a_process_that_ignores_sigterm(
        epmd, monkeypatch, tmp_path, caplog):
    epmd("trap '' TERM; exec sleep 60")
    monkeypatch.setattr(gocept.amqprun.testing.broker, 'STOP_TIMEOUT', 0.3)
    directory = tmp_path / 'node'
    directory.mkdir()
    node = RabbitMQNode(directory=str(directory))
    with pytest.raises(RuntimeError, match='timed out waiting for epmd'):
        node.start(timeout=0.5)
    assert 'ignored SIGTERM for 0.3 s, killing it' in caplog.text
    assert processes_in(directory) == []


def test_stop_on_a_node_never_started_does_nothing():
    node = RabbitMQNode()
    node.stop()
    assert not node.is_running
    assert node.directory is None
    assert node.log_file is None


def test_ctl_raises_when_the_node_is_not_running():
    with pytest.raises(RuntimeError, match='not running'):
        RabbitMQNode().ctl('status')


def test_start_without_rabbitmq_installed_says_what_to_install(
        monkeypatch, tmp_path):
    monkeypatch.setattr(gocept.amqprun.testing.broker, 'RABBITMQ_SERVER',
                        str(tmp_path / 'missing'))
    with pytest.raises(RuntimeError) as info:
        RabbitMQNode().start()
    assert str(info.value) == (
        'rabbitmq-server is not installed (%s is missing): '
        'apt-get install rabbitmq-server' % (tmp_path / 'missing'))
