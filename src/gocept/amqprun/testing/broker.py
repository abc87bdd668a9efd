"""The broker of a test run: a private RabbitMQ node or one of your own.

Runs on: the test's thread (a test session, a layer, the quick start
script); it starts and stops child processes and runs ``rabbitmqctl``, but
never speaks AMQP itself.

:class:`RabbitMQNode` runs Debian's ``rabbitmq-server`` as a child process
whose every file (database, logs, cookie, configuration) lives in one
directory and whose every port (AMQP, Erlang distribution, epmd) is bound
to 127.0.0.1. The system broker, ``/etc/rabbitmq`` and ``/var/lib/rabbitmq``
are neither used nor touched, and no process is ever stopped by name. The
package must be installed beforehand (``apt-get install rabbitmq-server``;
``./dev.sh`` does it); this module never installs anything.

:class:`Broker` is what tests use: connection settings plus virtual host
administration, for the broker named by ``AMQP_*`` variables or for a
private node. :func:`get_broker` gives the one broker of a test run and
:func:`stop_broker` stops it.
"""
import atexit
import glob
import itertools
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import uuid

import gocept.amqprun.connection


log = logging.getLogger(__name__)

RABBITMQ_BIN = '/usr/lib/rabbitmq/bin'
RABBITMQ_SERVER = os.path.join(RABBITMQ_BIN, 'rabbitmq-server')
RABBITMQCTL = os.path.join(RABBITMQ_BIN, 'rabbitmqctl')
EPMD = 'epmd'

#: Keeps the Erlang distribution on loopback (it listens on every interface
#: otherwise) and forbids Erlang to start an ``epmd -daemon`` of its own,
#: which would outlive the node; we run our own epmd as a child instead.
ERL_ARGS = '-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false'

STOP_TIMEOUT = 20
POLL_INTERVAL = 0.1
LOG_TAIL_LINES = 40

_node_numbers = itertools.count(1)


def require_rabbitmq_server():
    """Raise RuntimeError naming the package when rabbitmq-server is missing.
    """
    if not os.path.exists(RABBITMQ_SERVER):
        raise RuntimeError(
            'rabbitmq-server is not installed (%s is missing): '
            'apt-get install rabbitmq-server' % RABBITMQ_SERVER)


