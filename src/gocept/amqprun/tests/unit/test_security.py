"""Tests for gocept.amqprun.security: interactions for handler principals.
"""
import sys

import pytest
import zope.security.management

from gocept.amqprun.handler import Handler
from gocept.amqprun.interfaces import ConfigurationError
from gocept.amqprun.security import Participation
from gocept.amqprun.security import Principal
from gocept.amqprun.security import available
from gocept.amqprun.security import check_principals
from gocept.amqprun.security import interaction


def handler(principal=None):
    return Handler('queue', 'routing', lambda message: None,
                   principal=principal)


@pytest.fixture
def without_zope_security(monkeypatch):
    """Make ``import zope.security.management`` fail."""
    monkeypatch.setitem(sys.modules, 'zope.security.management', None)


def participations():
    current = zope.security.management.queryInteraction()
    return None if current is None else current.participations


def test_interaction_runs_the_block_as_the_principal():
    with interaction('zope.user'):
        [participation] = participations()
        assert participation.principal.id == 'zope.user'
    assert zope.security.management.queryInteraction() is None


def test_interaction_ends_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with interaction('zope.user'):
            raise RuntimeError('boom')
    assert zope.security.management.queryInteraction() is None


def test_interaction_without_principal_starts_none():
    with interaction(None):
        assert zope.security.management.queryInteraction() is None


def test_interaction_without_principal_needs_no_zope_security(
        without_zope_security):
    with interaction(None):
        pass


def test_principal_has_id_title_and_description():
    principal = Principal('zope.user')
    assert (principal.id, principal.title, principal.description) == (
        'zope.user', 'zope.user', '')


def test_participation_carries_the_principal():
    principal = Principal('zope.user')
    participation = Participation(principal)
    assert participation.principal is principal
    assert participation.interaction is None


def test_available_when_zope_security_imports():
    assert available()


def test_not_available_when_zope_security_is_missing(without_zope_security):
    assert not available()


def test_check_principals_accepts_principals_with_zope_security():
    check_principals([('one', handler('zope.user'))])


def test_check_principals_refuses_principal_without_zope_security(
        without_zope_security):
    with pytest.raises(ConfigurationError) as info:
        check_principals([('plain', handler()),
                          ('secured', handler('zope.user'))])
    message = str(info.value)
    assert "'secured'" in message
    assert "'zope.user'" in message
    assert 'gocept.amqprun[security]' in message


def test_check_principals_accepts_handlers_without_principal_anyway(
        without_zope_security):
    check_principals([('plain', handler())])
