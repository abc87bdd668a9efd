"""The broker of a test run: private RabbitMQ nodes or a broker of your own.

Runs on: the test's thread (a test session, a layer, the quick start
script); it starts and stops child processes and runs ``rabbitmqctl``, but
never speaks AMQP itself.

:class:`RabbitMQNode` runs Debian's ``rabbitmq-server`` as a child process
whose every file (database, logs, cookie, configuration) lives in one
directory and whose every port (AMQP, TLS, Erlang distribution, epmd) is
bound to 127.0.0.1. The system broker, ``/etc/rabbitmq`` and
``/var/lib/rabbitmq`` are neither used nor touched, and no process is ever
stopped by name. The package must be installed beforehand (``apt-get
install rabbitmq-server``; ``./dev.sh`` does it); this module never
installs anything. Given
:class:`~gocept.amqprun.testing.certificates.Certificates`, a node also
listens for TLS.

:class:`Cluster` starts several such nodes at once, sharing one epmd and
one Erlang cookie, and joins them into one cluster (quorum queues work on
it); single nodes can be killed and started again.

:class:`Broker` is what tests use: connection settings plus virtual host
administration, for the broker named by ``AMQP_*`` variables or for a
private node. :func:`get_broker` gives the one broker of a test run and
:func:`stop_broker` stops it.
"""
import atexit
import contextlib
import itertools
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import string
import subprocess
import tempfile
import time
import uuid

import gocept.amqprun.connection
from gocept.amqprun.testing import processes
from gocept.amqprun.testing.processes import Epmd


log = logging.getLogger(__name__)

RABBITMQ_BIN = '/usr/lib/rabbitmq/bin'
RABBITMQ_SERVER = os.path.join(RABBITMQ_BIN, 'rabbitmq-server')
RABBITMQCTL = os.path.join(RABBITMQ_BIN, 'rabbitmqctl')
RABBITMQ_UPGRADE = os.path.join(RABBITMQ_BIN, 'rabbitmq-upgrade')

#: Keeps the Erlang distribution on loopback (it listens on every interface
#: otherwise) and forbids Erlang to start an ``epmd -daemon`` of its own,
#: which would outlive the node; we run our own epmd as a child instead.
ERL_ARGS = '-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false'

_node_numbers = itertools.count(1)
_cluster_numbers = itertools.count(1)


def require_rabbitmq_server():
    """Raise RuntimeError naming the package when rabbitmq-server is missing.
    """
    if not os.path.exists(RABBITMQ_SERVER):
        raise RuntimeError(
            'rabbitmq-server is not installed (%s is missing): '
            'apt-get install rabbitmq-server' % RABBITMQ_SERVER)


def new_cookie():
    """Return a fresh random Erlang cookie."""
    return ''.join(secrets.choice(string.ascii_uppercase) for _ in range(20))


def fresh_vhost_name():
    """Return a new, unique virtual host name."""
    return 'test.%s' % uuid.uuid4().hex[:12]


@contextlib.contextmanager
def temporary_vhost(broker):
    """Context manager: a fresh virtual host of `broker` (a
    :class:`Broker` or :class:`Cluster`), deleted afterwards."""
    name = broker.create_vhost()
    try:
        yield name
    finally:
        broker.delete_vhost(name)


def add_vhost(ctl, name, username):
    """Create virtual host `name` with `ctl` (a ``rabbitmqctl`` runner such
    as :meth:`RabbitMQNode.ctl`) and give `username` all rights on it."""
    ctl('add_vhost', name)
    ctl('set_permissions', '-p', name, username, '.*', '.*', '.*')


