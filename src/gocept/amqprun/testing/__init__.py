"""Test support for gocept.amqprun and for its users' test suites.

Runs on: the test's thread (plus the daemon's threads that
:mod:`~gocept.amqprun.testing.daemon` starts and joins again).

Everything runs against a real broker: the one named by ``AMQP_HOSTNAME``,
``AMQP_PORT``, ``AMQP_USERNAME``, ``AMQP_PASSWORD`` (and, to use an existing
virtual host instead of fresh ones, ``AMQP_VIRTUALHOST``), or else a
private loopback RabbitMQ node started once per test run (Debian's
``rabbitmq-server`` package must be installed). Fresh virtual hosts are made
with ``rabbitmqctl`` (``AMQP_RABBITMQCTL`` names the command for a broker of
your own).

One module per audience; this package re-exports their public names, so
``gocept.amqprun.testing.QueueTestCase`` and friends work as they always
did, and importing it needs no pytest:

:mod:`~gocept.amqprun.testing.broker`
    The broker of a test run: :class:`Broker`, :func:`get_broker`,
    :func:`stop_broker`; :class:`RabbitMQNode`, a private loopback
    RabbitMQ node (optionally with a TLS listener); :class:`Cluster`,
    several such nodes joined into one cluster.
:mod:`~gocept.amqprun.testing.certificates`
    :class:`Certificates`: a test CA, a server certificate for
    ``localhost``, a client certificate and an unrelated CA, made at test
    time (needs ``cryptography``, part of the ``testing`` extra).
:mod:`~gocept.amqprun.testing.processes`
    How the harness starts its child processes and stops them by pid;
    :class:`~gocept.amqprun.testing.processes.Epmd`.
:mod:`~gocept.amqprun.testing.client`
    The other side of the daemon: :class:`Client` (send, expect, wait),
    :class:`QueueProbe`, :func:`wait_for`, :func:`wait_until_settled`.
:mod:`~gocept.amqprun.testing.daemon`
    Running the daemon: :func:`site_zcml`, :func:`make_config`,
    :func:`write_config`, :class:`MainThread` (``main()`` in a thread),
    :class:`ServerProcess` (the ``server`` script), :class:`LoggingState`,
    :func:`reset_registry`.
:mod:`~gocept.amqprun.testing.database`
    Databases in the message's transaction: :class:`PostgreSQLServer` (a
    private loopback PostgreSQL), :func:`get_postgresql_server`,
    :func:`stop_postgresql_server`, :func:`postgresql_database`,
    :class:`PostgreSQLLayer`; :func:`filestorage_path`, :func:`open_zodb`,
    :class:`ZODBLayer` (a fresh ZODB FileStorage).
:mod:`~gocept.amqprun.testing.pytest`
    The pytest plugin (entry point ``gocept.amqprun.testing.pytest``):
    ``amqp_broker``, ``amqp_vhost``, ``amqp_parameters``, ``amqp_client``,
    ``clean_registry``, ``amqp_config``, ``amqp_main``,
    ``amqp_server_process``; ``amqp_cluster``, ``amqp_certificates``,
    ``amqp_tls_broker``, ``amqp_mtls_broker``; ``zodb_path``, ``zodb``,
    ``postgresql_server``, ``postgresql_url``.
:mod:`~gocept.amqprun.testing.layers`
    unittest and zope.testrunner: :class:`BrokerLayer`,
    :class:`QueueTestCase`, :class:`MainTestCase`.
"""
import importlib

from gocept.amqprun.testing.broker import Broker
from gocept.amqprun.testing.broker import Cluster
from gocept.amqprun.testing.broker import RabbitMQNode
from gocept.amqprun.testing.broker import get_broker
from gocept.amqprun.testing.broker import stop_broker
from gocept.amqprun.testing.client import Client
from gocept.amqprun.testing.client import QueueProbe
from gocept.amqprun.testing.client import wait_for
from gocept.amqprun.testing.client import wait_until_settled
from gocept.amqprun.testing.database import PostgreSQLLayer
from gocept.amqprun.testing.database import PostgreSQLServer
from gocept.amqprun.testing.database import ZODBLayer
from gocept.amqprun.testing.database import filestorage_path
from gocept.amqprun.testing.database import get_postgresql_server
from gocept.amqprun.testing.database import open_zodb
from gocept.amqprun.testing.database import postgresql_database
from gocept.amqprun.testing.database import stop_postgresql_server
from gocept.amqprun.testing.daemon import CONFIG_TEMPLATE
from gocept.amqprun.testing.daemon import LoggingState
from gocept.amqprun.testing.daemon import MainThread
from gocept.amqprun.testing.daemon import ServerProcess
from gocept.amqprun.testing.daemon import handler_queues
from gocept.amqprun.testing.daemon import log_path_of
from gocept.amqprun.testing.daemon import make_config
from gocept.amqprun.testing.daemon import reset_registry
from gocept.amqprun.testing.daemon import script
from gocept.amqprun.testing.daemon import site_zcml
from gocept.amqprun.testing.daemon import subprocess_environment
from gocept.amqprun.testing.daemon import write_config
from gocept.amqprun.testing.layers import BROKER_LAYER
from gocept.amqprun.testing.layers import QUEUE_LAYER
from gocept.amqprun.testing.layers import BrokerLayer
from gocept.amqprun.testing.layers import MainTestCase
from gocept.amqprun.testing.layers import QueueTestCase


__all__ = [
    'BROKER_LAYER', 'Broker', 'BrokerLayer', 'CONFIG_TEMPLATE', 'Client',
    'Cluster', 'LoggingState', 'MainTestCase', 'MainThread',
    'PostgreSQLLayer', 'PostgreSQLServer', 'QUEUE_LAYER', 'QueueProbe',
    'QueueTestCase', 'RabbitMQNode', 'ServerProcess', 'ZODBLayer',
    'filestorage_path', 'get_broker', 'get_postgresql_server',
    'handler_queues', 'log_path_of', 'make_config', 'open_zodb',
    'postgresql_database', 'reset_registry', 'script', 'site_zcml',
    'stop_broker', 'stop_postgresql_server',
    'subprocess_environment', 'wait_for', 'wait_until_settled',
    'write_config',
]

#: pytest reads this when the package itself is named as a plugin
#: (``pytest_plugins = ['gocept.amqprun.testing']``, as before the split).
pytest_plugins = ['gocept.amqprun.testing.pytest']

#: Names importable from here that need an optional package, by module:
#: looked up on first use (see :func:`__getattr__`), so that importing the
#: package needs neither pytest nor cryptography.
LAZY = {
    'gocept.amqprun.testing.pytest': (
        'amqp_broker', 'amqp_vhost', 'amqp_parameters', 'amqp_client',
        'clean_registry', 'amqp_config', 'amqp_main', 'amqp_server_process',
        'amqp_cluster', 'amqp_certificates', 'amqp_tls_broker',
        'amqp_mtls_broker', 'zodb_path', 'zodb', 'postgresql_server',
        'postgresql_url'),
    'gocept.amqprun.testing.certificates': ('Certificates',),
}


def __getattr__(name):
    """Give the fixtures and :class:`Certificates` (PEP 562), importing
    their module only then."""
    for module_name, names in LAZY.items():
        if name in names:
            module = importlib.import_module(module_name)
            return getattr(module, name)
    raise AttributeError('module %r has no attribute %r' % (__name__, name))
