"""Child processes of the broker harness: started in a session, stopped by pid.

Runs on: the test's thread (whoever starts the processes stops them); no
threads of its own.

Every process is started in a session of its own, with its output in a
log file, and stopped by its pid: SIGTERM, a grace period, then SIGKILL to
its whole process group, which takes any child it left behind. Nothing is
ever stopped by name, so brokers of other users on the machine are safe.
:class:`Epmd` is the Erlang port mapper of one node or one cluster; every
port is bound to 127.0.0.1 and chosen by :func:`free_ports`.
"""
import glob
import logging
import os
import signal
import socket
import subprocess
import time


log = logging.getLogger(__name__)

HOSTNAME = '127.0.0.1'
EPMD = 'epmd'
STOP_TIMEOUT = 20
POLL_INTERVAL = 0.1
LOG_TAIL_LINES = 40

#: Ports :func:`free_ports` gave out: never twice in one process, so nodes
#: prepared one after the other cannot be handed the same port.
_ports_handed_out = set()


class Epmd:
    """Our own epmd (Erlang's port mapper) on a free loopback port.

    Erlang nodes find each other through epmd: nodes that are to form a
    cluster must use the same one (``ERL_EPMD_PORT``). Its output goes to
    ``log/epmd.log`` in `directory`. Our own child, because an ``epmd
    -daemon`` that Erlang starts by itself outlives the nodes.
    """

    hostname = HOSTNAME

    def __init__(self, directory):
        self.directory = directory
        [self.port] = free_ports(1)
        #: The running epmd's Popen (None when not running).
        self.process = None

    @property
    def pid(self):
        """Process id of epmd (None when not running)."""
        return self.process.pid if self.process is not None else None

    def start(self, deadline):
        """Start epmd; return once it listens.

        Raises RuntimeError with its log when it exits early or does not
        listen by `deadline` (a :func:`time.monotonic` value); it is
        stopped before that. Starting a running epmd is a RuntimeError
        (the second could not listen, and the first would be lost).
        """
        if self.process is not None:
            raise RuntimeError('epmd (pid %d) is already running'
                               % self.process.pid)
        # EPMD is looked up at call time: tests replace it.
        self.process = spawn(
            [EPMD, '-address', self.hostname, '-port', str(self.port)],
            self.directory, 'epmd.log')
        try:
            wait_until_listening(self.port, [(self.process, 'epmd')],
                                 deadline, 'epmd on port %d' % self.port,
                                 self.directory)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        """Stop epmd (see :func:`terminate`); again, it does nothing."""
        if self.process is not None:
            terminate([(self.process, 'epmd')])
            self.process = None


def clean_environment(**variables):
    """``os.environ`` without anything that configures RabbitMQ or Erlang,
    plus `variables`: children ignore the system broker's settings."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(('RABBITMQ_', 'ERL_'))}
    env.update(variables)
    return env


def spawn(command, directory, output_name, env=None, **options):
    """Start `command` in `directory` in its own session; return the Popen.

    Output goes to ``log/<output_name>`` in `directory`. Its own session
    (and so process group) keeps a Ctrl-C in the terminal away from it and
    lets :func:`terminate` kill its children. `options` go to ``Popen``
    (e.g. ``user`` to run it as another user).
    """
    log_directory = os.path.join(directory, 'log')
    os.makedirs(log_directory, exist_ok=True)
    with open(os.path.join(log_directory, output_name), 'ab') as output:
        process = subprocess.Popen(
            command, env=clean_environment() if env is None else env,
            cwd=directory, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True, **options)
    log.debug('Started %s as pid %d', command[0], process.pid)
    return process


def wait_until_listening(port, processes, deadline, waiting_for, directory):
    """Wait until something accepts connections on loopback `port`.

    Raises RuntimeError, with the tail of the logs in `directory`, when
    one of `processes` (pairs of Popen and name) exits first or
    `deadline` (a :func:`time.monotonic` value) passes.
    """
    while not accepts_connections(HOSTNAME, port):
        check_progress(processes, deadline, waiting_for, directory)
        time.sleep(POLL_INTERVAL)


def check_progress(processes, deadline, waiting_for, directory):
    """Raise RuntimeError if one of `processes` exited or `deadline` passed.
    """
    for process, name in processes:
        if has_exited(process):
            raise failure('%s (pid %d) exited early while waiting for %s'
                          % (name, process.pid, waiting_for), directory)
    if time.monotonic() > deadline:
        raise failure('timed out waiting for %s' % waiting_for, directory)


def failure(reason, directory):
    """Return a RuntimeError with `reason` and the tail of the logs."""
    return RuntimeError('%s\n%s' % (reason, log_tail(directory)))


def log_tail(directory):
    """Return the last lines of each log file in ``directory/log``."""
    parts = []
    for path in sorted(glob.glob(os.path.join(directory, 'log', '*.log'))):
        with open(path, errors='replace') as f:
            lines = f.readlines()[-LOG_TAIL_LINES:]
        parts.append('--- %s ---\n%s' % (path, ''.join(lines)))
    return ''.join(parts) or '(no log written)'


def free_ports(count):
    """Return `count` TCP ports free on loopback now, each new to us."""
    sockets = []
    ports = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOSTNAME, 0))
            port = sock.getsockname()[1]
            if port not in _ports_handed_out:
                ports.append(port)
        _ports_handed_out.update(ports)
        return ports
    finally:
        for sock in sockets:
            sock.close()


def accepts_connections(host, port):
    """Whether a TCP connection to `host`:`port` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def has_exited(process):
    """Whether `process` has exited, without reaping it.

    Not reaping keeps the pid (and so the process group id) reserved for
    us until :func:`terminate` has signalled the group.
    """
    try:
        info = os.waitid(os.P_PID, process.pid,
                         os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # pragma: no cover (SIGCHLD is ignored)
        return True  # the kernel reaped it already
    return info is not None


def wait_for_exit(process, timeout):
    """Wait up to `timeout` seconds for `process` to exit (not reaping it);
    return whether it did."""
    deadline = time.monotonic() + timeout
    while not has_exited(process) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
    return has_exited(process)


def terminate(processes, signum=signal.SIGTERM):
    """Stop `processes` (pairs of Popen and name) together; reap them.

    Each gets `signum` at once, then all share a grace period of
    :data:`STOP_TIMEOUT` seconds; afterwards SIGKILL goes to each one's
    whole process group (its id is the pid, as each leads its own
    session), which removes any child left behind, such as Erlang's port
    programs. Stopping several at once takes as long as the slowest.
    """
    for process, name in processes:
        if not has_exited(process):
            send_signal(process.pid, signum)
    deadline = time.monotonic() + STOP_TIMEOUT
    for process, name in processes:
        if not wait_for_exit(process, max(0, deadline - time.monotonic())):
            log.warning('%s (pid %d) ignored %s for %s s, killing it',
                        name, process.pid, signal.Signals(signum).name,
                        STOP_TIMEOUT)
        send_signal(-process.pid, signal.SIGKILL)
        process.wait()
        log.debug('%s (pid %d) exited with %s', name, process.pid,
                  process.returncode)


def send_signal(pid, signum):
    """Send `signum` to `pid` (a group when negative); ignore ESRCH."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # pragma: no cover (see has_exited)
        pass
