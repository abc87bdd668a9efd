"""Tests for gocept.amqprun.topology: declare, bind, refusals."""
import amqp.exceptions
import pytest
import zope.interface.verify

from gocept.amqprun.handler import Handler
from gocept.amqprun.interfaces import ConfigurationError
from gocept.amqprun.interfaces import DeclareRefused
from gocept.amqprun.interfaces import FatalError
from gocept.amqprun.interfaces import IExchange
from gocept.amqprun.interfaces import QueueUnavailable
from gocept.amqprun.interfaces import RecoverableError
from gocept.amqprun.tests.unit.fakes import FakeChannel
from gocept.amqprun.topology import Exchange
from gocept.amqprun.topology import check_unique_queues
from gocept.amqprun.topology import declare
from gocept.amqprun.topology import declare_exchange
from gocept.amqprun.topology import declare_queue
from gocept.amqprun.topology import routing_keys


def handler(queue='queue', routing_key='route', arguments=None, **kw):
    return Handler(queue, routing_key, lambda message: None,
                   arguments=arguments, **kw)


class OneXHandler:
    """An IHandler written for 1.x: no exchange, no binding arguments."""

    queue_name = 'old'
    routing_key = 'old.key'
    arguments = None


@pytest.mark.parametrize('routing_key, expected', [
    ('route', ['route']),
    (['a', 'b'], ['a', 'b']),
    (('a', 'b'), ['a', 'b']),
])
def test_routing_keys_are_a_list(routing_key, expected):
    assert routing_keys(handler(routing_key=routing_key)) == expected


def test_declare_queue_declares_durable_queue_and_binds_every_key():
    channel = FakeChannel()
    declare_queue(channel, handler('queue', ('a', 'b')), 'name')
    assert channel.calls == [
        ('queue_declare', ('arguments', {}), ('auto_delete', False),
         ('durable', True), ('exclusive', False), ('queue', 'queue')),
        ('queue_bind', ('arguments', {}), ('exchange', 'amq.topic'),
         ('queue', 'queue'), ('routing_key', 'a')),
        ('queue_bind', ('arguments', {}), ('exchange', 'amq.topic'),
         ('queue', 'queue'), ('routing_key', 'b')),
    ]


def test_declare_queue_binds_to_the_handlers_exchange_with_its_arguments():
    channel = FakeChannel()
    declare_queue(channel, handler(
        'docs', '', exchange='documents',
        binding_arguments={'x-match': 'any', 'format': 'pdf'}), 'name')
    assert channel.calls[1] == (
        'queue_bind', ('arguments', {'x-match': 'any', 'format': 'pdf'}),
        ('exchange', 'documents'), ('queue', 'docs'), ('routing_key', ''))


def test_declare_queue_binds_a_1x_handler_to_amq_topic():
    channel = FakeChannel()
    declare_queue(channel, OneXHandler(), 'name')
    assert channel.calls[1] == (
        'queue_bind', ('arguments', {}), ('exchange', 'amq.topic'),
        ('queue', 'old'), ('routing_key', 'old.key'))


def test_declare_queue_keeps_argument_types():
    channel = FakeChannel()
    arguments = {'x-message-ttl': 60000, 'x-queue-type': 'quorum',
                 'x-ha-policy': 'all'}
    declare_queue(channel, handler(arguments=arguments), 'name')
    declared = dict(channel.calls[0][1:])['arguments']
    assert declared == arguments
    assert isinstance(declared['x-message-ttl'], int)


def test_declare_queue_supports_non_ascii_names():
    channel = FakeChannel()
    declare_queue(channel, handler('queue.ü', 'route.ü'), 'name')
    assert dict(channel.calls[1][1:])['routing_key'] == 'route.ü'


def test_check_unique_queues_accepts_distinct_queues():
    check_unique_queues([('one', handler('a')), ('two', handler('b'))])


def test_check_unique_queues_refuses_two_handlers_on_one_queue():
    with pytest.raises(ConfigurationError) as info:
        check_unique_queues([('one', handler('queue')),
                             ('two', handler('queue'))])
    assert isinstance(info.value, FatalError)
    assert str(info.value) == (
        "Queue 'queue' is bound to two handlers: 'one' and 'two'")


def test_declare_declares_every_handler_queue():
    channel = FakeChannel()
    declare(channel, [('one', handler('a')), ('two', handler('b'))])
    assert [dict(call[1:])['queue'] for call in channel.calls
            if call[0] == 'queue_declare'] == ['a', 'b']


def test_declare_declares_the_exchanges_first_in_name_order():
    channel = FakeChannel()
    declare(channel, [('one', handler('a', exchange='orders'))],
            [Exchange('orders', 'direct'), Exchange('events', 'fanout')])
    assert channel.names == [
        'exchange_declare', 'exchange_declare', 'queue_declare',
        'queue_bind']
    assert [dict(call[1:]).get('exchange') for call in channel.calls] == [
        'events', 'orders', None, 'orders']


def test_declare_refuses_two_handlers_on_one_queue_before_declaring():
    channel = FakeChannel()
    with pytest.raises(ConfigurationError):
        declare(channel, [('one', handler('a')), ('two', handler('a'))])
    assert channel.calls == []


