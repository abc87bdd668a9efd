"""Tests for the broker harness (gocept.amqprun.testing.broker).

A real single node (about 5 s), the session's shared cluster (about 15 s,
see ``amqp_cluster``), a one-node cluster and two TLS nodes; the other
tests need no broker.
"""
import json
import os
import socket
import ssl
import time
import uuid

import amqp
import pytest

import gocept.amqprun.testing.broker
import gocept.amqprun.testing.processes
from gocept.amqprun.testing.broker import Cluster
from gocept.amqprun.testing.broker import RabbitMQNode
from gocept.amqprun.testing.client import wait_for


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


def running_in_group(pgid):
    """Return the pids of live (not zombie) processes in group `pgid`."""
    pids = []
    for name in os.listdir('/proc'):
        try:
            with open('/proc/%s/stat' % name) as f:
                # pid (comm) state ppid pgrp ...; comm may hold spaces
                state, _, group = f.read().rsplit(')', 1)[1].split()[:3]
        except (OSError, IndexError):  # not a process, or gone meanwhile
            continue
        if int(group) == pgid and state != 'Z':
            pids.append(int(name))
    return pids


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
        node.kill()  # like kill -9; its own epmd keeps running
        assert not node.is_running
        assert not is_alive(server_pid) and is_alive(epmd_pid)

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
    for attempt in range(2):  # the directory can be used again
        node = RabbitMQNode(directory=str(tmp_path))
        with pytest.raises(RuntimeError,
                           match='timed out waiting for') as info:
            node.start(timeout=0)
        assert str(tmp_path / 'log') in str(info.value)
        assert not node.is_running
        assert processes_in(tmp_path) == []
    assert tmp_path.exists()  # not ours to remove


def test_boot_that_times_out_raises_with_the_log_and_stops_everything(
        tmp_path):
    node = RabbitMQNode(directory=str(tmp_path))
    node.start(wait=False)
    server_pid = node.server_pid
    with pytest.raises(RuntimeError,
                       match='timed out waiting for the AMQP port') as info:
        node.wait_until_started(timeout=0)
    assert str(tmp_path / 'log') in str(info.value)
    assert not node.is_running
    # Stopped this early, rabbitmq-server may die of SIGTERM before it
    # traps it: its orphaned VM, killed, stays a zombie until init reaps
    # it. Nothing runs any more, though.
    assert running_in_group(server_pid) == []
    assert processes_in(tmp_path) == []


@pytest.fixture
def epmd(monkeypatch, tmp_path):
    """Let the test choose the program the node runs as its epmd."""
    def use(script):
        path = tmp_path / 'fake-epmd'
        path.write_text('#!/bin/sh\n' + script + '\n')
        path.chmod(0o755)
        monkeypatch.setattr(gocept.amqprun.testing.processes, 'EPMD',
                            str(path))
    return use


def test_cluster_start_that_fails_stops_everything_and_cleans_up(
        epmd, tmp_path):
    epmd('exec sleep 60')  # never listens
    directory = tmp_path / 'cluster'
    directory.mkdir()
    with pytest.raises(RuntimeError, match='timed out waiting for epmd'):
        Cluster.start(size=2, timeout=0.5, directory=str(directory))
    assert processes_in(directory) == []
    assert directory.exists()  # not ours to remove


def test_epmd_refuses_to_start_twice(tmp_path):
    epmd = gocept.amqprun.testing.processes.Epmd(str(tmp_path))
    epmd.start(time.monotonic() + 30)
    try:
        with pytest.raises(RuntimeError, match='already running'):
            epmd.start(time.monotonic() + 30)
        assert accepts_connections(epmd.port)
    finally:
        epmd.stop()
    assert not accepts_connections(epmd.port)


def test_start_raises_with_the_log_when_a_process_dies_early(epmd):
    epmd('echo epmd cannot start; exit 1')
    with pytest.raises(RuntimeError, match='epmd cannot start') as info:
        RabbitMQNode().start()
    assert 'epmd (pid ' in str(info.value)
    assert 'exited early while waiting for epmd on port' in str(info.value)


def test_stop_kills_a_process_that_ignores_sigterm(
        epmd, monkeypatch, tmp_path, caplog):
    epmd("trap '' TERM; exec sleep 60")
    monkeypatch.setattr(gocept.amqprun.testing.processes, 'STOP_TIMEOUT', 0.3)
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


