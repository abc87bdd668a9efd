"""Tests for gocept.amqprun.retry: RetryPolicy and FailureCounter."""
import zope.interface.verify

from gocept.amqprun.interfaces import IRetryPolicy
from gocept.amqprun.retry import FailureCounter
from gocept.amqprun.retry import RetryPolicy
from gocept.amqprun.tests.unit.fakes import received_message


def test_retry_policy_provides_IRetryPolicy():
    assert zope.interface.verify.verifyObject(IRetryPolicy, RetryPolicy())


def test_retry_policy_default_never_gives_up():
    policy = RetryPolicy()
    assert policy.delay == 1.0
    assert policy.max_attempts == 0
    assert policy.dead_letter_routing_key is None
    assert policy.dead_letter_exchange == 'amq.topic'
    assert not policy.gives_up(1000)


def test_retry_policy_without_dead_letter_key_never_gives_up():
    assert not RetryPolicy(max_attempts=1).gives_up(5)


def test_retry_policy_gives_up_after_max_attempts():
    policy = RetryPolicy(max_attempts=3, dead_letter_routing_key='dead')
    assert not policy.gives_up(2)
    assert policy.gives_up(3)
    assert policy.gives_up(4)


def test_retry_policy_converts_its_settings():
    policy = RetryPolicy(delay='2', max_attempts='3')
    assert policy.delay == 2.0
    assert policy.max_attempts == 3


def test_failure_counter_counts_per_message_id():
    counter = FailureCounter()
    assert counter.record(received_message(message_id='a')) == 1
    assert counter.record(received_message(message_id='a')) == 2
    assert counter.record(received_message(message_id='b')) == 1
    counter.forget(received_message(message_id='a'))
    assert counter.record(received_message(message_id='a')) == 1


def test_failure_counter_without_message_id_uses_routing_key_and_body():
    counter = FailureCounter()
    assert counter.record(received_message(b'x', message_id=None)) == 1
    assert counter.record(received_message(b'x', message_id=None)) == 2
    assert counter.record(received_message(b'y', message_id=None)) == 1


def test_failure_counter_forgetting_an_unknown_message_is_fine():
    FailureCounter().forget(received_message())
