"""Tests for gocept.amqprun.commits: the op queue and the group commit.

Driven without a Server: a CommitQueue, a ConnectionHistory in its first
generation and two FakeChannels standing for the consumer and send
channels.
"""
import collections
import time

import amqp.exceptions
import pytest

from gocept.amqprun.channelops import Commit
from gocept.amqprun.channelops import Reject
from gocept.amqprun.commits import CommitQueue
from gocept.amqprun.commits import Gathering
from gocept.amqprun.connection import ConnectionHistory
from gocept.amqprun.connection import is_partial_commit
from gocept.amqprun.interfaces import CommitFailed
from gocept.amqprun.interfaces import CommitInDoubt
from gocept.amqprun.interfaces import ConnectionLost
from gocept.amqprun.interfaces import PublishRefused
from gocept.amqprun.interfaces import RecoverableError
from gocept.amqprun.message import Message
from gocept.amqprun.server import Delivery
from gocept.amqprun.tests.unit.fakes import FakeBroker
from gocept.amqprun.tests.unit.fakes import FakeChannel
from gocept.amqprun.tests.unit.fakes import FakeEncodingChannel
from gocept.amqprun.tests.unit.fakes import error_of
from gocept.amqprun.tests.unit.fakes import outgoing_message
from gocept.amqprun.tests.unit.fakes import resolved


def commit_queue(commit_delay=0, workers=None):
    """A commit queue of a connection in its first generation."""
    history = ConnectionHistory()
    history.connected()
    commits = CommitQueue(history, commit_delay, workers)
    commits.broker = FakeBroker()
    commits.channel = commits.broker.channel()
    commits.send_channel = commits.broker.channel()
    commits.scratch = commits.broker.scratch()
    return commits


@pytest.fixture
def commits():
    """A commit queue that commits at once (no ``commit_delay``)."""
    return commit_queue()


@pytest.fixture
def gathering_commits():
    """A commit queue whose passes wait up to 10 s for recent handlers."""
    return commit_queue(commit_delay=10)


def run_pass(commits):
    """What one pass of the I/O loop does."""
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch)


def commit_batch(commits, channel, ops):
    """Execute and commit ``ops`` on ``channel`` as one transaction."""
    commits._commit_batch(channel, ops, commits.scratch, time.time())


def delivered(tag, generation=1):
    return Delivery(generation, tag)


def bodies_published(channel):
    """The bodies ``channel`` published, in order."""
    return [call[1] for call in channel.calls if call[0] == 'basic_publish']


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
        commit_batch(commits, commits.channel, [first, second])
    assert isinstance(error_of(first), RecoverableError)
    assert isinstance(error_of(second), RecoverableError)
    assert 'tx_commit' not in commits.channel.names


def test_connection_error_writing_the_commit_leaves_nothing_committed(
        commits):
    commits.channel.fail['send_commit'] = BrokenPipeError('pipe')
    commits.send_channel.fail['send_commit'] = BrokenPipeError('pipe')
    op = Commit(delivered(1), [outgoing_message()])
    send = Commit(None, [outgoing_message()])
    commits.submit(op)
    commits.submit(send)
    with pytest.raises(BrokenPipeError):
        run_pass(commits)
    assert isinstance(error_of(op), ConnectionLost)
    assert not isinstance(error_of(op), CommitInDoubt)
    assert list(commits._ops) == [send]  # for the next connection
    assert 'tx_commit' not in commits.channel.names


def test_unpublishable_message_fails_alone_and_the_rest_commits(commits):
    good = Commit(delivered(1), [outgoing_message(b'good')])
    bad = Commit(delivered(2), [Message(dict(timestamp='yesterday'), b'')])
    commit_batch(commits, commits.channel, [good, bad])
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
    commit_batch(commits, channel, [bad, good])
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
        commit_batch(commits, channel, ops)
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


def partial_commit():
    """What RabbitMQ closes the channel with when a queue refused a publish
    of a transaction whose acks it applied."""
    return amqp.exceptions.PreconditionFailed(
        'PRECONDITION_FAILED - partial tx completion', (90, 20))


