"""Tests for gocept.amqprun.channelops: Commit and Reject."""
import threading

import pytest
import zope.interface.verify

from gocept.amqprun.channelops import ChannelOp
from gocept.amqprun.channelops import Commit
from gocept.amqprun.channelops import Reject
from gocept.amqprun.interfaces import CommitFailed
from gocept.amqprun.interfaces import ConnectionLost
from gocept.amqprun.interfaces import IChannelOp
from gocept.amqprun.server import Delivery
from gocept.amqprun.tests.unit.fakes import FakeChannel
from gocept.amqprun.tests.unit.fakes import outgoing_message


@pytest.mark.parametrize('op', [
    ChannelOp(),
    Commit(Delivery(1, 1), []),
    Commit(None, [outgoing_message()]),
    Reject(Delivery(1, 1)),
], ids=['ChannelOp', 'Commit', 'Commit-send', 'Reject'])
def test_channel_ops_provide_IChannelOp(op):
    assert zope.interface.verify.verifyObject(IChannelOp, op)


def test_channel_op_base_class_does_not_execute():
    with pytest.raises(NotImplementedError):
        ChannelOp().execute(FakeChannel())


def test_commit_acks_then_publishes_in_order():
    first, second = outgoing_message(b'1'), outgoing_message(b'2')
    channel = FakeChannel()
    Commit(Delivery(1, 42), [first, second]).execute(channel)
    assert channel.calls == [
        ('basic_ack', 42), ('publish', first), ('publish', second)]


def test_commit_without_delivery_only_publishes():
    message = outgoing_message()
    channel = FakeChannel()
    Commit(None, [message]).execute(channel)
    assert channel.calls == [('publish', message)]


def test_commit_copies_the_message_list():
    messages = [outgoing_message()]
    op = Commit(None, messages)
    messages.append(outgoing_message())
    assert len(op.messages) == 1


def test_commit_is_due_at_once():
    assert Commit(None, []).not_before == 0


def test_reject_requeues_the_delivery():
    channel = FakeChannel()
    Reject(Delivery(1, 42)).execute(channel)
    assert channel.calls == [('basic_reject', 42, True)]


def test_reject_without_delay_is_due_at_once():
    assert Reject(Delivery(1, 1), delay=0, now=100).not_before == 0


def test_reject_with_delay_is_due_after_it():
    assert Reject(Delivery(1, 1), delay=2.5, now=100).not_before == 102.5


def test_wait_returns_once_resolved():
    op = Commit(None, [])
    op.resolve()
    op.wait(0)


def test_wait_raises_the_error_the_op_was_resolved_with():
    op = Commit(None, [])
    error = ConnectionLost('gone')
    op.resolve(error)
    with pytest.raises(ConnectionLost) as info:
        op.wait(0)
    assert info.value is error


def test_wait_times_out_with_CommitFailed():
    op = Commit(None, [])
    with pytest.raises(CommitFailed, match='within 0 seconds'):
        op.wait(0)


def test_wait_is_woken_by_resolve_from_another_thread():
    op = Commit(None, [])
    resolver = threading.Thread(target=op.resolve)
    resolver.start()
    op.wait(10)
    resolver.join()


def test_commit_repr():
    assert repr(Commit(Delivery(1, 7), [outgoing_message()])) == (
        '<Commit ack=7 publish=1>')
    assert repr(Commit(None, [])) == '<Commit ack=None publish=0>'


def test_reject_repr():
    assert repr(Reject(Delivery(1, 7))) == '<Reject tag=7>'


def test_delivery_repr():
    assert repr(Delivery(2, 7)) == '<Delivery 2/7>'


def test_op_is_claimed_for_execution_once():
    op = Commit(None, [])
    assert op.claim()
    assert not op.claim()


def test_op_whose_waiter_gave_up_cannot_be_claimed():
    op = Commit(None, [])
    with pytest.raises(CommitFailed):
        op.wait(0)
    assert not op.claim()


def test_waiter_of_a_claimed_op_waits_for_its_outcome():
    op = Commit(None, [])
    assert op.claim()
    outcome = []

    def wait():
        try:
            op.wait(0)
        except Exception as error:  # pragma: no cover (reported below)
            outcome.append(error)
        else:
            outcome.append('resolved')
    waiter = threading.Thread(target=wait)
    waiter.start()
    op.resolve()
    waiter.join(10)
    assert outcome == ['resolved']


def test_unclaimed_op_can_be_claimed_again():
    op = Commit(None, [])
    assert op.claim()
    op.unclaim()
    assert op.claim()