class RabbitMQNode:
    """One private RabbitMQ node: start it, administer it, stop it.

    `directory` holds everything the node writes; when it is None a
    temporary directory is created on :meth:`start` and removed on
    :meth:`stop`. `config_lines` are appended to the node's
    ``rabbitmq.conf`` (for example ``'consumer_timeout = 5000'``).

    With `certificates` (a
    :class:`~gocept.amqprun.testing.certificates.Certificates`) the node
    also listens for TLS on :attr:`ssl_port`, presenting ``cert_file`` and
    verifying client certificates against ``ca_file`` (``verify_peer``);
    with `fail_if_no_peer_cert` it refuses clients without one.

    A :class:`Cluster` passes `nodename`, `epmd` (shared; otherwise the
    node runs its own) and `cookie` (the same for all; otherwise random).

    Name, ports and files are chosen on the first :meth:`start` and kept:
    a node killed, or stopped unless its directory was a temporary one,
    comes back as the same node, with its data. Not thread-safe: start,
    administer and stop the node from one thread. Usable as a context
    manager (start on enter, stop on exit).
    """

    hostname = processes.HOSTNAME
    username = 'guest'
    password = 'guest'

    def __init__(self, directory=None, config_lines=(), certificates=None,
                 fail_if_no_peer_cert=False, nodename=None, epmd=None,
                 cookie=None):
        self.directory = directory
        self.config_lines = tuple(config_lines)
        #: The TLS files, or None for a node without a TLS listener.
        self.certificates = certificates
        self.fail_if_no_peer_cert = fail_if_no_peer_cert
        self.nodename = nodename
        self.port = None
        #: The TLS port (None without `certificates`).
        self.ssl_port = None
        self._requested_nodename = nodename
        self._cookie = cookie
        self._epmd = epmd
        self._owns_epmd = epmd is None
        self._owns_directory = False
        self._env = None
        self._server = None
        self._began = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def is_running(self):
        """Whether the server process was started and not yet stopped."""
        return self._server is not None

    @property
    def server_pid(self):
        """Process id of ``rabbitmq-server`` (None when not running).

        It leads its own process group, which holds the Erlang VM.
        """
        return self._server.pid if self._server is not None else None

    @property
    def epmd_pid(self):
        """Process id of the node's epmd (None when not running)."""
        return self._epmd.pid if self._epmd is not None else None

    @property
    def log_file(self):
        """Path of the node's main log file (None before :meth:`start`)."""
        if self._env is None:
            return None
        return self._env['RABBITMQ_LOGS']

    def start(self, timeout=90, wait=True):
        """Start the node (and its own epmd); return once it accepts AMQP.

        With `wait` false, return right after starting the server
        process; :meth:`wait_until_started` waits for the rest (a
        :class:`Cluster` boots its nodes side by side that way).

        Raises :class:`RuntimeError` carrying the tail of the node's log
        when a process dies early or the node is not up within `timeout`
        seconds; whatever was started is stopped before that. The node is
        stopped at interpreter exit at the latest.
        """
        if self._server is not None:
            raise RuntimeError('RabbitMQ node %s is already running'
                               % self.nodename)
        require_rabbitmq_server()
        atexit.register(self.stop)
        self._began = time.monotonic()
        try:
            if self._env is None:
                self._prepare()
            if self._owns_epmd and self._epmd.pid is None:
                self._epmd.start(self._began + timeout)
            self._server = processes.spawn(
                [RABBITMQ_SERVER], self.directory, 'stdout.log', self._env)
        except BaseException:
            self.stop()
            raise
        if wait:
            self.wait_until_started(timeout)

    def wait_until_started(self, timeout=90):
        """Wait until a node started with ``wait=False`` has fully booted.

        The AMQP port opens near the end of the boot, long after the node
        registered with epmd; ``rabbitmqctl await_startup`` (which exits
        69 at once for a node not yet registered) then confirms that the
        node itself considers the boot finished. Raises and stops the
        node as :meth:`start` does.
        """
        deadline = time.monotonic() + timeout
        try:
            processes.wait_until_listening(
                self.port, self._processes(), deadline,
                'the AMQP port %d of %s' % (self.port, self.nodename),
                self.directory)
            remaining = max(1, int(deadline - time.monotonic()))
            self.ctl('await_startup', '--timeout', str(remaining),
                     timeout=remaining + 10)
        except BaseException:
            self.stop()
            raise
        log.info('RabbitMQ node %s listens on %s:%d (started in %.1f s)',
                 self.nodename, self.hostname, self.port,
                 time.monotonic() - self._began)

    def stop(self):
        """Stop the node and its own epmd; remove a temporary directory.

        Each process gets SIGTERM and up to 20 seconds, then SIGKILL;
        whatever is left in its process group is killed. Calling it again
        (or on a node never started) does nothing.
        """
        atexit.unregister(self.stop)
        _stop_servers([self])
        if self._owns_epmd and self._epmd is not None:
            self._epmd.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = self._env = self.nodename = None
            self.port = self.ssl_port = None
            self._owns_directory = False

    def kill(self):
        """SIGKILL the node's Erlang VM, as ``kill -9`` would.

        No clean shutdown: the node's peers see it vanish. Its files stay,
        so :meth:`start` brings the same node back (into its cluster).
        """
        if self._server is None:
            raise RuntimeError('RabbitMQ node is not running')
        log.info('Killing RabbitMQ node %s', self.nodename)
        processes.send_signal(self._vm_pid(), signal.SIGKILL)
        # rabbitmq-server waits for the VM and exits when it is gone.
        processes.wait_for_exit(self._server, processes.STOP_TIMEOUT)
        _stop_servers([self])

    def restart(self, timeout=90, drain=False):
        """Stop the node's server and start it again, as a broker restart.

        Same directory, node name and ports (epmd keeps running), so
        durable queues and persistent messages survive and clients can
        reconnect to the same address. With `drain` the node is put into
        maintenance mode first (``rabbitmq-upgrade drain``: its quorum
        queue leaders move to other nodes, its client connections are
        closed) and revived once it is up again, as RabbitMQ's upgrade
        guide asks for a rolling restart of a cluster. Raises
        :class:`RuntimeError` as :meth:`start` does.
        """
        if self._server is None:
            raise RuntimeError('RabbitMQ node is not running')
        log.info('Restarting RabbitMQ node %s', self.nodename)
        if drain:
            self._run_tool(RABBITMQ_UPGRADE, 'drain')
        _stop_servers([self])
        self.start(timeout)
        if drain:
            self._run_tool(RABBITMQ_UPGRADE, 'revive')

    def ctl(self, *args, timeout=60):
        """Run ``rabbitmqctl`` with `args` against this node; return stdout.

        Raises :class:`RuntimeError` on a non-zero exit status or when the
        command takes longer than `timeout` seconds.
        """
        return self._run_tool(RABBITMQCTL, *args, timeout=timeout)

    def _run_tool(self, tool, *args, timeout=60):
        """Run the RabbitMQ command line `tool` against this node."""
        if self._server is None:
            raise RuntimeError('RabbitMQ node is not running')
        command = [tool, '-n', self.nodename] + list(args)
        description = '%s %s' % (os.path.basename(tool), ' '.join(args))
        try:
            result = subprocess.run(
                command, env=self._env, cwd=self.directory,
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError('%s timed out after %s s'
                               % (description, timeout))
        if result.returncode != 0:
            raise RuntimeError('%s failed: %s' % (
                description, (result.stdout + result.stderr).strip()))
        return result.stdout

    def add_vhost(self, name):
        """Create virtual host `name` and give the guest user all rights."""
        add_vhost(self.ctl, name, self.username)

    def delete_vhost(self, name):
        """Delete virtual host `name` with all its queues and exchanges."""
        self.ctl('delete_vhost', name)

    def _processes(self):
        """(Popen, name) of the node's running processes, for progress."""
        running = [(self._server, 'rabbitmq-server')]
        if self._owns_epmd:
            running.append((self._epmd.process, 'epmd'))
        return [(process, name) for process, name in running
                if process is not None]

    def _vm_pid(self):
        """The pid of the node's Erlang VM, from the node's pid file.

        Checked to be in the server's process group, so that a stale file
        can never make us signal a process that is not ours.
        """
        with open(self._env['RABBITMQ_PID_FILE']) as f:
            pid = int(f.read().split()[0])
        if os.getpgid(pid) != self._server.pid:
            raise RuntimeError('pid %d is not a process of node %s'
                               % (pid, self.nodename))
        return pid

    def _prepare(self):
        """Choose directory, name and ports; write the node's files."""
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix='amqprun-rabbitmq-')
            self._owns_directory = True
        self.directory = os.path.abspath(self.directory)
        self.nodename = self._requested_nodename or (
            'amqprun-%d-%d@localhost' % (os.getpid(), next(_node_numbers)))
        if self._owns_epmd:
            self._epmd = Epmd(self.directory)
        self.port, dist_port, self.ssl_port = processes.free_ports(3)
        if self.certificates is None:
            self.ssl_port = None
        self._env = self._environment(dist_port)
        for name in ('conf.d', 'log', 'mnesia'):
            os.makedirs(os.path.join(self.directory, name), exist_ok=True)
        _write(self._env['RABBITMQ_CONF_ENV_FILE'], '')
        _write(self._env['RABBITMQ_ENABLED_PLUGINS_FILE'], '[].\n')
        _write(self._env['RABBITMQ_CONFIG_FILE'], self._config())
        self._write_cookie()

    def _environment(self, dist_port):
        """Return the environment for the node and for ``rabbitmqctl``.

        Everything inherited that configures RabbitMQ or Erlang is dropped,
        so the node ignores the system broker's settings.
        """
        path = self.directory
        return processes.clean_environment(
            HOME=path,
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=self.hostname,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(dist_port),
            # 0: each rabbitmqctl run takes any free port for its own
            # Erlang distribution, so concurrent runs never collide.
            RABBITMQ_CTL_DIST_PORT_MIN='0',
            RABBITMQ_CTL_DIST_PORT_MAX='0',
            ERL_EPMD_ADDRESS=self.hostname,
            ERL_EPMD_PORT=str(self._epmd.port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=ERL_ARGS,
            RABBITMQ_CTL_ERL_ARGS=ERL_ARGS,
            RABBITMQ_CONF_ENV_FILE=os.path.join(path, 'rabbitmq-env.conf'),
            RABBITMQ_CONFIG_FILE=os.path.join(path, 'rabbitmq.conf'),
            # Both default to files under /etc/rabbitmq.
            RABBITMQ_CONFIG_FILES=os.path.join(path, 'conf.d'),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(
                path, 'advanced.config'),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(
                path, 'enabled_plugins'),
            RABBITMQ_MNESIA_BASE=os.path.join(path, 'mnesia'),
            RABBITMQ_LOG_BASE=os.path.join(path, 'log'),
            RABBITMQ_LOGS=os.path.join(path, 'log', 'rabbit.log'),
            RABBITMQ_PID_FILE=os.path.join(path, 'rabbitmq.pid'),
        )

    def _config(self):
        """Return the text of the node's ``rabbitmq.conf``."""
        lines = [
            'listeners.tcp.default = %s:%d' % (self.hostname, self.port),
            'loopback_users.%s = true' % self.username,
            'log.console = false',
        ]
        lines.extend(self._tls_config())
        lines.extend(self.config_lines)
        return '\n'.join(lines) + '\n'

    def _tls_config(self):
        """Return the ``rabbitmq.conf`` lines of the TLS listener, if any.

        Only settings that RabbitMQ 3.x and 4.x both know.
        """
        if self.certificates is None:
            return []
        return [
            'listeners.ssl.default = %s:%d' % (self.hostname, self.ssl_port),
            'ssl_options.cacertfile = %s' % self.certificates.ca_file,
            'ssl_options.certfile = %s' % self.certificates.cert_file,
            'ssl_options.keyfile = %s' % self.certificates.key_file,
            'ssl_options.verify = verify_peer',
            'ssl_options.fail_if_no_peer_cert = %s'
            % str(self.fail_if_no_peer_cert).lower(),
        ]

    def _write_cookie(self):
        """Write the Erlang cookie the node and ``rabbitmqctl`` share.

        Written before either starts: otherwise both may race to create
        ``$HOME/.erlang.cookie`` with different contents.
        """
        path = os.path.join(self.directory, '.erlang.cookie')
        if os.path.exists(path):
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, 'w') as f:
            f.write(self._cookie or new_cookie())