def test_partial_commit_publishes_the_messages_again_then_resolves(
        commits):
    commits.channel.fail['tx_commit'] = partial_commit()
    reply = outgoing_message(b'reply')
    replying, acking = Commit(delivered(1), [reply]), Commit(delivered(2), [])
    rejecting = Reject(delivered(3))
    for op in (replying, acking, rejecting):
        commits.submit(op)
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    # The broker applied the ack and the reject: those are done.
    assert error_of(acking) is None
    assert error_of(rejecting) is None
    assert not resolved(replying)
    commits.channel = commits.broker.channel()  # the next connection's
    run_pass(commits)
    assert commits.broker.channels[-1].calls == []  # not before its delay
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, now=time.time() + 1)
    # On the scratch channel: a refusal would cost that channel only.
    scratch = commits.scratch.channel()
    assert bodies_published(scratch) == [b'reply']
    assert scratch.names[-1] == 'tx_commit'
    assert commits.send_channel.calls == []
    assert error_of(replying) is None


def commits_tried(commits):
    """How many ``tx.commit`` the channels of ``commits.broker`` sent."""
    return sum(channel.names.count('tx_commit')
               for channel in commits.broker.channels)


def next_attempt(commits, after):
    """When, in passes 0.1 s apart from ``after``, a channel tries its
    next commit."""
    tried = commits_tried(commits)
    at = after
    while commits_tried(commits) == tried:
        at = round(at + 0.1, 1)
        assert at < after + 60, 'no attempt within 60 s'
        commits.commit_due(commits.channel, commits.send_channel,
                           commits.scratch, now=at)
    return at


def test_a_refused_republish_waits_longer_each_time_on_a_new_channel(
        commits, caplog):
    op = Commit(delivered(1), [outgoing_message(b'refused')])
    commits.submit(op)
    commits.broker.refused[b'refused'] = partial_commit()
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        commits.commit_due(commits.channel, commits.send_channel,
                           commits.scratch, now=1000)
    failed, waits = 1000, []
    for _ in range(8):
        at = next_attempt(commits, failed)  # no connection error raised
        waits.append(round(at - failed, 1))
        failed = at
    assert waits == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert not resolved(op)
    # Each refusal cost a scratch channel, nothing else.
    scratches = commits.broker.channels[2:]
    assert len(scratches) == 8
    assert all(channel.closed_by_broker for channel in scratches)
    assert commits.channel.closed_by_broker  # the first refusal's
    assert commits.send_channel.calls == []
    assert ('The broker refused 1 message(s) published again '
            '(PreconditionFailed: Tx.commit: (406) PRECONDITION_FAILED - '
            'partial tx completion); next attempt in 30.0 s') in caplog.text


def test_republish_in_doubt_is_published_again(commits):
    op = Commit(delivered(1), [outgoing_message()])
    commits.submit(op)
    commits.channel.fail['tx_commit'] = partial_commit()
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    scratch = commits.scratch.channel()
    scratch.fail['tx_commit'] = ConnectionResetError('reset')
    later = time.time() + 1
    with pytest.raises(ConnectionResetError):
        commits.commit_due(commits.channel, commits.send_channel,
                           commits.scratch, now=later)
    del scratch.fail['tx_commit']
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, now=later + 2)
    assert scratch.names.count('tx_commit') == 2
    assert error_of(op) is None


def test_a_stop_gives_every_waiting_republish_its_last_chance(commits):
    refused = refuse_a_reply(commits)  # its republish is due at 1000.5
    commits.republish_now()
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, now=1000.1)
    assert bodies_published(commits.scratch.channel()) == [b'refused']
    assert error_of(refused) is None


def test_republish_that_never_happens_leaves_its_op_in_doubt(
        commits, caplog):
    op = Commit(delivered(1), [outgoing_message()])
    commits.submit(op)
    commits.channel.fail['tx_commit'] = partial_commit()
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    # Not counted as a commit not carried out: it says what it means.
    assert commits.fail_pending(ConnectionLost('The server stopped')) == 0
    assert isinstance(error_of(op), CommitInDoubt)
    assert 'may be lost' in caplog.text


