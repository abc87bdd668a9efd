"""Test support for gocept.amqprun and for its users' test suites.

Runs on: the test thread (plus the daemon's threads it starts).

Everything runs against a real broker: the one named by ``AMQP_HOSTNAME``,
``AMQP_PORT``, ``AMQP_USERNAME``, ``AMQP_PASSWORD`` (and, to use an existing
virtual host, ``AMQP_VIRTUALHOST``), or else a private loopback RabbitMQ
node started once per test run. Each test module gets a fresh virtual host.

pytest: this module is a plugin (entry point ``gocept.amqprun``) providing
the fixtures ``amqp_broker`` (session), ``amqp_vhost`` (module),
``amqp_parameters``, ``amqp_client`` and ``amqp_main``. unittest and
zope.testrunner: ``BROKER_LAYER``, ``QueueTestCase`` and ``MainTestCase``.
"""
import email.utils
import os
import shlex
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
import pytest
import zope.component
import zope.component.globalregistry

import gocept.amqprun.connection
import gocept.amqprun.main
import gocept.amqprun.rabbitmq
import gocept.amqprun.server


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
        self._ctl('add_vhost', name)
        self._ctl('set_permissions', '-p', name, self.username,
                  '.*', '.*', '.*')
        return name

    def delete_vhost(self, name):
        """Delete a virtual host made by :meth:`create_vhost`."""
        if name != self.virtual_host:
            self._ctl('delete_vhost', name)

    def _ctl(self, *args):
        if self.node is not None:
            return self.node.ctl(*args)
        command = shlex.split(
            os.environ.get('AMQP_RABBITMQCTL', 'rabbitmqctl')) + list(args)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError('%s failed: %s' % (
                ' '.join(command), result.stdout + result.stderr))
        return result.stdout

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
        """Return the next received message; RuntimeError on timeout."""
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


# -- running the daemon ------------------------------------------------------

def write_config(directory, zcml, conf, mapping):
    """Write ZCML and config templates (``string.Template``) to files.

    ``conf`` may use ``${site_zcml}`` and the ``amqp_*`` keys of
    :meth:`Broker.config_mapping`. Returns the config file's path.
    """
    zcml_path = os.path.join(directory, 'site.zcml')
    with open(zcml_path, 'w') as f:
        f.write(string.Template(zcml).substitute(mapping))
    conf_path = os.path.join(directory, 'amqprun.conf')
    with open(conf_path, 'w') as f:
        f.write(string.Template(conf).substitute(mapping,
                                                 site_zcml=zcml_path))
    return conf_path


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


def reset_registry():
    """Give zope.component a fresh, empty global registry."""
    zope.component.globalregistry.base.__init__('base')


class MainThread:
    """Runs ``gocept.amqprun.main.run()`` in a thread of this process."""

    def __init__(self, config_path):
        self.config_path = config_path
        self.exit_status = None
        self.thread = threading.Thread(
            target=self._run, name='amqprun-main', daemon=True)

    def _run(self):
        self.exit_status = gocept.amqprun.main.run(self.config_path)

    @property
    def server(self):
        """The running server (None before start-up)."""
        return gocept.amqprun.main.main_server

    def start(self, timeout=30):
        """Start ``run()``; wait until the server is connected."""
        self.thread.start()
        wait_for(lambda: (self.server is not None and self.server.running)
                 or not self.thread.is_alive(), timeout,
                 message='Server did not start up.')
        return self

    def stop(self, timeout=60):
        """Ask ``run()`` to stop as SIGTERM would; return the exit status.
        """
        gocept.amqprun.main.request_stop(0)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), 'main() did not stop'
        return self.exit_status

    def wait_for_processing(self, timeout=30):
        """Wait until no delivery is queued or being handled."""
        wait_for(lambda: self.server.tasks.unfinished_tasks == 0,
                 timeout, message='Message was not processed.')