class RabbitMQNode:
    """One private RabbitMQ node: start it, administer it, stop it.

    `directory` holds everything the node writes; when it is None a
    temporary directory is created on :meth:`start` and removed on
    :meth:`stop`. `config_lines` are appended to the node's
    ``rabbitmq.conf`` (for example ``'consumer_timeout = 5000'``).

    Not thread-safe: start, administer and stop the node from one thread.
    Usable as a context manager (start on enter, stop on exit).
    """

    hostname = '127.0.0.1'
    username = 'guest'
    password = 'guest'

    def __init__(self, directory=None, config_lines=()):
        self.directory = directory
        self.config_lines = tuple(config_lines)
        self.port = None
        self.nodename = None
        self._owns_directory = False
        self._env = None
        self._epmd = None
        self._server = None

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
        """Process id of the node's own epmd (None when not running)."""
        return self._epmd.pid if self._epmd is not None else None

    @property
    def log_file(self):
        """Path of the node's main log file (None before :meth:`start`)."""
        if self._env is None:
            return None
        return self._env['RABBITMQ_LOGS']

    def start(self, timeout=90):
        """Start epmd and the node; return once the node accepts AMQP.

        Raises :class:`RuntimeError` carrying the tail of the node's log
        when a process dies early or the node is not up within `timeout`
        seconds; whatever was started is stopped before that. The node is
        stopped at interpreter exit at the latest.
        """
        if self._epmd is not None or self._server is not None:
            raise RuntimeError('RabbitMQ node %s is already running'
                               % self.nodename)
        require_rabbitmq_server()
        atexit.register(self.stop)
        began = time.monotonic()
        try:
            self._prepare()
            self._start_epmd(began + timeout)
            self._start_server(began + timeout)
        except BaseException:
            self.stop()
            raise
        log.info('RabbitMQ node %s listens on %s:%d (started in %.1f s)',
                 self.nodename, self.hostname, self.port,
                 time.monotonic() - began)

    def stop(self):
        """Stop the node, then epmd, and remove a temporary directory.

        Each process gets SIGTERM and up to 20 seconds, then SIGKILL;
        whatever is left in its process group is killed. Calling it again
        (or on a node never started) does nothing.
        """
        atexit.unregister(self.stop)
        if self._server is not None:
            log.info('Stopping RabbitMQ node %s', self.nodename)
            _terminate(self._server, 'rabbitmq-server')
            self._server = None
        if self._epmd is not None:
            _terminate(self._epmd, 'epmd')
            self._epmd = None
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            self._owns_directory = False

    def restart(self, timeout=90):
        """Stop the node's server and start it again, as a broker restart.

        Same directory, node name and ports (epmd keeps running), so
        durable queues and persistent messages survive and clients can
        reconnect to the same address. Raises :class:`RuntimeError` as
        :meth:`start` does.
        """
        if self._server is None:
            raise RuntimeError('RabbitMQ node is not running')
        log.info('Restarting RabbitMQ node %s', self.nodename)
        _terminate(self._server, 'rabbitmq-server')
        self._server = None
        began = time.monotonic()
        try:
            self._start_server(began + timeout)
        except BaseException:
            self.stop()
            raise

    def ctl(self, *args, timeout=60):
        """Run ``rabbitmqctl`` with `args` against this node; return stdout.

        Raises :class:`RuntimeError` on a non-zero exit status or when the
        command takes longer than `timeout` seconds.
        """
        if self._server is None:
            raise RuntimeError('RabbitMQ node is not running')
        command = [RABBITMQCTL, '-n', self.nodename] + list(args)
        description = 'rabbitmqctl %s' % ' '.join(args)
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
        self.ctl('add_vhost', name)
        self.ctl('set_permissions', '-p', name, self.username,
                 '.*', '.*', '.*')

    def delete_vhost(self, name):
        """Delete virtual host `name` with all its queues and exchanges."""
        self.ctl('delete_vhost', name)

    def _prepare(self):
        """Choose directory, name and ports; write the node's files."""
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix='amqprun-rabbitmq-')
            self._owns_directory = True
        self.directory = os.path.abspath(self.directory)
        self.nodename = 'amqprun-%d-%d@localhost' % (
            os.getpid(), next(_node_numbers))
        self.port, dist_port, epmd_port = _free_ports(3)
        self._env = self._environment(dist_port, epmd_port)
        for name in ('conf.d', 'log', 'mnesia'):
            os.makedirs(os.path.join(self.directory, name), exist_ok=True)
        _write(self._env['RABBITMQ_CONF_ENV_FILE'], '')
        _write(self._env['RABBITMQ_ENABLED_PLUGINS_FILE'], '[].\n')
        _write(self._env['RABBITMQ_CONFIG_FILE'], self._config())
        self._write_cookie()

    def _environment(self, dist_port, epmd_port):
        """Return the environment for the node and for ``rabbitmqctl``.

        Everything inherited that configures RabbitMQ or Erlang is dropped,
        so the node ignores the system broker's settings.
        """
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(('RABBITMQ_', 'ERL_'))}
        path = self.directory
        env.update(
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
            ERL_EPMD_PORT=str(epmd_port),
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
        return env

    def _config(self):
        """Return the text of the node's ``rabbitmq.conf``."""
        lines = [
            'listeners.tcp.default = %s:%d' % (self.hostname, self.port),
            'loopback_users.%s = true' % self.username,
            'log.console = false',
        ]
        lines.extend(self.config_lines)
        return '\n'.join(lines) + '\n'

    def _write_cookie(self):
        """Write the Erlang cookie the node and ``rabbitmqctl`` share.

        Written before either starts: otherwise both may race to create
        ``$HOME/.erlang.cookie`` with different contents.
        """
        path = os.path.join(self.directory, '.erlang.cookie')
        if os.path.exists(path):
            return
        cookie = ''.join(secrets.choice(string.ascii_uppercase)
                         for _ in range(20))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, 'w') as f:
            f.write(cookie)

    def _start_epmd(self, deadline):
        """Start our own epmd and wait until it listens."""
        port = int(self._env['ERL_EPMD_PORT'])
        self._epmd = self._spawn(
            [EPMD, '-address', self.hostname, '-port', str(port)],
            'epmd.log')
        while not _accepts_connections(self.hostname, port):
            self._check_progress(deadline, 'epmd on port %d' % port)
            time.sleep(POLL_INTERVAL)

    def _start_server(self, deadline):
        """Start rabbitmq-server and wait until it has fully booted.

        The AMQP port opens near the end of the boot, long after the node
        registered with epmd; ``rabbitmqctl await_startup`` (which exits
        69 at once for a node not yet registered) then confirms that the
        node itself considers the boot finished.
        """
        self._server = self._spawn([RABBITMQ_SERVER], 'stdout.log')
        while not _accepts_connections(self.hostname, self.port):
            self._check_progress(deadline, 'the AMQP port %d' % self.port)
            time.sleep(POLL_INTERVAL)
        try:
            remaining = max(1, int(deadline - time.monotonic()))
            self.ctl('await_startup', '--timeout', str(remaining),
                     timeout=remaining + 10)
        except RuntimeError as e:  # pragma: no cover (the port is open)
            raise self._failure(str(e))

    def _spawn(self, command, output_name):
        """Start `command` in its own session, output to a log file.

        Its own session (and so process group) keeps a Ctrl-C in the
        terminal away from it and lets :meth:`stop` kill its children.
        """
        output_path = os.path.join(self.directory, 'log', output_name)
        with open(output_path, 'ab') as output:
            process = subprocess.Popen(
                command, env=self._env, cwd=self.directory,
                stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True)
        log.debug('Started %s as pid %d', command[0], process.pid)
        return process

    def _check_progress(self, deadline, waiting_for):
        """Raise RuntimeError if a child died or `deadline` has passed."""
        for process, name in ((self._epmd, 'epmd'),
                              (self._server, 'rabbitmq-server')):
            if process is not None and _has_exited(process):
                raise self._failure(
                    '%s (pid %d) exited early while waiting for %s'
                    % (name, process.pid, waiting_for))
        if time.monotonic() > deadline:
            raise self._failure('RabbitMQ node %s: timed out waiting for %s'
                                % (self.nodename, waiting_for))

    def _failure(self, reason):
        """Return a RuntimeError with `reason` and the tail of the logs."""
        return RuntimeError('%s\n%s' % (reason, self._log_tail()))

    def _log_tail(self):
        """Return the last lines of each log file in the node's directory."""
        parts = []
        for path in sorted(glob.glob(
                os.path.join(self.directory, 'log', '*.log'))):
            with open(path, errors='replace') as f:
                lines = f.readlines()[-LOG_TAIL_LINES:]
            parts.append('--- %s ---\n%s' % (path, ''.join(lines)))
        return ''.join(parts) or '(no log written)'


