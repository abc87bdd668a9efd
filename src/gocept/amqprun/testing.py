"""Test support for gocept.amqprun and for its users' test suites.

Runs on: the test thread (plus the daemon's threads it starts).

Everything runs against a real broker: the one named by ``AMQP_HOSTNAME``,
``AMQP_PORT``, ``AMQP_USERNAME``, ``AMQP_PASSWORD`` (and, to use an existing
virtual host instead of fresh ones, ``AMQP_VIRTUALHOST``), or else a
private loopback RabbitMQ node started once per test run (Debian's
``rabbitmq-server`` package must be installed). Fresh virtual hosts are made
with ``rabbitmqctl`` (``AMQP_RABBITMQCTL`` names the command for a broker of
your own).

pytest
    This module is a pytest plugin, registered through the entry point
    ``gocept.amqprun.testing`` when the ``testing`` extra is installed (or
    name it in your top-level ``conftest.py``: ``pytest_plugins =
    ['gocept.amqprun.testing']``). Fixtures: ``amqp_broker`` (session),
    ``amqp_vhost`` (a fresh virtual host per test module),
    ``amqp_parameters``, ``amqp_client`` (a :class:`Client`: send, expect,
    wait), ``clean_registry`` and the factories ``amqp_config``,
    ``amqp_main`` (the real ``main()`` in a thread, a :class:`MainThread`)
    and ``amqp_server_process`` (the ``server`` script in a subprocess, a
    :class:`ServerProcess`).

unittest and zope.testrunner
    :class:`QueueTestCase` and :class:`MainTestCase` (their ``layer`` is
    :class:`BrokerLayer`); with plain unittest or pytest, which know no
    layers, each test class gets a fresh virtual host instead.
"""
import email.utils
import logging
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

import amqp
import zope.component
import zope.component.globalregistry

import gocept.amqprun.config
import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.main
import gocept.amqprun.process
import gocept.amqprun.rabbitmq
import gocept.amqprun.server

try:
    import pytest
except ImportError:  # pragma: no cover (unittest users need no pytest)
    pytest = None