class ServerProcess:
    """Runs the ``server`` script in a subprocess (output to a file)."""

    def __init__(self, config_path, env=None):
        self.config_path = config_path
        self.output_path = config_path + '.out'
        self.env = env
        self.process = None

    def start(self):
        """Start ``python -m gocept.amqprun.main <config>``."""
        with open(self.output_path, 'wb') as output:
            self.process = subprocess.Popen(
                [sys.executable, '-m', 'gocept.amqprun.main',
                 self.config_path],
                stdout=output, stderr=subprocess.STDOUT, env=self.env)
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
        assert text in self.output, self.output

    def signal(self, signum=signal.SIGTERM):
        """Send a signal to the process."""
        self.process.send_signal(signum)

    def wait(self, timeout=60):
        """Wait for the exit; kill and fail after ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError('Process did not exit:\n' + self.output)

    def kill(self):
        """Stop the process if it still runs (SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# -- pytest ------------------------------------------------------------------

@pytest.fixture(scope='session')
def amqp_broker():
    """The broker of this test run."""
    yield get_broker()
    stop_broker()


@pytest.fixture(scope='module')
def amqp_vhost(amqp_broker):
    """A fresh virtual host for the test module."""
    name = amqp_broker.create_vhost()
    yield name
    amqp_broker.delete_vhost(name)


@pytest.fixture
def amqp_parameters(amqp_broker, amqp_vhost):
    """Parameters for a Server on the module's virtual host."""
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
def amqp_main(amqp_broker, amqp_vhost, tmp_path, clean_registry):
    """Factory: ``amqp_main(zcml, workers=2, ...)`` runs ``main`` in-process.

    ``zcml`` is the site ZCML (a string template); keyword arguments fill
    :data:`CONFIG_TEMPLATE`. Returns a started :class:`MainThread`; it is
    stopped after the test.
    """
    started = []

    def start(zcml, workers=2, settings='', amqp_extra='', worker_extra='',
              log_level='INFO', **mapping):
        mapping = dict(amqp_broker.config_mapping(amqp_vhost),
                       workers=workers, settings=settings,
                       amqp_extra=amqp_extra, worker_extra=worker_extra,
                       log_level=log_level,
                       log_path=str(tmp_path / 'server.log'), **mapping)
        config = write_config(str(tmp_path), zcml, CONFIG_TEMPLATE, mapping)
        runner = MainThread(config)
        started.append(runner)
        return runner.start()

    yield start
    for runner in started:
        if runner.thread.is_alive():
            runner.stop()


# -- unittest / zope.testrunner ----------------------------------------------

class BrokerLayer:
    """zope.testrunner layer: the broker and a fresh vhost per layer."""

    __bases__ = ()
    __name__ = 'BrokerLayer'
    __module__ = __name__

    @classmethod
    def setUp(cls):
        cls.broker = get_broker()
        cls.virtual_host = cls.broker.create_vhost()

    @classmethod
    def tearDown(cls):
        cls.broker.delete_vhost(cls.virtual_host)
        stop_broker()


BROKER_LAYER = BrokerLayer


class QueueTestCase(unittest.TestCase):
    """unittest base class: ``send_message``, ``expect_message_on``,
    ``wait_for_message`` against the layer's broker."""

    layer = BROKER_LAYER

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if not hasattr(BrokerLayer, 'broker'):
            BrokerLayer.setUp()  # run by a runner that knows no layers
            cls.addClassCleanup(BrokerLayer.tearDown)

    def setUp(self):
        super().setUp()
        self.broker = BrokerLayer.broker
        self.virtual_host = BrokerLayer.virtual_host
        self.client = Client(self.broker, self.virtual_host)
        self.addCleanup(self.client.close)

    def send_message(self, body, routing_key='', headers=None, **kw):
        """Publish a test message to ``amq.topic``."""
        return self.client.send_message(body, routing_key, headers, **kw)

    def expect_message_on(self, routing_key):
        """Receive what is sent to ``routing_key`` from now on."""
        self.client.expect_message_on(routing_key)

    expect_response_on = expect_message_on

    def wait_for_message(self, timeout=10):
        """The next received message (RuntimeError on timeout)."""
        return self.client.wait_for_message(timeout)

    wait_for_response = wait_for_message

    def create_server(self, **kw):
        """An unstarted Server on the layer's vhost."""
        setup_handlers = kw.pop('setup_handlers', True)
        return gocept.amqprun.server.Server(
            self.broker.parameters(self.virtual_host, **kw),
            setup_handlers=setup_handlers)


class MainTestCase(QueueTestCase):
    """unittest base class that runs the real ``main()`` in-process."""

    def setUp(self):
        super().setUp()
        reset_registry()
        self.addCleanup(reset_registry)
        self.tmpdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmpdir.cleanup)
        self.main = None

    def make_config(self, zcml, workers=2, **mapping):
        """Write the site ZCML and a config file; return its path."""
        mapping = dict(self.broker.config_mapping(self.virtual_host),
                       workers=workers, settings='', amqp_extra='',
                       worker_extra='', log_level='INFO',
                       log_path=os.path.join(self.tmpdir.name, 'server.log'),
                       **mapping)
        return write_config(self.tmpdir.name, zcml, CONFIG_TEMPLATE, mapping)

    def start_server(self, zcml, **mapping):
        """Run ``main()`` in a thread with the given site ZCML."""
        self.main = MainThread(self.make_config(zcml, **mapping)).start()
        self.addCleanup(self._stop_main)
        return self.main

    def _stop_main(self):
        if self.main.thread.is_alive():
            self.main.stop()

    def wait_for_processing(self, timeout=30):
        """Wait until every received message has been handled."""
        self.main.wait_for_processing(timeout)
