"""Declare the exchanges and the handlers' queues, bind the queues; what a
refusal means.

Runs on: the I/O thread (``declare``), after every (re)connect; the
duplicate-queue check also runs at start-up on the main thread, and
``Exchange`` is built on the main thread while the ZCML loads. A declare
the broker refuses because of the configuration (a queue or exchange that
exists with other arguments or type, a missing exchange, no permission)
raises ``DeclareRefused``, a fatal configuration error: retrying cannot fix
it. A queue the broker cannot reach in time (a quorum queue without a
leader) raises ``QueueUnavailable``: the server reconnects and tries again.
"""
import contextlib
import logging

import zope.interface

import gocept.amqprun.connection
import gocept.amqprun.interfaces


log = logging.getLogger(__name__)

#: The exchange handler queues are bound to unless they name another.
DEFAULT_EXCHANGE = 'amq.topic'

#: The exchange types every broker has; plugins add types starting ``x-``.
EXCHANGE_TYPES = ('direct', 'fanout', 'headers', 'topic')

#: The prefix of the exchanges the broker declares itself.
BROKER_PREFIX = 'amq.'


@zope.interface.implementer(gocept.amqprun.interfaces.IExchange)
class Exchange:
    """An exchange to declare; a value, checked when it is made.

    Raises ``ValueError`` for an empty name, a name starting with ``amq.``
    and a type that is neither a standard one nor an ``x-`` plugin type.
    """

    def __init__(self, name, type, durable=True, auto_delete=False,
                 arguments=None):
        if not name:
            raise ValueError('An exchange needs a name')
        if name.startswith(BROKER_PREFIX):
            raise ValueError(
                'Exchange %r cannot be declared: names starting with %r '
                'belong to the broker (bind to it without declaring it)'
                % (name, BROKER_PREFIX))
        if type not in EXCHANGE_TYPES and not type.startswith('x-'):
            raise ValueError(
                'Exchange %r has the unknown type %r: use one of %s or a '
                "plugin's x- type" % (name, type, ', '.join(EXCHANGE_TYPES)))
        self.name = name
        self.type = type
        self.durable = durable
        self.auto_delete = auto_delete
        self.arguments = arguments

    def __repr__(self):
        return '<Exchange %r (%s)>' % (self.name, self.type)


def routing_keys(handler):
    """Return the routing keys of ``handler`` as a list."""
    keys = handler.routing_key
    if isinstance(keys, (list, tuple)):
        return list(keys)
    return [keys]


def check_unique_queues(named_handlers):
    """Raise ConfigurationError when two handlers share a queue."""
    seen = {}
    for name, handler in named_handlers:
        if handler.queue_name in seen:
            raise gocept.amqprun.interfaces.ConfigurationError(
                'Queue %r is bound to two handlers: %r and %r' % (
                    handler.queue_name, seen[handler.queue_name], name))
        seen[handler.queue_name] = name


def declare(channel, named_handlers, exchanges=()):
    """Declare ``exchanges`` (IExchange), then declare and bind the queue of
    every ``(name, handler)`` pair.

    Raises ``DeclareRefused`` naming the exchange or queue and the broker's
    reason when the broker refuses one for a configuration reason; other
    errors (connection loss) propagate unchanged.
    """
    check_unique_queues(named_handlers)
    for exchange in sorted(exchanges, key=lambda exchange: exchange.name):
        declare_exchange(channel, exchange)
    for name, handler in named_handlers:
        declare_queue(channel, handler, name)


def declare_exchange(channel, exchange):
    """Declare one :class:`IExchange`."""
    with refusals_as_configuration_errors(
            'exchange %r' % exchange.name,
            gocept.amqprun.connection.EXCHANGE_REFUSALS):
        channel.exchange_declare(
            exchange=exchange.name, type=exchange.type,
            durable=exchange.durable, auto_delete=exchange.auto_delete,
            arguments=dict(exchange.arguments or {}))
    log.info("Declared exchange '%s' (%s%s%s)", exchange.name, exchange.type,
             ', durable' if exchange.durable else '',
             ', auto-delete' if exchange.auto_delete else '')


def declare_queue(channel, handler, name):
    """Declare the handler's durable queue and bind it to its exchange."""
    keys = routing_keys(handler)
    # Handlers written for 1.x do not have the 2.0 attributes.
    exchange = getattr(handler, 'exchange', DEFAULT_EXCHANGE)
    binding_arguments = dict(getattr(handler, 'binding_arguments', None)
                             or {})
    log.info("Handling routing key(s) '%s' on queue '%s' via '%s' "
             "(exchange '%s')", ', '.join(keys), handler.queue_name, name,
             exchange)
    with refusals_as_configuration_errors('queue %r' % handler.queue_name):
        channel.queue_declare(
            queue=handler.queue_name, durable=True, exclusive=False,
            auto_delete=False, arguments=dict(handler.arguments or {}))
    for key in keys:
        with refusals_as_configuration_errors(
                'the binding of queue %r to exchange %r'
                % (handler.queue_name, exchange)):
            channel.queue_bind(
                queue=handler.queue_name, exchange=exchange,
                routing_key=key, arguments=binding_arguments)


@contextlib.contextmanager
def refusals_as_configuration_errors(
        subject, refusals=gocept.amqprun.connection.CONFIGURATION_REFUSALS):
    """Turn the broker's configuration ``refusals`` of ``subject`` into
    ``DeclareRefused`` and a queue the broker cannot reach in time into
    ``QueueUnavailable``; let every other error through."""
    try:
        yield
    except refusals as e:
        text = gocept.amqprun.connection.describe(e)
        if gocept.amqprun.connection.UNAVAILABLE_QUEUE_TEXT.search(text):
            raise gocept.amqprun.interfaces.QueueUnavailable(
                'The broker could not reach %s (a quorum queue without a '
                'leader while the cluster heals?): %s' % (
                    subject, text)) from e
        raise gocept.amqprun.interfaces.DeclareRefused(
            'The broker refused %s: %s' % (subject, text)) from e
