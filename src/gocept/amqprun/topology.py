"""Declare the handlers' queues and bind them; what a refusal means.

Runs on: the I/O thread (``declare``), after every (re)connect; the
duplicate-queue check also runs at start-up on the main thread. A declare
the broker refuses because of the configuration (a queue that exists with
other arguments or type, a missing exchange, no permission) raises
``DeclareRefused``, a fatal configuration error: retrying cannot fix it.
A queue the broker cannot reach in time (a quorum queue without a leader)
raises ``QueueUnavailable``: the server reconnects and tries again.
"""
import contextlib
import logging

import gocept.amqprun.connection
import gocept.amqprun.interfaces


log = logging.getLogger(__name__)

#: The exchange handler queues are bound to.
DEFAULT_EXCHANGE = 'amq.topic'


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


def declare(channel, named_handlers):
    """Declare and bind the queue of every ``(name, handler)`` pair.

    Raises ``DeclareRefused`` naming the queue and the broker's reason when
    the broker refuses one for a configuration reason; other errors
    (connection loss) propagate unchanged.
    """
    check_unique_queues(named_handlers)
    for name, handler in named_handlers:
        declare_queue(channel, handler, name)


def declare_queue(channel, handler, name):
    """Declare the handler's durable queue and bind it to its exchange."""
    keys = routing_keys(handler)
    log.info("Handling routing key(s) '%s' on queue '%s' via '%s'",
             ', '.join(keys), handler.queue_name, name)
    with refusals_as_configuration_errors('queue %r' % handler.queue_name):
        channel.queue_declare(
            queue=handler.queue_name, durable=True, exclusive=False,
            auto_delete=False, arguments=dict(handler.arguments or {}))
    exchange = DEFAULT_EXCHANGE
    for key in keys:
        with refusals_as_configuration_errors(
                'the binding of queue %r to exchange %r'
                % (handler.queue_name, exchange)):
            channel.queue_bind(
                queue=handler.queue_name, exchange=exchange,
                routing_key=key)


@contextlib.contextmanager
def refusals_as_configuration_errors(subject):
    """Turn the broker's configuration refusals of ``subject`` into
    ``DeclareRefused`` and a queue the broker cannot reach in time into
    ``QueueUnavailable``; let every other error through."""
    try:
        yield
    except gocept.amqprun.connection.CONFIGURATION_REFUSALS as e:
        text = gocept.amqprun.connection.describe(e)
        if gocept.amqprun.connection.UNAVAILABLE_QUEUE_TEXT.search(text):
            raise gocept.amqprun.interfaces.QueueUnavailable(
                'The broker could not reach %s (a quorum queue without a '
                'leader while the cluster heals?): %s' % (
                    subject, text)) from e
        raise gocept.amqprun.interfaces.DeclareRefused(
            'The broker refused %s: %s' % (subject, text)) from e
