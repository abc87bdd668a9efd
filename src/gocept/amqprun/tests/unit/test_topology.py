"""Tests for gocept.amqprun.topology: declare, bind, refusals."""
import amqp.exceptions
import pytest

from gocept.amqprun.handler import Handler
from gocept.amqprun.interfaces import ConfigurationError
from gocept.amqprun.interfaces import DeclareRefused
from gocept.amqprun.interfaces import FatalError
from gocept.amqprun.interfaces import QueueUnavailable
from gocept.amqprun.interfaces import RecoverableError
from gocept.amqprun.tests.unit.fakes import FakeChannel
from gocept.amqprun.topology import check_unique_queues
from gocept.amqprun.topology import declare
from gocept.amqprun.topology import declare_queue
from gocept.amqprun.topology import routing_keys


def handler(queue='queue', routing_key='route', arguments=None):
    return Handler(queue, routing_key, lambda message: None,
                   arguments=arguments)


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
        ('queue_bind', ('exchange', 'amq.topic'), ('queue', 'queue'),
         ('routing_key', 'a')),
        ('queue_bind', ('exchange', 'amq.topic'), ('queue', 'queue'),
         ('routing_key', 'b')),
    ]


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