def refuse_a_reply(commits):
    """A pass whose transaction the broker applies only in part; return
    the op whose reply it refused (its Republish is pending now)."""
    commits.channel.fail['tx_commit'] = partial_commit()
    refused = Commit(delivered(1), [outgoing_message(b'refused')])
    commits.submit(refused)
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        commits.commit_due(commits.channel, commits.send_channel,
                           commits.scratch, now=1000)
    del commits.channel.fail['tx_commit']
    commits.channel = commits.broker.channel()  # the next connection's
    return refused


def test_ops_publishing_where_messages_were_refused_wait_for_their_republish(
        commits):
    refused = refuse_a_reply(commits)
    replying = Commit(delivered(2), [outgoing_message(b'reply')])
    send = Commit(None, [outgoing_message(b'send')])
    acking = Commit(delivered(3), [])
    elsewhere = Commit(delivered(4), [
        outgoing_message(b'elsewhere', routing_key='test.other')])
    for op in (replying, send, acking, elsewhere):
        commits.submit(op)
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, now=1000.1)
    # Committed, the reply would be refused too, after its ack: held, its
    # request stays unacknowledged on the broker.
    assert commits.held == 2
    assert commits.republishing == 1
    assert bodies_published(commits.channel) == [b'elsewhere']
    assert commits.channel.names.count('basic_ack') == 2
    assert error_of(acking) is None and error_of(elsewhere) is None
    assert commits.send_channel.calls == []
    assert not resolved(replying) and not resolved(send)
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, now=1001)  # the republish is due
    assert bodies_published(commits.scratch.channel()) == [b'refused']
    assert error_of(refused) is None
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, now=1001.1)
    assert commits.held == 0
    assert commits.republishing == 0
    assert error_of(replying) is None and error_of(send) is None


def test_a_republish_held_by_a_blocked_broker_goes_once_unblocked(commits):
    refused = refuse_a_reply(commits)
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, now=1001, blocked=True)
    assert commits.held == 1
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, now=1001.1)
    assert commits.held == 0
    assert error_of(refused) is None


def closed_by_the_broker(channel):
    """An error as ``connection.Channel`` raises it when the broker closes
    ``channel``, whichever channel's call reads it."""
    error = amqp.exceptions.NotFound('NOT_FOUND - gone', (40, 10))
    error.channel = channel
    return error


def test_another_channel_closed_during_a_commit_leaves_it_in_doubt(commits):
    # Not a refusal of this transaction: its outcome is unknown.
    commits.channel.fail['tx_commit'] = closed_by_the_broker(
        commits.send_channel)
    op = Commit(delivered(1), [outgoing_message()])
    commits.submit(op)
    with pytest.raises(amqp.exceptions.NotFound):
        run_pass(commits)
    assert isinstance(error_of(op), CommitInDoubt)
    assert len(commits.broker.channels) == 3  # no culprit was looked for


def test_another_channel_closed_during_a_republish_is_the_connections(
        commits):
    refused = refuse_a_reply(commits)
    scratch = commits.scratch.channel()
    scratch.fail['tx_commit'] = closed_by_the_broker(commits.channel)
    with pytest.raises(amqp.exceptions.NotFound):
        commits.commit_due(commits.channel, commits.send_channel,
                           commits.scratch, now=1001)
    assert not resolved(refused)  # in doubt: published again
    assert commits.republishing == 1


def test_partial_commit_is_told_from_other_refusals():
    assert is_partial_commit(partial_commit())
    assert not is_partial_commit(amqp.exceptions.PreconditionFailed(
        'PRECONDITION_FAILED - user_id property set', (60, 40)))
    assert not is_partial_commit(ConnectionResetError('reset'))


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


# -- a broker that blocks publishing ------------------------------------------

def blocked_pass(commits):
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, blocked=True)


def test_blocked_broker_holds_publishing_ops_and_lets_acks_through(commits):
    publish = Commit(delivered(1), [outgoing_message()])
    send = Commit(None, [outgoing_message()])
    ack = Commit(delivered(2), [])
    reject = Reject(delivered(3))
    for op in (publish, send, ack, reject):
        commits.submit(op)
    blocked_pass(commits)
    assert commits.held == 2
    assert commits.channel.names == ['basic_ack', 'basic_reject',
                                     'tx_commit']
    assert commits.send_channel.calls == []
    assert not resolved(publish) and not resolved(send)
    # Claimed: their waiters wait for the outcome, however long the block.
    assert not publish.claim() and not send.claim()
    assert commits.poll_timeout(1.0) == 1.0


