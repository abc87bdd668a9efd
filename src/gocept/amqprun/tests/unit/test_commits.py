"""Tests for gocept.amqprun.commits: the op queue and the group commit.

Driven without a Server: a CommitQueue, a ConnectionHistory in its first
generation and two FakeChannels standing for the consumer and send
channels.
"""
import time

import amqp.exceptions
import pytest

from gocept.amqprun.channelops import Commit
from gocept.amqprun.channelops import Reject
from gocept.amqprun.commits import CommitQueue
from gocept.amqprun.connection import ConnectionHistory
from gocept.amqprun.interfaces import CommitFailed
from gocept.amqprun.interfaces import CommitInDoubt
from gocept.amqprun.interfaces import ConnectionLost
from gocept.amqprun.interfaces import RecoverableError
from gocept.amqprun.message import Message
from gocept.amqprun.server import Delivery
from gocept.amqprun.tests.unit.fakes import FakeChannel
from gocept.amqprun.tests.unit.fakes import FakeEncodingChannel
from gocept.amqprun.tests.unit.fakes import error_of
from gocept.amqprun.tests.unit.fakes import outgoing_message
from gocept.amqprun.tests.unit.fakes import resolved


@pytest.fixture
def commits():
    """A commit queue of a connection in its first generation."""
    history = ConnectionHistory()
    history.connected()
    commits = CommitQueue(history)
    commits.channel = FakeChannel()
    commits.send_channel = FakeChannel()
    return commits


def run_pass(commits):
    """What one pass of the I/O loop does."""
    commits.commit_due(commits.channel, commits.send_channel)


def delivered(tag, generation=1):
    return Delivery(generation, tag)


# -- executing ops: group commit ---------------------------------------------

def test_several_commits_on_one_channel_share_one_tx_commit(commits):
    reply_1, reply_2 = outgoing_message(b'1'), outgoing_message(b'2')
    ops = [Commit(delivered(1), [reply_1]),
           Commit(delivered(2), [reply_2]),
           Commit(delivered(3), [])]
    for op in ops:
        commits.submit(op)
    run_pass(commits)
    channel = commits.channel
    assert channel.names == [
        'basic_ack', 'basic_publish', 'basic_ack', 'basic_publish',
        'basic_ack', 'tx_commit']
    assert [call[1] for call in channel.calls
            if call[0] == 'basic_ack'] == [1, 2, 3]
    assert [error_of(op) for op in ops] == [None, None, None]
    assert commits.send_channel.calls == []
    assert list(commits._ops) == []


def test_ops_of_both_channels_are_committed_once_per_channel(commits):
    ack, send = Commit(delivered(1), []), Commit(None, [outgoing_message()])
    commits.submit(ack)
    commits.submit(send)
    run_pass(commits)
    assert commits.channel.names == ['basic_ack', 'tx_commit']
    assert commits.send_channel.names == ['basic_publish', 'tx_commit']
    assert error_of(ack) is None
    assert error_of(send) is None


def test_execute_ops_without_ops_commits_nothing(commits):
    run_pass(commits)
    assert commits.channel.calls == []
    assert commits.send_channel.calls == []


def test_published_message_carries_body_properties_and_routing(commits):
    message = Message(dict(message_id='<id@x>', timestamp=12, foo='bar'),
                      b'body', routing_key='route', exchange='ex')
    commits.submit(Commit(None, [message]))
    run_pass(commits)
    [publish, commit] = commits.send_channel.calls
    assert publish == (
        'basic_publish', b'body',
        dict(message_id='<id@x>', timestamp=12, delivery_mode=2,
             application_headers={'foo': 'bar'}),
        'ex', 'route')


def test_op_with_stale_generation_fails_with_ConnectionLost(commits):
    stale = Commit(delivered(1, generation=0), [outgoing_message()])
    reject = Reject(delivered(2, generation=0))
    commits.submit(stale)
    commits.submit(reject)
    run_pass(commits)
    assert isinstance(error_of(stale), ConnectionLost)
    assert isinstance(error_of(reject), ConnectionLost)
    assert commits.channel.calls == []
    assert commits.send_channel.calls == []


def test_stale_op_does_not_disturb_current_ones(commits):
    stale, current = Commit(delivered(1, 0), []), Commit(delivered(2), [])
    commits.submit(stale)
    commits.submit(current)
    run_pass(commits)
    assert isinstance(error_of(stale), ConnectionLost)
    assert error_of(current) is None
    assert commits.channel.calls == [('basic_ack', 2), ('tx_commit',)]


def test_connection_error_during_execute_fails_the_batch_uncommitted(
        commits):
    commits.channel.fail['basic_publish'] = BrokenPipeError('pipe')
    first = Commit(delivered(1), [outgoing_message()])
    second = Commit(delivered(2), [])
    with pytest.raises(BrokenPipeError):
        commits._commit_batch(commits.channel, [first, second])
    assert isinstance(error_of(first), RecoverableError)
    assert isinstance(error_of(second), RecoverableError)
    assert 'tx_commit' not in commits.channel.names


def test_unpublishable_message_fails_alone_and_the_rest_commits(commits):
    good = Commit(delivered(1), [outgoing_message(b'good')])
    bad = Commit(delivered(2), [Message(dict(timestamp='yesterday'), b'')])
    commits._commit_batch(commits.channel, [good, bad])
    assert isinstance(error_of(bad), CommitFailed)
    assert error_of(good) is None
    names = commits.channel.names
    assert names[-1] == 'tx_commit'
    assert 'tx_rollback' in names
    after_rollback = commits.channel.calls[names.index('tx_rollback') + 1:]
    assert [call[0] for call in after_rollback] == [
        'basic_ack', 'basic_publish', 'tx_commit']
    assert after_rollback[0] == ('basic_ack', 1)