@pytest.mark.parametrize('refusal', [
    amqp.exceptions.PreconditionFailed(
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'"),
    amqp.exceptions.NotFound("NOT_FOUND - no exchange 'missing'"),
    amqp.exceptions.AccessRefused('ACCESS_REFUSED - no configure access'),
], ids=['precondition', 'not-found', 'access'])
def test_refused_queue_declare_is_a_fatal_configuration_error(refusal):
    channel = FakeChannel(queue_declare=refusal)
    with pytest.raises(DeclareRefused) as info:
        declare_queue(channel, handler('orders'), 'name')
    assert isinstance(info.value, FatalError)
    assert str(info.value).startswith("The broker refused queue 'orders': ")
    assert str(refusal) in str(info.value)


def test_refused_bind_names_queue_and_exchange():
    channel = FakeChannel(queue_bind=amqp.exceptions.NotFound(
        "NOT_FOUND - no exchange 'amq.topic'"))
    with pytest.raises(DeclareRefused) as info:
        declare_queue(channel, handler('orders'), 'name')
    assert str(info.value).startswith(
        "The broker refused the binding of queue 'orders' to exchange "
        "'amq.topic': ")


# -- exchanges ---------------------------------------------------------------

def test_exchange_provides_IExchange_with_durable_defaults():
    exchange = Exchange('orders', 'direct')
    assert zope.interface.verify.verifyObject(IExchange, exchange)
    assert (exchange.name, exchange.type, exchange.durable,
            exchange.auto_delete, exchange.arguments) == (
        'orders', 'direct', True, False, None)
    assert repr(exchange) == "<Exchange 'orders' (direct)>"


@pytest.mark.parametrize('type', [
    'direct', 'topic', 'fanout', 'headers', 'x-consistent-hash'])
def test_exchange_accepts_the_standard_and_plugin_types(type):
    assert Exchange('orders', type).type == type


@pytest.mark.parametrize('name, type, problem', [
    ('orders', 'fan-out', "Exchange 'orders' has the unknown type 'fan-out':"
                          " use one of direct, fanout, headers, topic or a "
                          "plugin's x- type"),
    ('amq.orders', 'direct', "Exchange 'amq.orders' cannot be declared: "
                             "names starting with 'amq.' belong to the "
                             "broker"),
    ('', 'direct', 'An exchange needs a name'),
])
def test_exchange_refuses_what_no_broker_declares(name, type, problem):
    with pytest.raises(ValueError) as info:
        Exchange(name, type)
    assert str(info.value).startswith(problem)


def test_declare_exchange_passes_every_setting_to_the_broker():
    channel = FakeChannel()
    declare_exchange(channel, Exchange(
        'orders', 'direct', durable=False, auto_delete=True,
        arguments={'alternate-exchange': 'unrouted'}))
    assert channel.calls == [
        ('exchange_declare', ('arguments', {'alternate-exchange': 'unrouted'}),
         ('auto_delete', True), ('durable', False), ('exchange', 'orders'),
         ('type', 'direct'))]


@pytest.mark.parametrize('refusal', [
    amqp.exceptions.PreconditionFailed(
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange "
        "'orders': received 'direct' but current is 'fanout'"),
    amqp.exceptions.AccessRefused('ACCESS_REFUSED - no configure access'),
    amqp.exceptions.InvalidCommand(
        "COMMAND_INVALID - unknown exchange type 'x-consistent-hash'"),
], ids=['precondition', 'access', 'unknown-type'])
def test_refused_exchange_declare_names_the_exchange_and_the_reason(refusal):
    channel = FakeChannel(exchange_declare=refusal)
    with pytest.raises(DeclareRefused) as info:
        declare_exchange(channel, Exchange('orders', 'x-consistent-hash'))
    assert str(info.value).startswith(
        "The broker refused exchange 'orders': ")
    assert str(refusal) in str(info.value)


def test_refused_exchange_declare_stops_before_any_queue():
    channel = FakeChannel(exchange_declare=amqp.exceptions.PreconditionFailed(
        'PRECONDITION_FAILED'))
    with pytest.raises(DeclareRefused):
        declare(channel, [('one', handler('a'))],
                [Exchange('orders', 'topic')])
    assert channel.names == ['exchange_declare']


def test_connection_errors_during_declare_propagate_unchanged():
    channel = FakeChannel(queue_declare=ConnectionResetError('reset'))
    with pytest.raises(ConnectionResetError):
        declare_queue(channel, handler('orders'), 'name')


def test_a_queue_without_leader_is_unavailable_not_refused():
    # What RabbitMQ answers while a quorum queue elects a leader.
    channel = FakeChannel(queue_declare=amqp.exceptions.NotFound(
        "NOT_FOUND - failed to perform operation on queue 'orders' in "
        "vhost '/' due to timeout"))
    with pytest.raises(QueueUnavailable) as info:
        declare_queue(channel, handler('orders'), 'name')
    assert isinstance(info.value, RecoverableError)
    assert str(info.value).startswith(
        "The broker could not reach queue 'orders' (a quorum queue "
        "without a leader while the cluster heals?): ")
    assert 'due to timeout' in str(info.value)
