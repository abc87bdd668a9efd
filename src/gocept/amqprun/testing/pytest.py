"""The pytest plugin of gocept.amqprun.testing: fixtures.

Runs on: the test's thread. The fixtures that start the daemon
(:func:`amqp_main`, :func:`amqp_server_process`) stop it after the test and
fail the test if one of its threads survives.

Registered through the ``pytest11`` entry point
``gocept.amqprun.testing.pytest`` (the ``testing`` extra); where plugins
are not loaded automatically (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), name it
in your top-level ``conftest.py``: ``pytest_plugins =
['gocept.amqprun.testing.pytest']`` (``'gocept.amqprun.testing'`` works
too: the package names this module in its own ``pytest_plugins``).

Fixtures: ``amqp_broker`` (the run's :class:`Broker`, session scope),
``amqp_vhost`` (a fresh virtual host per test module), ``amqp_parameters``,
``amqp_client`` (a :class:`Client`: send, expect, wait),
``clean_registry`` and the factories ``amqp_config``, ``amqp_main`` (the
real ``main()`` in a thread, a :class:`MainThread`) and
``amqp_server_process`` (the ``server`` script in a subprocess, a
:class:`ServerProcess`).

Brokers of other shapes, private nodes started on first use and shared by
the session (also when ``AMQP_HOSTNAME`` names a broker: they need our
processes and certificates): ``amqp_cluster`` (a three-node
:class:`Cluster`), ``amqp_certificates`` (a test CA with server and client
certificates), ``amqp_tls_broker`` (a :class:`Broker` with a TLS listener
on ``ssl_port`` that verifies client certificates when given) and
``amqp_mtls_broker`` (the same, but a client certificate is required).
The marker ``cluster`` is registered for tests that use the cluster.

Databases (:mod:`gocept.amqprun.testing.database`): ``zodb_path`` (the
path of a fresh FileStorage in ``tmp_path``), ``zodb`` (a ``ZODB.DB`` on
it, closed after the test), ``postgresql_server`` (the run's private
:class:`PostgreSQLServer`, session scope, started only when a test asks
for it) and ``postgresql_url`` (a fresh database on it, dropped after the
test, or ``AMQPRUN_TEST_POSTGRESQL_URL``).
"""
import os

import pytest

from gocept.amqprun.testing.broker import Broker
from gocept.amqprun.testing.broker import Cluster
from gocept.amqprun.testing.broker import get_broker
from gocept.amqprun.testing.broker import stop_broker
from gocept.amqprun.testing.broker import temporary_vhost
from gocept.amqprun.testing.client import Client
from gocept.amqprun.testing.database import filestorage_path
from gocept.amqprun.testing.database import get_postgresql_server
from gocept.amqprun.testing.database import open_zodb
from gocept.amqprun.testing.database import postgresql_database
from gocept.amqprun.testing.database import URL_VARIABLE
from gocept.amqprun.testing.database import stop_postgresql_server
from gocept.amqprun.testing.daemon import MainThread
from gocept.amqprun.testing.daemon import ServerProcess
from gocept.amqprun.testing.daemon import log_path_of
from gocept.amqprun.testing.daemon import make_config
from gocept.amqprun.testing.daemon import reset_registry


@pytest.fixture(scope='session')
def amqp_broker():
    """The :class:`Broker` of this test run."""
    yield get_broker()
    stop_broker()


@pytest.fixture(scope='module')
def amqp_vhost(amqp_broker):
    """A fresh virtual host for the test module (its name)."""
    with temporary_vhost(amqp_broker) as name:
        yield name


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


def pytest_configure(config):
    """Register the ``cluster`` marker."""
    config.addinivalue_line(
        'markers', 'cluster: the test uses the amqp_cluster fixture (a '
        'three-node RabbitMQ cluster, started once per session)')


@pytest.fixture(scope='session')
def amqp_cluster():
    """A :class:`Cluster` of three private nodes for the whole session.

    Tests may kill and start its nodes but must leave all of them running.
    """
    cluster = Cluster.start(size=3)
    yield cluster
    cluster.stop()


@pytest.fixture(scope='session')
def amqp_certificates(tmp_path_factory):
    """:class:`~gocept.amqprun.testing.certificates.Certificates` made for
    the session: ``ca_file``, ``cert_file``, ``key_file``,
    ``client_cert_file``, ``client_key_file``, ``other_ca_file``."""
    # Imported here: only these fixtures need the cryptography package.
    from gocept.amqprun.testing.certificates import Certificates
    return Certificates.create(str(tmp_path_factory.mktemp('amqprun-tls')))


@pytest.fixture(scope='session')
def amqp_tls_broker(amqp_certificates):
    """A :class:`Broker`: a private node with a TLS listener too.

    ``ssl_port`` presents a certificate for ``localhost`` signed by
    ``amqp_certificates.ca_file`` and verifies a client certificate if the
    client presents one; ``port`` is plain AMQP as usual.
    """
    broker = Broker.start_private_node(certificates=amqp_certificates)
    yield broker
    broker.stop()


@pytest.fixture(scope='session')
def amqp_mtls_broker(amqp_certificates):
    """Like ``amqp_tls_broker``, but TLS clients must present a
    certificate signed by the CA (``fail_if_no_peer_cert``)."""
    broker = Broker.start_private_node(certificates=amqp_certificates,
                                       fail_if_no_peer_cert=True)
    yield broker
    broker.stop()


@pytest.fixture
def zodb_path(tmp_path):
    """The path of a fresh ZODB FileStorage in the test's ``tmp_path``."""
    return filestorage_path(str(tmp_path))


@pytest.fixture
def zodb(zodb_path):
    """A ``ZODB.DB`` on a fresh FileStorage; closed after the test."""
    db = open_zodb(zodb_path)
    yield db
    db.close()


@pytest.fixture(scope='session')
def postgresql_server():
    """The run's private :class:`PostgreSQLServer` (stopped at the end),
    or None when ``AMQPRUN_TEST_POSTGRESQL_URL`` names a database."""
    if os.environ.get(URL_VARIABLE):
        yield None
        return
    yield get_postgresql_server()
    stop_postgresql_server()


@pytest.fixture
def postgresql_url(postgresql_server):
    """The URL of a fresh PostgreSQL database, dropped after the test
    (or ``AMQPRUN_TEST_POSTGRESQL_URL``, shared by every test)."""
    url, cleanup = postgresql_database()
    yield url
    cleanup()