def test_kill_raises_when_the_node_is_not_running():
    with pytest.raises(RuntimeError, match='not running'):
        RabbitMQNode().kill()


class FakeServer:
    """Stands in for the Popen of a running rabbitmq-server."""

    pid = 1  # init leads no process group of ours


def test_kill_refuses_a_pid_file_naming_a_process_that_is_not_the_nodes(
        tmp_path):
    node = RabbitMQNode()
    pid_file = tmp_path / 'rabbitmq.pid'
    pid_file.write_text('%d\n' % os.getpid())
    node._env = {'RABBITMQ_PID_FILE': str(pid_file)}
    node._server = FakeServer()
    with pytest.raises(RuntimeError, match='pid %d is not a process of'
                       % os.getpid()):
        node.kill()


def test_a_broker_of_your_own_has_no_tls_port_or_certificates():
    broker = gocept.amqprun.testing.broker.Broker(
        'rabbit.example.com', 5672, 'guest', 'guest')
    assert broker.ssl_port is None
    assert broker.certificates is None


# -- clusters ----------------------------------------------------------------

def cluster_status(node):
    """``rabbitmqctl cluster_status`` as `node` reports it (a dict)."""
    return json.loads(node.ctl('cluster_status', '--formatter', 'json'))


def connect(node, vhost):
    """A py-amqp connection to `node` (anything with host, port, user)."""
    connection = amqp.Connection(
        host='%s:%d' % (node.hostname, node.port), userid=node.username,
        password=node.password, virtual_host=vhost)
    connection.connect()
    return connection


def publish(node, vhost, queue, body):
    """Publish `body` to `queue` through `node`, confirmed by the broker."""
    with connect(node, vhost) as connection:
        channel = connection.channel()
        channel.confirm_select()
        channel.basic_publish(amqp.Message(body, delivery_mode=2),
                              routing_key=queue)


def get(node, vhost, queue):
    """The next message body of `queue` fetched through `node`."""
    with connect(node, vhost) as connection:
        channel = connection.channel()
        message = wait_for(lambda: channel.basic_get(queue, no_ack=True),
                           message='Nothing in %s via %s' % (
                               queue, node.nodename))
        return message.body


@pytest.fixture(scope='module')
def cluster_vhost(amqp_cluster):
    """A virtual host of the shared cluster for this module."""
    with gocept.amqprun.testing.broker.temporary_vhost(amqp_cluster) as name:
        yield name


@pytest.fixture(scope='module')
def quorum_queue(amqp_cluster, cluster_vhost):
    """A quorum queue declared through node 1 of the cluster."""
    name = 'test-quorum-%s' % uuid.uuid4().hex
    with connect(amqp_cluster.nodes[0], cluster_vhost) as connection:
        connection.channel().queue_declare(
            name, durable=True, auto_delete=False,
            arguments={'x-queue-type': 'quorum'})
    return name


@pytest.mark.cluster
def test_cluster_of_three_nodes_forms_with_a_port_each(amqp_cluster):
    names = sorted(node.nodename for node in amqp_cluster.nodes)
    assert names == ['%s-%d@localhost' % (amqp_cluster.prefix, number)
                     for number in (1, 2, 3)]
    for node in amqp_cluster.nodes:
        assert sorted(cluster_status(node)['running_nodes']) == names
    assert amqp_cluster.running_nodes() == names
    ports = [node.port for node in amqp_cluster.nodes]
    assert len(set(ports)) == 3
    assert amqp_cluster.hostname_list() == ' '.join(
        '127.0.0.1:%d' % port for port in ports)
    assert amqp_cluster.hostname_list(',').count(',') == 2
    assert len({node.epmd_pid for node in amqp_cluster.nodes}) == 1
    mapping = amqp_cluster.config_mapping('vh')
    assert mapping['amqp_hostname'] == amqp_cluster.hostname_list()
    assert mapping['amqp_virtualhost'] == 'vh'


@pytest.mark.cluster
def test_quorum_queue_declared_via_one_node_is_usable_via_another(
        amqp_cluster, cluster_vhost, quorum_queue):
    first, second, third = amqp_cluster.nodes
    assert amqp_cluster.ctl(
        'list_queues', '-q', '--no-table-headers', '-p', cluster_vhost,
        'name', 'type').split() == [quorum_queue, 'quorum']
    publish(second, cluster_vhost, quorum_queue, b'via node 2')
    assert get(third, cluster_vhost, quorum_queue) == b'via node 2'