def test_held_ops_go_first_once_the_broker_unblocks(commits):
    held = Commit(delivered(1), [outgoing_message(b'held')])
    commits.submit(held)
    blocked_pass(commits)
    blocked_pass(commits)
    assert commits.channel.calls == []
    later = Commit(delivered(2), [outgoing_message(b'later')])
    commits.submit(later)
    run_pass(commits)
    assert commits.held == 0
    assert error_of(held) is None and error_of(later) is None
    assert bodies_published(commits.channel) == [b'held', b'later']
    assert commits.channel.names.count('tx_commit') == 1


def test_lost_connection_fails_held_ops_and_keeps_held_sends(commits):
    held = Commit(delivered(1), [outgoing_message()])
    send = Commit(None, [outgoing_message()])
    commits.submit(held)
    commits.submit(send)
    blocked_pass(commits)
    commits.history.lose(ConnectionResetError('reset'), time.monotonic())
    assert commits.fail_pending(stale_only=True) == 1
    assert isinstance(error_of(held), ConnectionLost)
    assert not resolved(send)
    commits.history.connected()
    run_pass(commits)
    assert error_of(send) is None
    assert commits.send_channel.names == ['basic_publish', 'tx_commit']


def test_stop_during_a_block_resolves_held_ops_unexecuted(commits):
    held = Commit(delivered(1), [outgoing_message()])
    commits.submit(held)
    blocked_pass(commits)
    stopped = ConnectionLost('The server stopped')
    assert commits.fail_pending(stopped) == 1
    assert error_of(held) is stopped
    assert commits.channel.calls == []
    assert commits.held == 0


def test_fail_pending_skips_ops_whose_waiter_gave_up(commits):
    op = Commit(None, [outgoing_message()])
    commits.submit(op)
    with pytest.raises(CommitFailed):
        op.wait(0)
    assert commits.fail_pending(ConnectionLost('stopped')) == 0


# -- observers ---------------------------------------------------------------

def test_observers_learn_size_and_duration_of_each_commit(commits):
    seen = []
    commits.observers.append(lambda size, seconds: seen.append(
        (size, seconds)))
    commits.submit(Commit(delivered(1), []))
    commits.submit(Commit(delivered(2), []))
    commits.submit(Commit(None, [outgoing_message()]))
    run_pass(commits)
    assert sorted(size for size, _ in seen) == [1, 2]
    assert all(seconds >= 0 for _, seconds in seen)


def test_observers_learn_nothing_when_every_op_failed(commits):
    seen = []
    commits.observers.append(lambda *args: seen.append(args))
    unsendable = outgoing_message()
    unsendable.header.headers = {'bad': object()}
    op = Commit(delivered(1), [unsendable])
    commits.submit(op)
    commits.channel = FakeEncodingChannel()
    run_pass(commits)
    assert isinstance(error_of(op), CommitFailed)
    assert seen == []


# -- refusals stay with their op ---------------------------------------------

def keyed(tag, key):
    """A delivery of the received message ``key`` (its message id)."""
    return Delivery(1, tag, key=key)


def test_op_to_a_missing_exchange_fails_alone_before_execution(commits):
    commits.broker.missing.add('nowhere')
    good = Commit(delivered(1), [outgoing_message(b'good')])
    bad = Commit(delivered(2), [Message({}, b'bad', routing_key='r',
                                        exchange='nowhere')])
    commits.submit(good)
    commits.submit(bad)
    run_pass(commits)
    error = error_of(bad)
    assert isinstance(error, PublishRefused)
    assert "exchange 'nowhere'" in str(error)
    assert "routing key 'r'" in str(error)
    assert "NOT_FOUND - no exchange 'nowhere'" in str(error)
    assert error_of(good) is None
    assert commits.channel.calls[0] == ('basic_ack', 1)
    assert commits.channel.names == ['basic_ack', 'basic_publish',
                                     'tx_commit']


def test_exchanges_are_checked_once_per_connection(commits):
    for tag in (1, 2, 3):
        commits.submit(Commit(delivered(tag), [outgoing_message()]))
        run_pass(commits)
    [scratch] = commits.broker.channels[2:]
    assert scratch.names == ['tx_select', 'exchange_declare']