def wait_for(condition, timeout=10, interval=0.02, message=None):
    """Poll ``condition()`` until it is true; return its value.

    Raises AssertionError with ``message`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                message or 'Condition not met within %s s' % timeout)
        time.sleep(interval)


def script(name):
    """The path of the console script ``name`` of this installation.

    It is looked for next to ``sys.executable`` (a virtualenv, a system
    Python), then next to the running script (``bin/`` of a buildout,
    where ``bin/test`` has ``bin/server`` beside it).
    """
    for directory in (os.path.dirname(sys.executable),
                      os.path.dirname(os.path.abspath(sys.argv[0]))):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise RuntimeError('Console script %r not found' % name)


def subprocess_environment(env=None, **variables):
    """``env`` (default: ``os.environ``) plus ``variables``, with this
    process's ``sys.path`` as ``PYTHONPATH``.

    A Python subprocess started with it imports what this process imports,
    also when a buildout script set up ``sys.path`` here.
    """
    env = dict(os.environ if env is None else env, **variables)
    env['PYTHONPATH'] = os.pathsep.join(path for path in sys.path if path)
    return env


# -- the broker --------------------------------------------------------------

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
        gocept.amqprun.rabbitmq.ensure_installed()
        node = gocept.amqprun.rabbitmq.RabbitMQNode(**kw)
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


# -- a plain AMQP client: the other side of the daemon -----------------------

class Client:
    """An independent py-amqp client to send and receive test messages."""

    def __init__(self, broker, virtual_host):
        self.connection = amqp.Connection(
            host='%s:%s' % (broker.hostname, broker.port),
            userid=broker.username, password=broker.password,
            virtual_host=virtual_host)
        self.connection.connect()
        self.channel = self.connection.channel()
        self.receive_queue, _, _ = self.channel.queue_declare(
            exclusive=True)
        self._queues = []

    def close(self):
        """Delete the queues made with :meth:`queue_name`; disconnect."""
        for name in self._queues:
            try:
                self.channel.queue_delete(name)
            except Exception:  # pragma: no cover (best-effort cleanup)
                break
        self.connection.close()

    def queue_name(self, suffix):
        """A unique queue name, deleted on close."""
        name = 'test.%s.%s' % (uuid.uuid4().hex[:8], suffix)
        self._queues.append(name)
        return name

    def send_message(self, body, routing_key='', headers=None,
                     **properties):
        """Publish a message to ``amq.topic``; return its message id."""
        properties.setdefault('message_id',
                              email.utils.make_msgid('gocept.amqprun.test'))
        properties.setdefault('timestamp', int(time.time()))
        properties.setdefault('delivery_mode', 2)
        self.channel.basic_publish(
            amqp.Message(body, application_headers=headers or {},
                         **properties),
            exchange='amq.topic', routing_key=routing_key)
        return properties['message_id']

    def expect_message_on(self, routing_key):
        """Receive messages sent to ``routing_key`` from now on."""
        self.channel.queue_bind(self.receive_queue, 'amq.topic', routing_key)

    expect_response_on = expect_message_on

    def wait_for_message(self, timeout=10):
        """Return the next received message; RuntimeError on timeout.

        The message is py-amqp's: ``body`` (bytes, or text when the sender
        set ``content_encoding``), ``properties`` (``message_id``,
        ``correlation_id``, ``application_headers``, ...), ``headers``
        (the application headers) and ``delivery_info`` (``routing_key``,
        ``exchange``).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.channel.basic_get(self.receive_queue, no_ack=True)
            if message is not None:
                return message
            time.sleep(0.02)
        raise RuntimeError('No message received')

    wait_for_response = wait_for_message

    def wait_for_messages(self, count, timeout=30):
        """Return ``count`` received messages; RuntimeError on timeout."""
        deadline = time.monotonic() + timeout
        messages = []
        while len(messages) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError('Received %d of %d messages' % (
                    len(messages), count))
            messages.append(self.wait_for_message(remaining))
        return messages

    def assert_no_message(self, wait=0.5):
        """Fail when a message arrives within ``wait`` seconds."""
        time.sleep(wait)
        message = self.channel.basic_get(self.receive_queue, no_ack=True)
        assert message is None, 'Unexpected message: %r' % message.body

    def queue_length(self, queue):
        """The number of ready messages in ``queue``."""
        _, count, _ = self.channel.queue_declare(queue, passive=True)
        return count


# -- configuration files -----------------------------------------------------

#: The configuration file template of :func:`make_config` (``string.Template``
#: syntax). Besides the ``amqp_*`` keys of :meth:`Broker.config_mapping`
#: it uses ``site_zcml``, ``workers``, ``log_level``, ``log_path``
#: (``STDOUT`` works), ``settings`` (``key value`` lines) and
#: ``amqp_extra``/``worker_extra`` (more lines for those sections).
CONFIG_TEMPLATE = """\
<eventlog>
  level ${log_level}
  <logfile>
    path ${log_path}
    format %(asctime)s %(levelname)s [%(threadName)s] %(name)s %(message)s
  </logfile>
</eventlog>
<amqp-server>
  hostname ${amqp_hostname}
  port ${amqp_port}
  username ${amqp_username}
  password ${amqp_password}
  virtual_host ${amqp_virtualhost}
  ${amqp_extra}
</amqp-server>
<worker>
  amount ${workers}
  component-configuration ${site_zcml}
  ${worker_extra}
</worker>
<settings>
  ${settings}
</settings>
"""


def site_zcml(*handlers):
    """Site ZCML that registers the handlers named by dotted paths.

    Each handler is registered under its own last name, e.g.
    ``site_zcml('mypackage.handlers.thank')`` registers ``thank``. Pass
    ZCML text of your own to :func:`make_config` for anything else.
    """
    registrations = ''.join(
        '  <utility component="%s" name="%s" />\n' % (
            path, path.rsplit('.', 1)[-1]) for path in handlers)
    return ('<configure xmlns="http://namespaces.zope.org/zope">\n'
            '  <include package="gocept.amqprun" />\n%s</configure>\n'
            % registrations)