def _stop_servers(nodes):
    """Stop the server processes of `nodes`, side by side.

    All get SIGTERM first, so stopping a cluster takes as long as its
    slowest node, not the sum.
    """
    running = [node for node in nodes if node._server is not None]
    for node in running:
        if not processes.has_exited(node._server):  # not killed
            log.info('Stopping RabbitMQ node %s', node.nodename)
    processes.terminate([(node._server, 'rabbitmq-server %s' % node.nodename)
                         for node in running])
    for node in running:
        node._server = None


class Cluster:
    """Private loopback RabbitMQ nodes joined into one cluster.

    Start it with :meth:`Cluster.start`. Node ``i`` (from 1) is
    ``<prefix>-i@localhost`` with its own ports and ``node-i`` directory;
    all share one epmd and one Erlang cookie. Not thread-safe, like its
    nodes; usable as a context manager (stop on exit).
    """

    hostname = processes.HOSTNAME
    username = RabbitMQNode.username
    password = RabbitMQNode.password

    def __init__(self, size=3, directory=None, prefix=None, config_lines=()):
        self.size = size
        self.directory = directory
        self.prefix = prefix or 'amqprun-%d-c%d' % (
            os.getpid(), next(_cluster_numbers))
        self.config_lines = tuple(config_lines)
        #: The :class:`RabbitMQNode` objects, node 1 first.
        self.nodes = []
        #: Seconds :meth:`start` took (boot and join), for the curious.
        self.startup_time = None
        self._epmd = None
        self._owns_directory = False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @classmethod
    def start(cls, size=3, timeout=120, **kw):
        """Start `size` nodes side by side, join them; return the cluster.

        Nodes 2 to `size` join node 1 (``stop_app``, ``join_cluster``,
        ``start_app``). Takes the keywords of the constructor. Raises
        RuntimeError (with the failing node's log) when a node does not
        come up or does not join within `timeout` seconds; everything
        started is stopped before that.
        """
        cluster = cls(size, **kw)
        began = time.monotonic()
        atexit.register(cluster.stop)
        try:
            cluster._boot(began + timeout)
            cluster._join()
        except BaseException:
            cluster.stop()
            raise
        cluster.startup_time = time.monotonic() - began
        log.info('RabbitMQ cluster %s of %d nodes up in %.1f s',
                 cluster.prefix, size, cluster.startup_time)
        return cluster

    def stop(self):
        """Stop all nodes side by side, then epmd; remove a temporary
        directory. Calling it again does nothing."""
        atexit.unregister(self.stop)
        _stop_servers(self.nodes)
        for node in self.nodes:
            node.stop()
        if self._epmd is not None:
            self._epmd.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            self._owns_directory = False

    def hostname_list(self, separator=' '):
        """``127.0.0.1:port`` of every node, joined by `separator`.

        The ``hostname`` setting of a daemon that may use any node.
        """
        return separator.join('%s:%d' % (node.hostname, node.port)
                              for node in self.nodes)

    def ctl(self, *args, timeout=60):
        """Run ``rabbitmqctl`` with `args` against a running node (the
        first one); see :meth:`RabbitMQNode.ctl`."""
        running = [node for node in self.nodes if node.is_running]
        if not running:
            raise RuntimeError('No node of cluster %s is running'
                               % self.prefix)
        return running[0].ctl(*args, timeout=timeout)

    def running_nodes(self):
        """The names of the nodes the cluster considers running now."""
        status = json.loads(self.ctl('cluster_status', '--formatter', 'json'))
        return sorted(status['running_nodes'])

    def create_vhost(self):
        """Return a fresh virtual host (the guest user may do anything)."""
        name = fresh_vhost_name()
        add_vhost(self.ctl, name, self.username)
        return name

    def delete_vhost(self, name):
        """Delete virtual host `name` with all its queues and exchanges."""
        self.ctl('delete_vhost', name)

    def config_mapping(self, virtual_host):
        """The ``amqp_*`` substitutions of
        :func:`~gocept.amqprun.testing.daemon.make_config`, with every node
        in ``amqp_hostname``."""
        broker = Broker(self.hostname_list(), self.nodes[0].port,
                        self.username, self.password)
        return broker.config_mapping(virtual_host)

    def _boot(self, deadline):
        """Make directory, epmd and nodes; boot all nodes side by side."""
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix='amqprun-cluster-')
            self._owns_directory = True
        self._epmd = Epmd(self.directory)
        self._epmd.start(deadline)
        cookie = new_cookie()
        for number in range(1, self.size + 1):
            self.nodes.append(RabbitMQNode(
                os.path.join(self.directory, 'node-%d' % number),
                self.config_lines,
                nodename='%s-%d@localhost' % (self.prefix, number),
                epmd=self._epmd, cookie=cookie))
        for node in self.nodes:
            node.start(deadline - time.monotonic(), wait=False)
        for node in self.nodes:
            node.wait_until_started(deadline - time.monotonic())

    def _join(self):
        """Join nodes 2 and up to node 1, one after the other."""
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl('stop_app')
            node.ctl('join_cluster', first.nodename)
            node.ctl('start_app')