def test_missing_exchange_is_asked_about_again_after_a_while(commits):
    commits.broker.missing.add('later')
    message = Message({}, b'', exchange='later')
    scratch = commits.scratch
    with pytest.raises(PublishRefused):
        scratch.check_exchange(message, 100)
    with pytest.raises(PublishRefused, match='NOT_FOUND'):
        scratch.check_exchange(message, 100.5)  # remembered
    commits.broker.missing.clear()
    scratch.check_exchange(message, 101)
    declares = [call for channel in commits.broker.channels
                for call in channel.calls if call[0] == 'exchange_declare']
    assert len(declares) == 2


def test_refusing_scratch_channel_is_replaced(commits):
    commits.broker.missing.add('nowhere')
    with pytest.raises(PublishRefused):
        commits.scratch.check_exchange(
            Message({}, b'', exchange='nowhere'), 0)
    commits.scratch.check_exchange(Message({}, b''), 0)
    first, second = commits.broker.channels[2:]
    assert first.names[-1] == 'close'
    assert second.names == ['tx_select', 'exchange_declare']


def test_a_close_of_another_channel_is_no_answer_of_the_scratch_channel(
        commits):
    scratch = commits.scratch.channel()
    scratch.fail['exchange_declare'] = closed_by_the_broker(commits.channel)
    with pytest.raises(amqp.exceptions.NotFound):  # not PublishRefused
        commits.scratch.check_exchange(Message({}, b'', exchange='x'), 0)
    scratch.fail['tx_rollback'] = closed_by_the_broker(commits.channel)
    with pytest.raises(amqp.exceptions.NotFound):
        commits.scratch.try_publish(outgoing_message())


def refused_batch(commits):
    """Three ops of received messages; the broker refuses the second's
    reply (its user_id) when the transaction is committed."""
    commits.broker.refused[b'bad'] = amqp.exceptions.PreconditionFailed(
        "PRECONDITION_FAILED - user_id property set to 'x' but "
        "authenticated user was 'guest'")
    ops = [Commit(keyed(tag, key), [outgoing_message(body)])
           for tag, key, body in ((1, '<a>', b'a'), (2, '<bad>', b'bad'),
                                  (3, '<c>', b'c'))]
    for op in ops:
        commits.submit(op)
    return ops


def test_refused_transaction_fails_only_the_refused_op(commits):
    first, bad, third = refused_batch(commits)
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    assert isinstance(error_of(bad), PublishRefused)
    assert 'user_id property' in str(error_of(bad))
    # The neighbours' deliveries died with the channel: not their fault.
    for op in (first, third):
        error = error_of(op)
        assert isinstance(error, ConnectionLost)
        assert not isinstance(error, CommitFailed)
        assert 'because of another message' in str(error)


def test_dry_runs_publish_nothing(commits):
    refused_batch(commits)
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    dry_runs = [call[0] for channel in commits.broker.channels[2:]
                for call in channel.calls]
    assert 'tx_commit' not in dry_runs
    assert dry_runs.count('tx_rollback') == 3  # every op is tried


def test_refused_message_is_dry_run_before_its_next_commit(commits):
    refused_batch(commits)
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    commits.history.connected()
    channel = commits.channel = commits.broker.channel()
    again = Commit(Delivery(2, 7, key='<bad>'), [outgoing_message(b'bad')])
    other = Commit(Delivery(2, 8, key='<d>'), [outgoing_message(b'd')])
    commits.submit(again)
    commits.submit(other)
    run_pass(commits)  # no channel closed this time
    assert isinstance(error_of(again), PublishRefused)
    assert error_of(other) is None
    assert channel.calls[0] == ('basic_ack', 8)
    assert channel.names[-1] == 'tx_commit'


def test_suspect_that_commits_is_forgotten(commits):
    refused_batch(commits)
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    del commits.broker.refused[b'bad']
    op = Commit(keyed(9, '<bad>'), [outgoing_message(b'bad')])
    commits.submit(op)
    run_pass(commits)
    assert error_of(op) is None
    assert list(commits._suspects) == []


