"""unittest and zope.testrunner support: a broker layer and test cases.

Runs on: the test's thread (plus the daemon's threads that
:meth:`MainTestCase.start_server` starts and the cleanups join).

:class:`BrokerLayer` gives a zope.testrunner layer the broker of the run
and one fresh virtual host; :class:`QueueTestCase` sends messages, expects
them on routing keys and waits for them; :class:`MainTestCase` runs the
real ``main()`` in-process or in a subprocess. Runners that know no layers
(``python -m unittest``, pytest) give each test class a fresh virtual host
instead.
"""
import shutil
import tempfile
import unittest

import gocept.amqprun.server
from gocept.amqprun.testing.broker import get_broker
from gocept.amqprun.testing.broker import stop_broker
from gocept.amqprun.testing.client import Client
from gocept.amqprun.testing.daemon import MainThread
from gocept.amqprun.testing.daemon import ServerProcess
from gocept.amqprun.testing.daemon import log_path_of
from gocept.amqprun.testing.daemon import make_config
from gocept.amqprun.testing.daemon import reset_registry
from gocept.amqprun.topology import DEFAULT_EXCHANGE


class BrokerLayer:
    """zope.testrunner layer: the broker of the run and a fresh vhost.

    ``BrokerLayer.broker`` and ``BrokerLayer.virtual_host`` are set while
    the layer is set up.
    """

    broker = None
    virtual_host = None

    @classmethod
    def setUp(cls):
        """Get the run's broker; create the layer's virtual host."""
        cls.broker = get_broker()
        cls.virtual_host = cls.broker.create_vhost()

    @classmethod
    def tearDown(cls):
        """Delete the virtual host; stop a private broker."""
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
        """Take the layer's broker and vhost, or make a vhost of our own."""
        super().setUpClass()
        if BrokerLayer.virtual_host is not None:
            cls.broker = BrokerLayer.broker
            cls.virtual_host = BrokerLayer.virtual_host
        else:  # a runner that knows no layers
            cls.broker = get_broker()
            cls.virtual_host = cls.broker.create_vhost()
            cls.addClassCleanup(cls.broker.delete_vhost, cls.virtual_host)

    def setUp(self):
        """Open the test's :class:`Client` (closed after the test)."""
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

    def send_message(self, body, routing_key='', headers=None, *,
                     exchange=DEFAULT_EXCHANGE, **properties):
        """Publish a message to ``exchange``; return its message id."""
        return self.client.send_message(body, routing_key, headers,
                                        exchange=exchange, **properties)

    def expect_message_on(self, routing_key, exchange=DEFAULT_EXCHANGE,
                          binding_arguments=None):
        """Receive what is sent to ``routing_key`` on ``exchange`` from now
        on (see :meth:`Client.expect_message_on`)."""
        self.client.expect_message_on(routing_key, exchange,
                                      binding_arguments)

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
        """A fresh registry and a temporary directory for the test."""
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
        """Cleanup: stop ``main()`` if it still runs."""
        if main.thread.is_alive():
            main.stop()

    @staticmethod
    def _stop_process(process):
        """Cleanup: stop the subprocess (SIGTERM, then SIGKILL)."""
        if process.process.poll() is None:
            try:
                process.stop(30)
            finally:
                process.kill()


def _rmtree(path):
    """Remove a directory tree, ignoring errors (a cleanup)."""
    shutil.rmtree(path, ignore_errors=True)