def _write(path, text):
    """Write `text` to the file at `path`."""
    with open(path, 'w') as f:
        f.write(text)


class Broker:
    """Connection settings of a broker plus virtual host administration.

    ``node`` is the ``RabbitMQNode`` of a private broker (None for one of
    your own); a node with certificates gives ``ssl_port`` and
    ``certificates``.
    """

    def __init__(self, hostname, port, username, password,
                 virtual_host=None, node=None):
        self.hostname = hostname
        self.port = port
        self.username = username
        self.password = password
        #: A fixed virtual host to use instead of a fresh one per module.
        self.virtual_host = virtual_host
        self.node = node

    @classmethod
    def from_environment(cls):
        """The broker named by ``AMQP_*`` variables, or None."""
        hostname = os.environ.get('AMQP_HOSTNAME')
        if not hostname:
            return None
        return cls(hostname, int(os.environ.get('AMQP_PORT', 5672)),
                   os.environ.get('AMQP_USERNAME', 'guest'),
                   os.environ.get('AMQP_PASSWORD', 'guest'),
                   os.environ.get('AMQP_VIRTUALHOST'))

    @classmethod
    def start_private_node(cls, **kw):
        """Start a private loopback RabbitMQ node (stop it with stop()).

        Takes the keywords of :class:`RabbitMQNode`.
        """
        node = RabbitMQNode(**kw)
        node.start()
        return cls(node.hostname, node.port, node.username, node.password,
                   node=node)

    @property
    def ssl_port(self):
        """The TLS port of a private node with certificates, else None."""
        return self.node.ssl_port if self.node is not None else None

    @property
    def certificates(self):
        """The :class:`~gocept.amqprun.testing.certificates.Certificates`
        of a private TLS node, else None."""
        return self.node.certificates if self.node is not None else None

    def stop(self):
        """Stop the private node, if this broker is one."""
        if self.node is not None:
            self.node.stop()

    def create_vhost(self):
        """Return a fresh virtual host (or the fixed one)."""
        if self.virtual_host:
            return self.virtual_host
        name = fresh_vhost_name()
        add_vhost(self.ctl, name, self.username)
        return name

    def delete_vhost(self, name):
        """Delete a virtual host made by :meth:`create_vhost`."""
        if name != self.virtual_host:
            self.ctl('delete_vhost', name)

    def ctl(self, *args):
        """Run ``rabbitmqctl`` with ``args`` against this broker; return its
        output.

        A private node runs its own; for a broker of your own,
        ``AMQP_RABBITMQCTL`` names the command (default ``rabbitmqctl``).
        Raises RuntimeError when the command fails.
        """
        if self.node is not None:
            return self.node.ctl(*args)
        command = shlex.split(
            os.environ.get('AMQP_RABBITMQCTL', 'rabbitmqctl')) + list(args)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError('%s failed: %s' % (
                ' '.join(command), result.stdout + result.stderr))
        return result.stdout

    _ctl = ctl

    def parameters(self, virtual_host, **kw):
        """:class:`gocept.amqprun.connection.Parameters` for a vhost."""
        return gocept.amqprun.connection.Parameters(
            hostname=self.hostname, port=self.port, username=self.username,
            password=self.password, virtual_host=virtual_host, **kw)

    def config_mapping(self, virtual_host):
        """The ``amqp_*`` substitutions for configuration templates."""
        return dict(amqp_hostname=self.hostname, amqp_port=self.port,
                    amqp_username=self.username,
                    amqp_password=self.password,
                    amqp_virtualhost=virtual_host)


_broker = None


def get_broker():
    """The broker of this test run (started on first use)."""
    global _broker
    if _broker is None:
        _broker = Broker.from_environment() or Broker.start_private_node()
    return _broker


def stop_broker():
    """Stop the private broker of this test run, if one was started."""
    global _broker
    if _broker is not None:
        _broker.stop()
        _broker = None