def test_suspect_stays_one_when_its_reject_commits(commits):
    refused_batch(commits)
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    commits.submit(Reject(keyed(9, '<bad>')))
    run_pass(commits)
    assert list(commits._suspects) == ['<bad>']


def test_suspects_are_bounded(commits):
    commits.suspects_kept = 2
    for tag, key in enumerate(['<1>', '<2>', '<3>']):
        commits._suspect(Commit(keyed(tag, key), []))
    assert list(commits._suspects) == ['<2>', '<3>']


def test_refused_send_fails_alone_and_the_other_sends_wait(commits):
    commits.broker.refused[b'bad'] = amqp.exceptions.PreconditionFailed(
        'PRECONDITION_FAILED - invalid expiration')
    good = Commit(None, [outgoing_message(b'good')])
    bad = Commit(None, [outgoing_message(b'bad')])
    commits.submit(good)
    commits.submit(bad)
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    assert isinstance(error_of(bad), PublishRefused)
    assert not resolved(good)
    assert list(commits._ops) == [good]
    assert commits._suspects == {}


def test_missing_write_permission_is_a_commit_failure_not_a_poison(
        commits):
    commits.broker.refused[b'x'] = amqp.exceptions.AccessRefused(
        "ACCESS_REFUSED - write access to exchange 'amq.topic' refused")
    op = Commit(None, [outgoing_message(b'x')])
    commits.submit(op)
    with pytest.raises(amqp.exceptions.AccessRefused):
        run_pass(commits)
    error = error_of(op)
    assert isinstance(error, CommitFailed)
    assert not isinstance(error, PublishRefused)
    assert 'write access' in str(error)


def test_connection_lost_while_looking_for_the_culprit(commits):
    commits.broker.refused[b'bad'] = amqp.exceptions.PreconditionFailed(
        'refused')
    ack = Commit(delivered(1), [outgoing_message(b'bad')])
    send = Commit(None, [outgoing_message(b'send')])
    commits.scratch.channel().fail['tx_rollback'] = ConnectionResetError()
    with pytest.raises(ConnectionResetError):
        commit_batch(commits, commits.channel, [ack, send])
    assert isinstance(error_of(ack), ConnectionLost)
    assert list(commits._ops) == [send]


def test_connection_lost_while_checking_exchanges(commits):
    first = Commit(delivered(1), [outgoing_message(b'1')])
    second = Commit(delivered(2), [Message({}, b'2', exchange='other')])
    third = Commit(None, [outgoing_message(b'3')])
    for op in (first, second, third):
        commits.submit(op)
    scratch = commits.scratch.channel()
    original = scratch.exchange_declare

    def declare(exchange, **kw):
        if exchange == 'other':
            raise ConnectionResetError('reset')
        original(exchange=exchange, **kw)
    scratch.exchange_declare = declare
    with pytest.raises(ConnectionResetError):
        run_pass(commits)
    assert isinstance(error_of(first), ConnectionLost)
    assert isinstance(error_of(second), ConnectionLost)
    assert list(commits._ops) == [third]
    assert commits.channel.calls == []


def test_consumer_timeout_is_not_taken_for_a_refused_publish(commits):
    commits.channel.fail['tx_commit'] = amqp.exceptions.PreconditionFailed(
        'delivery acknowledgement on channel 1 timed out. Timeout value '
        'used: 1000 ms')
    op = Commit(delivered(1), [outgoing_message()])
    commits.submit(op)
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        run_pass(commits)
    assert isinstance(error_of(op), ConnectionLost)
    assert [channel.calls for channel in commits.broker.channels[2:]
            if 'tx_rollback' in channel.names] == []


def test_committed_transactions_and_their_ops_are_counted(commits):
    for tag in (1, 2):
        commits.submit(Commit(delivered(tag), []))
    run_pass(commits)
    commits.submit(Commit(delivered(3), []))
    run_pass(commits)
    assert (commits.transactions, commits.committed_ops) == (2, 3)


# -- gathering: waiting for the handlers that just began ---------------------

def one_of_two_handlers_done(commits):
    """Hand out two deliveries and submit the op of the first; return the
    second."""
    first, second = delivered(1), delivered(2)
    commits.delivered(first)
    commits.delivered(second)
    commits.submit(Commit(first, [outgoing_message(b'1')]))
    return second