def write_config(directory, zcml, conf, mapping, name=None):
    """Write ZCML and config templates (``string.Template``) to files.

    The files are ``<name>.zcml`` and ``<name>.conf`` in ``directory``
    (without a name: ``site.zcml`` and ``amqprun.conf``); ``conf`` may use
    ``${site_zcml}`` (the ZCML file's path) and the keys of ``mapping``.
    Returns the config file's path.
    """
    zcml_path = os.path.join(directory, (name or 'site') + '.zcml')
    with open(zcml_path, 'w') as f:
        f.write(string.Template(zcml).substitute(mapping))
    conf_path = os.path.join(directory, (name or 'amqprun') + '.conf')
    with open(conf_path, 'w') as f:
        f.write(string.Template(conf).substitute(mapping,
                                                 site_zcml=zcml_path))
    return conf_path


def make_config(directory, broker, virtual_host, zcml, workers=2,
                config=None, name='amqprun', **mapping):
    """Write a config file for ``broker``/``virtual_host``; return its path.

    ``zcml`` is the site ZCML (a template, see :func:`site_zcml`),
    ``config`` the config file template (default :data:`CONFIG_TEMPLATE`).
    The files are ``<name>.zcml`` and ``<name>.conf``; the log goes to
    ``<directory>/<name>.log`` unless ``log_path`` says otherwise.
    """
    values = dict(broker.config_mapping(virtual_host), workers=workers,
                  settings='', amqp_extra='', worker_extra='',
                  log_level='INFO',
                  log_path=os.path.join(directory, name + '.log'))
    values.update(mapping)
    return write_config(directory, zcml, config or CONFIG_TEMPLATE, values,
                        name=name)


def log_path_of(config_path, kw):
    """The log file of a config written by :func:`make_config` with ``kw``.
    """
    return kw.get('log_path', os.path.splitext(config_path)[0] + '.log')


def reset_registry():
    """Give zope.component a fresh, empty global registry."""
    zope.component.globalregistry.base.__init__('base')


def handler_queues():
    """The queue names of the handlers in the global registry."""
    return sorted({handler.queue_name for _, handler in
                   zope.component.getUtilitiesFor(
                       gocept.amqprun.interfaces.IHandler)})


class QueueProbe:
    """A connection that asks the broker how many messages queues hold."""

    def __init__(self, parameters):
        self.connection = amqp.Connection(
            host=parameters.address, userid=parameters.username or 'guest',
            password=parameters.password or 'guest',
            virtual_host=parameters.virtual_host)
        self.connection.connect()
        self.channel = self.connection.channel()

    def ready_counts(self, queues):
        """Return {queue: ready messages} as the broker sees it now.

        A queue that does not exist counts 0. Messages a consumer received
        but has not acknowledged yet are not counted (AMQP does not tell).
        """
        counts = {}
        for queue in queues:
            try:
                _, counts[queue], _ = self.channel.queue_declare(
                    queue, passive=True)
            except amqp.exceptions.NotFound:
                counts[queue] = 0
                self.channel = self.connection.channel()  # NOT_FOUND closed
        return counts

    def close(self):
        self.connection.close()


