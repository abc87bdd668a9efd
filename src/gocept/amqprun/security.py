"""zope.security interactions for handlers that declare a principal.

Runs on: a worker thread. Needs the ``security`` extra (zope.security).
"""
import contextlib

import zope.interface

import gocept.amqprun.interfaces


def available():
    """True when zope.security can be imported."""
    try:
        import zope.security.management  # noqa: F401
    except ImportError:
        return False
    return True


def check_principals(named_handlers):
    """Raise ConfigurationError when a principal is used without the extra."""
    if available():
        return
    for name, handler in named_handlers:
        if getattr(handler, 'principal', None) is not None:
            raise gocept.amqprun.interfaces.ConfigurationError(
                'Handler %r declares principal %r, but zope.security is not '
                'installed (install gocept.amqprun[security])' % (
                    name, handler.principal))


class Principal:
    """The minimal principal a participation needs: an id."""

    def __init__(self, id):
        self.id = id
        self.title = id
        self.description = ''


class Participation:
    """A participation of ``principal`` in an interaction."""

    interaction = None

    def __init__(self, principal):
        self.principal = principal


@contextlib.contextmanager
def interaction(principal_id):
    """Run the block in an interaction for ``principal_id`` (if not None).

    The participation's principal provides ``IPrincipal`` with ``id`` (and
    ``title``) set to ``principal_id``; the security policy in effect
    (``zope.security.management.setSecurityPolicy``) decides what it may
    do. The interaction ends in every outcome, so none leaks to the next
    message handled by this thread.
    """
    if principal_id is None:
        yield
        return
    from zope.security import interfaces as security_interfaces
    from zope.security import management as security_management
    principal = Principal(principal_id)
    zope.interface.alsoProvides(principal, security_interfaces.IPrincipal)
    participation = Participation(principal)
    zope.interface.alsoProvides(
        participation, security_interfaces.IParticipation)
    security_management.newInteraction(participation)
    try:
        yield
    finally:
        security_management.endInteraction()
