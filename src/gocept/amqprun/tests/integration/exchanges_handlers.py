"""Handlers on other exchanges than ``amq.topic``, for test_exchanges.

Each replies ``b'<name>: <body>'`` to the fanout exchange ``REPLIES`` with
its name as the routing key, so a test counts what reached which handler
with one client bound to ``REPLIES``.
"""
import gocept.amqprun.handler
import gocept.amqprun.message


#: The fanout exchange every handler here replies to.
REPLIES = 'test.replies'
#: The headers every headers-exchange handler here matches on.
REPORT = {'format': 'pdf', 'type': 'report'}


def reply(name, message):
    """The reply of handler ``name`` to ``message``."""
    return [gocept.amqprun.message.Message(
        {}, name.encode() + b': ' + message.body, routing_key=name,
        exchange=REPLIES)]


@gocept.amqprun.handler.declare(
    'test.exchanges.orders', 'order.new', exchange='test.orders')
def orders(message):
    return reply('orders', message)


@gocept.amqprun.handler.declare(
    'test.exchanges.invalidate.a', '', exchange='test.invalidations')
def invalidate_a(message):
    return reply('invalidate_a', message)


@gocept.amqprun.handler.declare(
    'test.exchanges.invalidate.b', '', exchange='test.invalidations')
def invalidate_b(message):
    return reply('invalidate_b', message)


@gocept.amqprun.handler.declare(
    'test.exchanges.all', '', exchange='test.documents',
    binding_arguments=dict(REPORT, **{'x-match': 'all'}))
def all_of(message):
    return reply('all_of', message)


@gocept.amqprun.handler.declare(
    'test.exchanges.any', '', exchange='test.documents',
    binding_arguments=dict(REPORT, **{'x-match': 'any'}))
def any_of(message):
    return reply('any_of', message)


@gocept.amqprun.handler.declare(
    'test.exchanges.transient', 'transient.#', exchange='test.transient')
def transient(message):
    """Bound to an exchange that does not survive a broker restart; replies
    on ``amq.topic``, which does."""
    return [gocept.amqprun.message.Message(
        {}, b'transient: ' + message.body, routing_key='test.transient.reply')]


@gocept.amqprun.handler.declare(
    'test.exchanges.missing', 'any', exchange='test.missing')
def bound_to_a_missing_exchange(message):
    """Bound to an exchange that nobody declares."""
    return []  # pragma: no cover (never consumes: the bind is refused)
