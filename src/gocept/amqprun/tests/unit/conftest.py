"""Fixtures of the unit tests: a clean transaction, registry and
security interaction for every test."""
import amqp
import pytest
import transaction
import zope.component
import zope.component.event  # noqa: F401 (dispatches events to handlers)
import zope.security.management

import gocept.amqprun.testing
from gocept.amqprun.tests.unit.fakes import FakeAMQPConnection


@pytest.fixture(autouse=True)
def clean_transaction():
    """No transaction of one test leaks into the next."""
    transaction.abort()
    yield
    transaction.abort()


@pytest.fixture(autouse=True)
def no_interaction():
    """No zope.security interaction leaks into the next test."""
    yield
    zope.security.management.endInteraction()


@pytest.fixture
def registry():
    """A fresh global component registry for the test."""
    gocept.amqprun.testing.reset_registry()
    yield zope.component.getGlobalSiteManager()
    gocept.amqprun.testing.reset_registry()


@pytest.fixture
def events(registry):
    """Factory: ``events(IEvent)`` returns the list that collects every
    IEvent notified from then on."""
    def collect(interface):
        collected = []
        registry.registerHandler(collected.append, (interface,))
        return collected
    return collect


@pytest.fixture
def fake_amqp(monkeypatch):
    """Replace py-amqp's Connection class by FakeAMQPConnection."""
    monkeypatch.setattr(amqp, 'Connection', FakeAMQPConnection)
    FakeAMQPConnection.instances = []
    FakeAMQPConnection.connect_errors = []
    yield FakeAMQPConnection
    FakeAMQPConnection.instances = []
    FakeAMQPConnection.connect_errors = []