def test_a_pass_waits_for_the_handler_of_a_delivery_just_received(
        gathering_commits):
    commits = gathering_commits
    second = one_of_two_handlers_done(commits)
    run_pass(commits)
    assert commits.channel.calls == []
    commits.submit(Commit(second, [outgoing_message(b'2')]))
    run_pass(commits)
    assert commits.channel.names == [
        'basic_ack', 'basic_publish', 'basic_ack', 'basic_publish',
        'tx_commit']
    assert commits.transactions == 1


def test_a_handler_that_began_before_the_delay_is_not_waited_for():
    commits = commit_queue(commit_delay=0.5)
    slow = Delivery(1, 1, received=time.monotonic() - 1)
    quick = delivered(2)
    commits.delivered(slow)
    commits.delivered(quick)
    op = Commit(quick, [])
    commits.submit(op)
    run_pass(commits)
    assert commits.channel.names == ['basic_ack', 'tx_commit']
    assert error_of(op) is None


def test_without_commit_delay_a_pass_commits_at_once(commits):
    one_of_two_handlers_done(commits)
    run_pass(commits)
    assert commits.channel.names == ['basic_ack', 'basic_publish',
                                     'tx_commit']


def test_a_pass_without_gathering_commits_at_once(gathering_commits):
    commits = gathering_commits
    one_of_two_handlers_done(commits)
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, gather=False)
    assert commits.channel.names == ['basic_ack', 'basic_publish',
                                     'tx_commit']


def test_poll_timeout_while_gathering_is_the_time_left(gathering_commits):
    commits = gathering_commits
    one_of_two_handlers_done(commits)
    assert commits.poll_timeout(60) == 0  # no pass has let it wait yet
    run_pass(commits)
    assert 9 < commits.poll_timeout(60) <= 10
    assert commits.poll_timeout(1.0) == 1.0


def test_new_deliveries_never_hold_pending_ops_longer_than_the_delay():
    gathering = Gathering(0.5)
    pending = collections.deque([Commit(Delivery(1, 1, received=100), [])])
    gathering.delivered(Delivery(1, 2, received=100))
    assert gathering.should_wait(pending, 100.0)
    gathering.delivered(Delivery(1, 3, received=100.3))
    assert gathering.should_wait(pending, 100.4)
    assert gathering.time_left(100.4) == pytest.approx(0.1)
    assert not gathering.should_wait(pending, 100.5)
    assert gathering.time_left(100.5) is None


def test_nothing_pending_means_nothing_to_wait_for():
    gathering = Gathering(0.5)
    gathering.delivered(Delivery(1, 1, received=100))
    assert not gathering.should_wait(collections.deque(), 100.0)


def test_deliveries_no_worker_can_take_yet_are_not_waited_for():
    gathering = Gathering(0.5, workers=2)
    busy = [Delivery(1, tag, received=99) for tag in (1, 2)]
    for delivery in busy:
        gathering.delivered(delivery)
    gathering.delivered(Delivery(1, 3, received=100))  # no worker is free
    send = collections.deque([Commit(None, [outgoing_message()])])
    assert not gathering.should_wait(send, 100.1)
    answer = collections.deque([Commit(busy[0], [])])
    assert gathering.should_wait(answer, 100.1)  # its worker takes 3 now


def test_the_deliveries_of_a_lost_connection_are_forgotten():
    gathering = Gathering(0.5)
    gathering.delivered(Delivery(1, 1, received=100))  # its op never comes
    gathering.delivered(Delivery(2, 1, received=99))  # the next connection
    send = collections.deque([Commit(None, [outgoing_message()])])
    assert not gathering.should_wait(send, 100.1)


def test_an_op_taken_without_a_look_first_still_frees_its_worker():
    commits = commit_queue(commit_delay=10, workers=1)
    old = Delivery(1, 1, received=time.monotonic() - 100)
    commits.delivered(old)
    commits.submit(Commit(old, []))
    commits.commit_due(commits.channel, commits.send_channel,
                       commits.scratch, gather=False)
    commits.delivered(delivered(2))  # the one worker takes it now
    commits.submit(Commit(None, [outgoing_message()]))
    run_pass(commits)
    assert commits.send_channel.calls == []