def test_message_with_unencodable_header_fails_alone(commits):
    good = Commit(None, [outgoing_message(b'good')])
    bad = Commit(None, [outgoing_message(b'bad', custom=object())])
    channel = FakeEncodingChannel()
    commits._commit_batch(channel, [bad, good])
    assert isinstance(error_of(bad), CommitFailed)
    assert error_of(good) is None
    assert channel.published == [b'good']


def test_delayed_reject_is_executed_once_due(commits):
    op = Reject(delivered(1), delay=5, now=time.time() - 10)
    commits.submit(op)
    run_pass(commits)
    assert commits.channel.calls == [
        ('basic_reject', 1, True), ('tx_commit',)]
    assert error_of(op) is None


def test_delayed_reject_waits_while_later_ops_pass_it(commits):
    delayed = Reject(delivered(1), delay=60, now=time.time())
    commit = Commit(delivered(2), [])
    commits.submit(delayed)
    commits.submit(commit)
    run_pass(commits)
    assert commits.channel.calls == [('basic_ack', 2), ('tx_commit',)]
    assert not resolved(delayed)


def test_due_delayed_ops_run_in_order_of_their_time(commits):
    now = time.time()
    later = Reject(delivered(1), delay=60, now=now - 100)
    sooner = Reject(delivered(2), delay=60, now=now - 110)
    commits._delayed = []
    commits.submit(later)
    commits.submit(Reject(delivered(3), delay=600, now=now))
    run_pass(commits)
    commits.submit(sooner)
    run_pass(commits)
    tags = [call[1] for call in commits.channel.calls
            if call[0] == 'basic_reject']
    assert tags == [1, 2]
    assert len(commits._delayed) == 1


@pytest.mark.parametrize('error', [
    ConnectionResetError('reset'),
    amqp.exceptions.RecoverableConnectionError('connection gone'),
    amqp.exceptions.PreconditionFailed('unknown delivery tag'),
], ids=['socket', 'connection', 'channel'])
def test_failed_tx_commit_fails_every_op_of_the_batch(commits, error):
    channel = FakeChannel(tx_commit=error)
    ops = [Commit(delivered(1), [outgoing_message()]),
           Commit(delivered(2), []),
           Reject(delivered(3))]
    with pytest.raises(type(error)):
        commits._commit_batch(channel, ops)
    errors = [error_of(op) for op in ops]
    assert all(isinstance(e, CommitFailed) for e in errors)
    assert len({id(e) for e in errors}) == 1


def test_connection_lost_in_tx_commit_leaves_the_outcome_in_doubt(commits):
    commits.channel.fail['tx_commit'] = ConnectionResetError('reset')
    op = Commit(delivered(1), [outgoing_message()])
    commits.submit(op)
    with pytest.raises(ConnectionResetError):
        run_pass(commits)
    assert isinstance(error_of(op), CommitInDoubt)


def test_channel_closed_by_the_broker_in_tx_commit_is_a_refusal(commits):
    commits.channel.fail['tx_commit'] = amqp.exceptions.NotFound(
        'no exchange')
    op = Commit(delivered(1), [outgoing_message()])
    commits.submit(op)
    with pytest.raises(amqp.exceptions.NotFound):
        run_pass(commits)
    assert isinstance(error_of(op), CommitFailed)
    assert not isinstance(error_of(op), CommitInDoubt)


def test_ops_of_the_other_channel_are_resolved_when_one_fails(commits):
    commits.send_channel.fail['tx_commit'] = ConnectionResetError('reset')
    send = Commit(None, [outgoing_message()])
    ack = Commit(delivered(1), [])
    commits.submit(send)
    commits.submit(ack)
    with pytest.raises(ConnectionResetError):
        run_pass(commits)
    assert isinstance(error_of(send), CommitInDoubt)
    assert isinstance(error_of(ack), ConnectionLost)
    assert commits.channel.calls == []


def test_ops_whose_waiter_gave_up_are_never_executed(commits):
    op = Commit(delivered(1), [])
    commits.submit(op)
    with pytest.raises(CommitFailed):
        op.wait(0)
    run_pass(commits)
    assert commits.channel.calls == []


def test_poll_timeout_is_zero_with_pending_ops(commits):
    commits.submit(Commit(None, []))
    assert commits.poll_timeout(1.0) == 0


def test_poll_timeout_is_the_given_timeout_when_idle(commits):
    assert commits.poll_timeout(1.0) == 1.0


def test_poll_timeout_wakes_up_for_the_next_delayed_op(commits):
    now = time.time()
    commits.submit(Reject(delivered(1), delay=0.3, now=now))
    run_pass(commits)
    assert 0 < commits.poll_timeout(1.0, now) <= 0.3


def test_fail_pending_resolves_delayed_ops_and_keeps_sends(commits):
    send = Commit(None, [outgoing_message()])
    delayed = Reject(delivered(1), delay=60, now=time.time())
    commits.submit(delayed)
    run_pass(commits)
    commits.submit(send)
    commits.fail_pending(stale_only=True)
    assert isinstance(error_of(delayed), ConnectionLost)
    assert not resolved(send)
    commits.fail_pending(RecoverableError('stopped'))
    assert isinstance(error_of(send), RecoverableError)


def test_committed_transactions_and_their_ops_are_counted(commits):
    for tag in (1, 2):
        commits.submit(Commit(delivered(tag), []))
    run_pass(commits)
    commits.submit(Commit(delivered(3), []))
    run_pass(commits)
    assert (commits.transactions, commits.committed_ops) == (2, 3)
