"""Fixtures several integration test modules share.

Runs on: the test's thread (the proxy and the daemons have threads of
their own, which ``no_thread_survives`` checks for).
"""
import threading
import time

import pytest

import gocept.amqprun.testing
from gocept.amqprun.tests.integration import faults_handlers
from gocept.amqprun.tests.integration.faults_handlers import REPLY_KEY
from gocept.amqprun.tests.integration.faults_proxy import FaultProxy
from gocept.amqprun.tests.integration.faults_tally import FULL
from gocept.amqprun.tests.integration.faults_tally import Replies
from gocept.amqprun.tests.integration.faults_tally import connect
from gocept.amqprun.tests.integration.faults_tally import declare_queue
from gocept.amqprun.tests.integration.faults_tally import numbered
from gocept.amqprun.tests.integration.faults_tally import publish


@pytest.fixture
def no_thread_survives():
    """Fail the test when a daemon or proxy thread outlives it."""
    faults_handlers.reset()
    before = set(threading.enumerate())
    yield
    faults_handlers.reset()

    def survivors():
        return [thread.name for thread in threading.enumerate()
                if thread not in before and thread.is_alive()
                and thread.name.startswith('amqprun-')]
    deadline = time.monotonic() + 10
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not survivors(), 'Threads survived the test: %s' % survivors()


@pytest.fixture
def proxy(amqp_broker):
    """A FaultProxy in front of the broker; stopped (thread joined) after.
    """
    with FaultProxy(amqp_broker.hostname, amqp_broker.port) as proxy:
        yield proxy


@pytest.fixture
def restartable_broker(amqp_broker, amqp_vhost):
    """(broker, vhost) of a private node that may be restarted.

    The run's own node when it is private; else (``AMQP_HOSTNAME`` names a
    broker) a private node started for this test.
    """
    if amqp_broker.node is not None:
        yield amqp_broker, amqp_vhost
        return
    broker = gocept.amqprun.testing.Broker.start_private_node()
    try:
        yield broker, broker.create_vhost()
    finally:
        broker.stop()


@pytest.fixture
def replies(request, amqp_broker, amqp_vhost):
    """An independent client counting what arrives on the test module's
    ``REPLY_KEY``."""
    client = Replies(amqp_broker, amqp_vhost, request.module.REPLY_KEY)
    yield client
    client.close()


@pytest.fixture
def full_reply_queue(amqp_broker, amqp_vhost):
    """Make the replies of ``faults_handlers.numbers`` go to a ``FULL``
    queue, full already; delete it afterwards (it would refuse the
    replies of the next tests)."""
    declare_queue(amqp_broker, amqp_vhost, 'faults.full', REPLY_KEY,
                  arguments=FULL)
    publish(amqp_broker, amqp_vhost, numbered(3, 'filler'), REPLY_KEY)
    yield
    with connect(amqp_broker, amqp_vhost) as connection:
        connection.channel().queue_delete('faults.full')