@pytest.mark.cluster
def test_killed_node_is_started_again_and_rejoins_the_cluster(
        amqp_cluster, cluster_vhost, quorum_queue):
    first, second, third = amqp_cluster.nodes
    server_pid = second.server_pid
    try:
        second.kill()
        assert not second.is_running
        assert not is_alive(-server_pid)  # the VM and its children are gone
        assert amqp_cluster.running_nodes() == sorted(
            [first.nodename, third.nodename])
        # The quorum queue keeps a majority and stays usable meanwhile.
        publish(first, cluster_vhost, quorum_queue, b'while node 2 is down')
        second.start()
    finally:
        if not second.is_running:
            second.start()
    assert amqp_cluster.running_nodes() == sorted(
        node.nodename for node in amqp_cluster.nodes)
    assert get(second, cluster_vhost, quorum_queue) == b'while node 2 is down'


@pytest.mark.cluster
def test_cluster_ctl_uses_a_running_node_and_raises_without_one(
        amqp_cluster):
    assert 'running_nodes' in amqp_cluster.ctl(
        'cluster_status', '--formatter', 'json')
    never_started = Cluster(prefix='never-started')
    with pytest.raises(RuntimeError, match='No node of cluster .* running'):
        never_started.ctl('status')
    never_started.stop()


def test_stopped_cluster_leaves_no_process_and_no_directory_behind():
    with Cluster.start(size=1) as cluster:
        [node] = cluster.nodes
        directory = cluster.directory
        pids = [node.server_pid, node.epmd_pid]
        assert node.nodename == '%s-1@localhost' % cluster.prefix
        assert cluster.startup_time > 0
    assert not any(is_alive(pid) for pid in pids)
    assert not is_alive(-pids[0])
    assert not os.path.exists(directory)
    assert processes_in(directory) == []
    cluster.stop()  # idempotent


# -- TLS ---------------------------------------------------------------------

def tls_connect(broker, **ssl_options):
    """Open (and return) a py-amqp connection to the TLS port of `broker`.
    """
    options = broker.certificates.ssl_options(**ssl_options)
    connection = amqp.Connection(
        host='%s:%d' % (broker.hostname, broker.ssl_port),
        userid=broker.username, password=broker.password, ssl=options,
        connect_timeout=10)
    try:
        connection.connect()
    except BaseException:
        connection.collect()
        raise
    return connection


def test_tls_node_is_verified_with_its_ca_and_the_name_localhost(
        amqp_tls_broker):
    with tls_connect(amqp_tls_broker) as connection:
        certificate = connection.transport.sock.getpeercert()
        assert dict(name for [name] in certificate['subject']) == {
            'commonName': 'localhost'}
        assert ('DNS', 'localhost') in certificate['subjectAltName']
        assert ('IP Address', '127.0.0.1') in certificate['subjectAltName']
    assert accepts_connections(amqp_tls_broker.port)  # plain AMQP too
    assert amqp_tls_broker.ssl_port != amqp_tls_broker.port


def test_tls_node_verifies_a_client_certificate_it_is_shown(
        amqp_tls_broker):
    with tls_connect(amqp_tls_broker, client_certificate=True):
        pass


def test_tls_handshake_fails_with_the_wrong_ca(amqp_tls_broker):
    with pytest.raises(ssl.SSLCertVerificationError,
                       match='certificate verify failed'):
        tls_connect(amqp_tls_broker,
                    ca_file=amqp_tls_broker.certificates.other_ca_file)


def test_tls_handshake_fails_for_another_host_name(amqp_tls_broker):
    with pytest.raises(ssl.SSLCertVerificationError,
                       match='Hostname mismatch'):
        tls_connect(amqp_tls_broker, server_hostname='rabbit.example.com')


def test_node_requiring_a_client_certificate_refuses_a_client_without(
        amqp_mtls_broker):
    # Under TLS 1.3 the server checks the client's certificate after the
    # client finished its handshake: the refusal is an EOF or an alert.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_connect(amqp_mtls_broker)


def test_node_requiring_a_client_certificate_accepts_one_signed_by_its_ca(
        amqp_mtls_broker):
    with tls_connect(amqp_mtls_broker, client_certificate=True) as connection:
        assert connection.connected