def _free_ports(count):
    """Return `count` distinct TCP ports free on loopback right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(('127.0.0.1', 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _accepts_connections(host, port):
    """Whether a TCP connection to `host`:`port` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _has_exited(process):
    """Whether `process` has exited, without reaping it.

    Not reaping keeps the pid (and so the process group id) reserved for
    us until :func:`_terminate` has signalled the group.
    """
    try:
        info = os.waitid(os.P_PID, process.pid,
                         os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # pragma: no cover (SIGCHLD is ignored)
        return True  # the kernel reaped it already
    return info is not None


def _terminate(process, name):
    """SIGTERM `process`, SIGKILL it after a grace period, reap it.

    Afterwards SIGKILL goes to its whole process group (its id is the
    pid, as the process leads its own session), which removes any child
    left behind, such as Erlang's port programs.
    """
    if not _has_exited(process):
        _signal(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while not _has_exited(process) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if not _has_exited(process):
            log.warning('%s (pid %d) ignored SIGTERM for %s s, killing it',
                        name, process.pid, STOP_TIMEOUT)
    _signal(-process.pid, signal.SIGKILL)
    process.wait()
    log.debug('%s (pid %d) exited with %s', name, process.pid,
              process.returncode)


def _signal(pid, signum):
    """Send `signum` to `pid` (a group when negative); ignore ESRCH."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # pragma: no cover (see _has_exited)
        pass


def _write(path, text):
    """Write `text` to the file at `path`."""
    with open(path, 'w') as f:
        f.write(text)


class Broker:
    """Connection settings of a broker plus virtual host administration."""

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
        """Start a private loopback RabbitMQ node (stop it with stop())."""
        node = RabbitMQNode(**kw)
        node.start()
        return cls(node.hostname, node.port, node.username, node.password,
                   node=node)

    def stop(self):
        """Stop the private node, if this broker is one."""
        if self.node is not None:
            self.node.stop()

    def create_vhost(self):
        """Return a fresh virtual host (or the fixed one)."""
        if self.virtual_host:
            return self.virtual_host
        name = 'test.%s' % uuid.uuid4().hex[:12]
        self.ctl('add_vhost', name)
        self.ctl('set_permissions', '-p', name, self.username,
                 '.*', '.*', '.*')
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