def wait_until_settled(is_busy, timeout, settle=0.1, interval=0.02,
                       message='Message was not processed.'):
    """Wait until ``is_busy()`` stayed false for ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while True:
        now = time.monotonic()
        if is_busy():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= settle:
            return
        if now > deadline:
            raise AssertionError(message)
        time.sleep(interval)


# -- running the daemon ------------------------------------------------------

class LoggingState:
    """What ``main()`` changes in the logging module, to undo it later.

    ``main()`` configures logging from the ``<eventlog>`` and ``<logger>``
    sections by adding handlers and setting levels; in a test process
    those would pile up from test to test.
    """

    def __init__(self):
        self._before = {name: (logger.level, list(logger.handlers),
                               logger.propagate)
                        for name, logger in self._loggers()}

    @staticmethod
    def _loggers():
        yield '', logging.getLogger()
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):
                yield name, logger

    def restore(self):
        """Remove (and close) the handlers added since; reset levels."""
        for name, logger in self._loggers():
            if name not in self._before:
                # A logger that first appeared meanwhile: only undo what
                # a <logger> section would have done to it.
                for handler in logger.handlers[:]:
                    logger.removeHandler(handler)
                    handler.close()
                continue
            level, handlers, propagate = self._before[name]
            for handler in logger.handlers[:]:
                if handler not in handlers:
                    logger.removeHandler(handler)
                    handler.close()
            logger.setLevel(level)
            logger.propagate = propagate


def _amqprun_threads():
    return [thread for thread in threading.enumerate()
            if thread.name == 'amqprun-io'
            or thread.name.startswith('amqprun-worker-')]


class MainThread:
    """Runs the real ``gocept.amqprun.main.run()`` in a thread.

    The complete daemon (ZConfig, logging, settings, ZCML, workers, the I/O
    thread) runs in the test process, so a test can look at the component
    registry and at module state. Only one can run at a time (``main``
    keeps the running server in a module global). The logging
    configuration of the config file is undone by :meth:`stop`.
    """

    def __init__(self, config_path, log_path=None):
        self.config_path = config_path
        #: Where the config file sends the log (for :attr:`log`), or None.
        self.log_path = log_path
        self.exit_status = None
        self.thread = threading.Thread(
            target=self._run, name='amqprun-main', daemon=True)
        self._started = threading.Event()
        self._logging = None

    def _run(self):
        self.exit_status = gocept.amqprun.main.run(self.config_path)

    def _on_process_started(self, event):
        self._started.set()

    @property
    def server(self):
        """The running :class:`gocept.amqprun.server.Server` (or None)."""
        return gocept.amqprun.process.server

    @property
    def log(self):
        """The log written so far (when :attr:`log_path` is a file)."""
        if not self.log_path or not os.path.exists(self.log_path):
            return ''
        with open(self.log_path, encoding='utf-8', errors='replace') as f:
            return f.read()

    def start(self, timeout=30):
        """Start ``run()`` and wait for ``ProcessStarted``; return self.

        Raises RuntimeError when ``main()`` exits during start-up (a bad
        configuration, an unreachable broker) and AssertionError when it is
        not up within ``timeout`` seconds.
        """
        if gocept.amqprun.process.server is not None:
            raise RuntimeError('Another main() is running in this process')
        self._logging = LoggingState()
        zope.component.getGlobalSiteManager().registerHandler(
            self._on_process_started,
            (gocept.amqprun.interfaces.IProcessStarted,))
        self.thread.start()
        try:
            wait_for(lambda: self._started.is_set()
                     or not self.thread.is_alive(), timeout,
                     message='Server did not start up.')
        except AssertionError:
            self.stop()
            raise
        if not self._started.is_set():
            self.thread.join()
            self._cleanup()
            raise RuntimeError('main() exited with status %s during '
                               'start-up:\n%s' % (self.exit_status, self.log))
        return self

    def stop(self, timeout=60):
        """Shut down as on SIGTERM; return the exit status.

        Fails when ``main()`` or one of its threads is still alive after
        ``timeout`` seconds.
        """
        gocept.amqprun.process.request_stop(0)
        self.thread.join(timeout)
        try:
            assert not self.thread.is_alive(), 'main() did not stop'
            wait_for(lambda: not _amqprun_threads(), 10,
                     message='Threads survived main(): %s' % ', '.join(
                         t.name for t in _amqprun_threads()))
        finally:
            if not self.thread.is_alive():
                self._cleanup()
        return self.exit_status

    def _cleanup(self):
        zope.component.getGlobalSiteManager().unregisterHandler(
            self._on_process_started,
            (gocept.amqprun.interfaces.IProcessStarted,))
        if self._logging is not None:
            self._logging.restore()
            self._logging = None

    def wait_for_processing(self, timeout=30, settle=0.1):
        """Wait until every message sent to the handlers' queues is handled.

        That is: the handlers' queues hold no ready message and no
        delivery is queued or being handled, for ``settle`` seconds in a
        row (which covers a delivery on its way from the broker). A message
        whose handler failed counts as handled; its retry is a new
        delivery.
        """
        server = self.server
        queues = handler_queues()
        probe = QueueProbe(server.parameters)

        def is_busy():
            if server.tasks.unfinished_tasks:
                return True
            return any(probe.ready_counts(queues).values())
        try:
            wait_until_settled(is_busy, timeout, settle)
        finally:
            probe.close()


class ServerProcess:
    """Runs the ``server`` script in a subprocess.

    Its output (the log, when the config file logs to ``STDOUT``) goes to
    ``<config>.out``. The subprocess gets this process's ``sys.path`` as
    ``PYTHONPATH``, so it imports the handlers your tests import.
    """

    def __init__(self, config_path, env=None, broker=None,
                 virtual_host=None):
        self.config_path = config_path
        self.output_path = config_path + '.out'
        self.env = subprocess_environment() if env is None else env
        #: For :meth:`wait_for_processing`.
        self.broker = broker
        self.virtual_host = virtual_host
        self.process = None

    @property
    def command(self):
        """The command line: ``main()`` of this Python's gocept.amqprun."""
        # Not ``-m gocept.amqprun.main``: that would run a second copy of
        # the module, whose request_stop() the rest of the process misses.
        return [sys.executable, '-c',
                'import gocept.amqprun.main; gocept.amqprun.main.main()',
                self.config_path]

    @property
    def pid(self):
        """The process id."""
        return self.process.pid

    def start(self, wait=False, timeout=30):
        """Start the process; with ``wait`` until it logs ``Process started``
        (which needs a log level of INFO or lower and the log on STDOUT).
        Returns self.
        """
        with open(self.output_path, 'wb') as output:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, env=self.env)
        if wait:
            self.wait_for_output('Process started', timeout)
        return self

    @property
    def output(self):
        """What the process printed so far."""
        with open(self.output_path, encoding='utf-8',
                  errors='replace') as f:
            return f.read()

    def wait_for_output(self, text, timeout=30):
        """Wait until ``text`` appears in the output."""
        wait_for(lambda: text in self.output or self.process.poll()
                 is not None, timeout,
                 message='%r not in output:\n%s' % (text, self.output))
        assert text in self.output, 'Process exited (%s):\n%s' % (
            self.process.returncode, self.output)

    def wait_for_processing(self, timeout=60, settle=0.1):
        """Wait until no queue with a consumer holds a message.

        Counts ready and unacknowledged messages with ``rabbitmqctl``, so it
        needs the ``broker`` and ``virtual_host`` (and takes about a second
        per look).
        """
        if self.broker is None:
            raise RuntimeError('wait_for_processing needs the broker and the '
                               'virtual host of the process')

        def is_busy():
            output = self.broker.ctl(
                'list_queues', '-q', '--no-table-headers', '-p',
                self.virtual_host, 'messages', 'consumers')
            for line in output.splitlines():
                messages, consumers = line.split()
                if int(consumers) and int(messages):
                    return True
            return False
        wait_until_settled(is_busy, timeout, settle, interval=0)

    def signal(self, signum=signal.SIGTERM):
        """Send a signal to the process."""
        self.process.send_signal(signum)

    def wait(self, timeout=60):
        """Wait for the exit; return the exit status.

        Kills the process and fails when it is still running after
        ``timeout`` seconds.
        """
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError('Process did not exit:\n' + self.output)

    def stop(self, timeout=60):
        """SIGTERM (as ``zdaemon stop`` sends), then :meth:`wait`."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self):
        """Stop the process if it still runs (SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# -- pytest ------------------------------------------------------------------

if pytest is not None:

    @pytest.fixture(scope='session')
    def amqp_broker():
        """The :class:`Broker` of this test run."""
        yield get_broker()
        stop_broker()

    @pytest.fixture(scope='module')
    def amqp_vhost(amqp_broker):
        """A fresh virtual host for the test module (its name)."""
        name = amqp_broker.create_vhost()
        yield name
        amqp_broker.delete_vhost(name)

    @pytest.fixture
    def amqp_parameters(amqp_broker, amqp_vhost):
        """:class:`gocept.amqprun.connection.Parameters` for the module's
        virtual host."""
        return amqp_broker.parameters(amqp_vhost)

    @pytest.fixture
    def amqp_client(amqp_broker, amqp_vhost):
        """A :class:`Client` on the module's virtual host."""
        client = Client(amqp_broker, amqp_vhost)
        yield client
        client.close()

    @pytest.fixture
    def clean_registry():
        """A fresh global component registry for the test."""
        reset_registry()
        yield
        reset_registry()

    @pytest.fixture
    def amqp_config(amqp_broker, amqp_vhost, tmp_path):
        """Factory: ``amqp_config(zcml, workers=2, ...)`` -> config path.

        Writes the site ZCML and a config file for the module's virtual
        host into ``tmp_path``; see :func:`make_config` for the keywords.
        """
        names = ('amqprun-%d' % number for number in range(1, 1000))

        def write(zcml, **kw):
            kw.setdefault('name', next(names))
            return make_config(str(tmp_path), amqp_broker, amqp_vhost, zcml,
                               **kw)
        return write

    @pytest.fixture
    def amqp_main(amqp_config, clean_registry):
        """Factory: ``amqp_main(zcml, workers=2, ...)`` runs ``main()``.

        Takes the keywords of :func:`make_config`. Returns a started
        :class:`MainThread`; it is stopped after the test (and the test
        fails if it does not stop).
        """
        started = []

        def start(zcml, **kw):
            config = amqp_config(zcml, **kw)
            runner = MainThread(config, log_path=log_path_of(config, kw))
            started.append(runner)
            return runner.start()

        yield start
        for runner in started:
            if runner.thread.is_alive():
                runner.stop()

    @pytest.fixture
    def amqp_server_process(amqp_broker, amqp_vhost, amqp_config):
        """Factory: ``amqp_server_process(zcml, workers=2, ...)`` runs the
        ``server`` script in a subprocess, logging to its output.

        Returns a started :class:`ServerProcess` (pass ``wait=False`` not
        to wait for ``Process started``); it is stopped after the test.
        """
        started = []

        def start(zcml, wait=True, env=None, **kw):
            kw.setdefault('log_path', 'STDOUT')
            process = ServerProcess(amqp_config(zcml, **kw), env=env,
                                    broker=amqp_broker,
                                    virtual_host=amqp_vhost)
            started.append(process)
            return process.start(wait=wait)

        yield start
        for process in started:
            if process.process.poll() is None:
                try:
                    process.stop(30)
                finally:
                    process.kill()


# -- unittest / zope.testrunner ----------------------------------------------

class BrokerLayer:
    """zope.testrunner layer: the broker of the run and a fresh vhost.

    ``BrokerLayer.broker`` and ``BrokerLayer.virtual_host`` are set while
    the layer is set up.
    """

    broker = None
    virtual_host = None

    @classmethod
    def setUp(cls):
        cls.broker = get_broker()
        cls.virtual_host = cls.broker.create_vhost()

    @classmethod
    def tearDown(cls):
        cls.broker.delete_vhost(cls.virtual_host)
        cls.broker = cls.virtual_host = None
        stop_broker()


#: The 1.x name of the layer.
BROKER_LAYER = QUEUE_LAYER = BrokerLayer


class QueueTestCase(unittest.TestCase):
    """Send messages, expect them on routing keys, wait for them.

    Under zope.testrunner the :class:`BrokerLayer` provides broker and
    virtual host; with runners that know no layers (``python -m
    unittest``, pytest) each test class gets a fresh virtual host and the
    private broker, if one was started, stops at interpreter exit.
    """

    layer = BrokerLayer

    #: The broker and the virtual host the tests of this class use.
    broker = None
    virtual_host = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if BrokerLayer.virtual_host is not None:
            cls.broker = BrokerLayer.broker
            cls.virtual_host = BrokerLayer.virtual_host
        else:  # a runner that knows no layers
            cls.broker = get_broker()
            cls.virtual_host = cls.broker.create_vhost()
            cls.addClassCleanup(cls.broker.delete_vhost, cls.virtual_host)

    def setUp(self):
        super().setUp()
        if BrokerLayer.virtual_host is not None:
            # zope.testrunner sets up the layer but calls no setUpClass
            self.broker = BrokerLayer.broker
            self.virtual_host = BrokerLayer.virtual_host
        self.client = Client(self.broker, self.virtual_host)
        self.addCleanup(self.client.close)

    def get_queue_name(self, suffix):
        """A unique queue name, deleted after the test."""
        return self.client.queue_name(suffix)

    def send_message(self, body, routing_key='', headers=None,
                     **properties):
        """Publish a message to ``amq.topic``; return its message id."""
        return self.client.send_message(body, routing_key, headers,
                                        **properties)

    def expect_message_on(self, routing_key):
        """Receive what is sent to ``routing_key`` from now on."""
        self.client.expect_message_on(routing_key)

    expect_response_on = expect_message_on

    def wait_for_message(self, timeout=10):
        """The next received message (RuntimeError on timeout)."""
        return self.client.wait_for_message(timeout)

    wait_for_response = wait_for_message

    def create_server(self, **kw):
        """An unstarted Server on the test's virtual host."""
        setup_handlers = kw.pop('setup_handlers', True)
        return gocept.amqprun.server.Server(
            self.broker.parameters(self.virtual_host, **kw),
            setup_handlers=setup_handlers)


class MainTestCase(QueueTestCase):
    """Runs the real ``main()``, in-process or in a subprocess.

    Each test gets a fresh global component registry and a temporary
    directory for the configuration files; a server still running at the
    end of the test is stopped.
    """

    def setUp(self):
        super().setUp()
        reset_registry()
        self.addCleanup(reset_registry)
        self.tmpdir = tempfile.mkdtemp(prefix='amqprun-test-')
        self.addCleanup(_rmtree, self.tmpdir)
        self.main = None
        self.process = None
        self._names = ('amqprun-%d' % number for number in range(1, 1000))

    def make_config(self, zcml, **kw):
        """Write the site ZCML and a config file; return its path.

        Takes the keywords of :func:`make_config`.
        """
        kw.setdefault('name', next(self._names))
        return make_config(self.tmpdir, self.broker, self.virtual_host, zcml,
                           **kw)

    def start_server(self, zcml, **kw):
        """Run ``main()`` in a thread; return the :class:`MainThread`."""
        config = self.make_config(zcml, **kw)
        self.main = MainThread(config, log_path=log_path_of(config, kw))
        self.addCleanup(self._stop_main, self.main)
        return self.main.start()

    def start_server_in_subprocess(self, zcml, wait=True, **kw):
        """Run the ``server`` script; return the :class:`ServerProcess`."""
        kw.setdefault('log_path', 'STDOUT')
        self.process = ServerProcess(
            self.make_config(zcml, **kw), broker=self.broker,
            virtual_host=self.virtual_host)
        self.addCleanup(self._stop_process, self.process)
        return self.process.start(wait=wait)

    def stop_server(self):
        """Stop the server started last; return its exit status."""
        if self.process is not None:
            return self.process.stop()
        return self.main.stop()

    def wait_for_processing(self, timeout=30):
        """Wait until the server has handled the messages sent so far."""
        (self.process or self.main).wait_for_processing(timeout)

    @staticmethod
    def _stop_main(main):
        if main.thread.is_alive():
            main.stop()

    @staticmethod
    def _stop_process(process):
        if process.process.poll() is None:
            try:
                process.stop(30)
            finally:
                process.kill()


def _rmtree(path):
    shutil.rmtree(path, ignore_errors=True)
