"""Running the daemon in tests: configuration files, in-process, subprocess.

Runs on: the test's thread; :class:`MainThread` runs ``main()`` on a thread
of its own (``amqprun-main``), which starts the daemon's I/O and worker
threads; :meth:`MainThread.stop` joins them all and fails if one survives.
:class:`ServerProcess` runs the ``server`` script in a child process.

:func:`site_zcml`, :func:`make_config` and :func:`write_config` write the
site ZCML and the ZConfig file (template :data:`CONFIG_TEMPLATE`) for a
:class:`~gocept.amqprun.testing.broker.Broker` and a virtual host;
:class:`LoggingState` undoes what ``main()`` does to the logging module;
:func:`reset_registry` gives zope.component a fresh global registry.
"""
import logging
import os
import signal
import string
import subprocess
import sys
import threading

import zope.component
import zope.component.globalregistry

import gocept.amqprun.interfaces
import gocept.amqprun.main
import gocept.amqprun.process
from gocept.amqprun.testing.client import QueueProbe
from gocept.amqprun.testing.client import wait_for
from gocept.amqprun.testing.client import wait_until_settled


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
        """Yield (name, logger) for the root and every existing logger."""
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
    """The daemon's threads that are alive now."""
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
        """The thread's body: ``run()``, keeping its exit status."""
        self.exit_status = gocept.amqprun.main.run(self.config_path)

    def _on_process_started(self, event):
        """Subscriber to ``IProcessStarted``: the daemon is up."""
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
        """Forget the ProcessStarted subscriber; undo the logging set-up."""
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
        return [sys.executable, '-m', 'gocept.amqprun.main',
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
