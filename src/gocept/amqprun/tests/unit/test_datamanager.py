"""Tests for gocept.amqprun.datamanager: two-phase commit mapped on AMQP.

Driven through a real ``transaction.TransactionManager`` (and the
thread-local one) with a server whose ``submit(op)`` resolves the op at
once, with success or a given error.
"""
import logging

import pytest
import transaction
import transaction.interfaces
import zope.interface.verify

import gocept.amqprun.datamanager
import gocept.amqprun.interfaces
from gocept.amqprun.datamanager import AMQPDataManager
from gocept.amqprun.datamanager import NoOpSavepoint
from gocept.amqprun.interfaces import CommitFailed
from gocept.amqprun.interfaces import CommitInDoubt
from gocept.amqprun.interfaces import ConnectionLost
from gocept.amqprun.session import Session
from gocept.amqprun.tests.unit.fakes import FakeChannel
from gocept.amqprun.tests.unit.fakes import FakeServer
from gocept.amqprun.tests.unit.fakes import RecordingDataManager
from gocept.amqprun.tests.unit.fakes import outgoing_message
from gocept.amqprun.tests.unit.fakes import received_message


class LoggingServer:
    """Resolves each op at once; logs the submit in the shared ``log``."""

    max_message_size = 0

    def __init__(self, log, error=None):
        self.log = log
        self.error = error
        self.channel = FakeChannel()
        self.ops = []

    def submit(self, op):
        self.log.append('amqp.submit')
        self.ops.append(op)
        if self.error is None:
            op.execute(self.channel)
        op.resolve(self.error)


class NeverServer:
    """The I/O thread never gets to the op."""

    def __init__(self):
        self.ops = []

    def submit(self, op):
        self.ops.append(op)


@pytest.fixture
def log():
    return []


@pytest.fixture
def tm():
    manager = transaction.TransactionManager()
    yield manager
    manager.abort()


def join(tm, session):
    """Join a data manager for ``session`` to tm's transaction."""
    data_manager = AMQPDataManager(session)
    tm.get().join(data_manager)
    return data_manager


def handled_session(server, tag=1):
    """A session for a received message with one reply queued."""
    session = Session(server, received_message(tag=tag))
    session.messages.append(outgoing_message())
    return session


def test_data_manager_provides_ISavepointDataManager():
    data_manager = AMQPDataManager(Session(None))
    assert zope.interface.verify.verifyObject(
        transaction.interfaces.ISavepointDataManager, data_manager)


def test_noop_savepoint_provides_IDataManagerSavepoint():
    assert zope.interface.verify.verifyObject(
        transaction.interfaces.IDataManagerSavepoint, NoOpSavepoint())


def test_commit_submits_ack_and_publishes_in_vote_and_settles(tm, log):
    server = LoggingServer(log)
    session = handled_session(server, tag=5)
    join(tm, session)
    tm.commit()
    [op] = server.ops
    assert server.channel.names == ['basic_ack', 'publish']
    assert server.channel.calls[0] == ('basic_ack', 5)
    assert session.settled
    assert session.messages == []


def test_amqp_votes_after_every_other_resource(tm, log):
    server = LoggingServer(log)
    join(tm, handled_session(server))
    tm.get().join(RecordingDataManager(log, 'files',
                                       '~gocept.amqprun.writefiles:1'))
    tm.get().join(RecordingDataManager(log, 'db', 'db:1'))
    tm.commit()
    assert log == [
        'db.tpc_begin', 'files.tpc_begin',
        'db.commit', 'files.commit',
        'db.tpc_vote', 'files.tpc_vote', 'amqp.submit',
        'db.tpc_finish', 'files.tpc_finish']


@pytest.mark.parametrize('key', [
    '~gocept.amqprun.writefiles:1700000000.123456',
    '~gocept.amqprun:1700000000.123456',
    '~gocept.amqprun.readfiles:1',
    'zzz', '~', '~~', '0123456789:1'])
def test_sort_key_sorts_after_other_resources(key):
    assert AMQPDataManager(Session(None)).sortKey() > key


def test_failed_broker_commit_is_a_no_vote_that_aborts(tm, log):
    server = LoggingServer(log, error=CommitFailed('tx.commit failed'))
    session = handled_session(server)
    join(tm, session)
    tm.get().join(RecordingDataManager(log, 'db', 'db:1'))
    with pytest.raises(CommitFailed):
        tm.commit()
    assert log == [
        'db.tpc_begin', 'db.commit', 'db.tpc_vote', 'amqp.submit',
        'db.tpc_abort']
    assert not session.settled
    assert session.messages == []
    assert session.received_message is None
    assert server.channel.calls == []


def test_lost_connection_during_vote_aborts(tm, log):
    server = LoggingServer(log, error=ConnectionLost('gone'))
    session = handled_session(server)
    join(tm, session)
    with pytest.raises(ConnectionLost):
        tm.commit()
    assert not session.settled


def test_failed_vote_of_other_resource_sends_nothing(tm, log):
    server = LoggingServer(log)
    session = handled_session(server)
    join(tm, session)
    tm.get().join(RecordingDataManager(log, 'db', 'db:1',
                                       fail_in='tpc_vote'))
    with pytest.raises(RuntimeError, match='db failed in tpc_vote'):
        tm.commit()
    assert server.ops == []
    assert not session.settled
    assert session.messages == []


@pytest.mark.parametrize('phase', ['tpc_begin', 'commit'])
def test_failure_in_other_resource_before_vote_sends_nothing(tm, log, phase):
    server = LoggingServer(log)
    session = handled_session(server)
    join(tm, session)
    tm.get().join(RecordingDataManager(log, 'db', 'db:1', fail_in=phase))
    with pytest.raises(RuntimeError):
        tm.commit()
    assert server.ops == []
    assert session.messages == []


def test_message_is_settled_once_the_broker_committed_its_ack(tm, log):
    server = LoggingServer(log)
    session = handled_session(server)
    join(tm, session)
    tm.get().join(RecordingDataManager(log, 'db', 'db:1',
                                       fail_in='tpc_finish'))
    with pytest.raises(RuntimeError, match='db failed in tpc_finish'):
        tm.commit()
    assert len(server.ops) == 1
    assert server.channel.names == ['basic_ack', 'publish']
    assert session.settled


def test_commit_that_the_io_thread_does_not_carry_out_in_time_fails(
        tm, monkeypatch):
    monkeypatch.setattr(gocept.amqprun.datamanager, 'COMMIT_TIMEOUT', 0)
    server = NeverServer()
    session = handled_session(server)
    join(tm, session)
    with pytest.raises(CommitFailed, match='did not carry out'):
        tm.commit()
    assert len(server.ops) == 1
    assert not session.settled


def test_nothing_to_send_submits_nothing(tm, log):
    server = LoggingServer(log)
    session = Session(server)
    join(tm, session)
    tm.commit()
    assert server.ops == []


def test_ack_alone_is_submitted(tm, log):
    server = LoggingServer(log)
    session = Session(server, received_message(tag=9))
    join(tm, session)
    tm.commit()
    assert server.channel.calls == [('basic_ack', 9)]
    assert session.settled


def test_abort_discards_queued_messages(tm, log):
    server = LoggingServer(log)
    session = handled_session(server)
    join(tm, session)
    tm.abort()
    assert session.messages == []
    assert server.ops == []
    assert not session.settled


def test_abort_is_idempotent_in_any_state(tm, log):
    server = LoggingServer(log)
    session = handled_session(server)
    data_manager = AMQPDataManager(session)
    txn = tm.get()
    data_manager.abort(txn)
    data_manager.abort(txn)
    data_manager.tpc_begin(txn)
    data_manager.commit(txn)
    data_manager.abort(txn)
    data_manager.tpc_abort(txn)
    data_manager.abort(txn)
    data_manager.tpc_abort(txn)
    assert session.messages == []
    assert server.ops == []


def test_tpc_abort_without_tpc_begin_does_not_raise(tm, log):
    session = handled_session(LoggingServer(log))
    AMQPDataManager(session).tpc_abort(tm.get())
    assert session.messages == []


def test_abort_after_tpc_begin_sends_nothing(tm, log):
    server = LoggingServer(log)
    session = handled_session(server)
    data_manager = AMQPDataManager(session)
    txn = tm.get()
    data_manager.tpc_begin(txn)
    data_manager.abort(txn)
    assert server.ops == []
    assert session.messages == []


def test_commit_freezes_the_messages_before_the_vote(tm, log):
    server = LoggingServer(log)
    session = handled_session(server)
    data_manager = AMQPDataManager(session)
    txn = tm.get()
    data_manager.tpc_begin(txn)
    data_manager.commit(txn)
    session.messages.append(outgoing_message(b'too late'))
    data_manager.tpc_vote(txn)
    [op] = server.ops
    assert [message.body for message in op.messages] == [b'reply']


def test_savepoint_and_rollback_keep_queued_messages(tm, log):
    server = LoggingServer(log)
    session = handled_session(server)
    join(tm, session)
    savepoint = tm.savepoint()
    session.messages.append(outgoing_message(b'after savepoint'))
    savepoint.rollback()
    tm.commit()
    [op] = server.ops
    assert [message.body for message in op.messages] == [
        b'reply', b'after savepoint']


def test_savepoint_of_thread_local_transaction(log):
    server = LoggingServer(log)
    session = Session(server)
    session.send(outgoing_message())
    transaction.savepoint().rollback()
    transaction.commit()
    assert len(server.ops) == 1


def test_data_manager_repr_names_the_session():
    assert repr(AMQPDataManager(Session(None))) == (
        '<AMQPDataManager for <Session send>>')


def test_send_outside_a_handler_notifies_its_outcome(tm, log, events):
    finished = events(gocept.amqprun.interfaces.ISendFinished)
    server = FakeServer()
    session = Session(server)
    join(tm, session)
    session.messages.extend([outgoing_message(), outgoing_message()])
    tm.commit()
    [event] = finished
    assert (event.count, event.error) == (2, None)


def test_failed_send_outside_a_handler_notifies_its_error(tm, log, events):
    finished = events(gocept.amqprun.interfaces.ISendFinished)
    error = gocept.amqprun.interfaces.CommitInDoubt('lost')
    session = Session(FakeServer(outcomes=[error]))
    join(tm, session)
    session.messages.append(outgoing_message())
    with pytest.raises(gocept.amqprun.interfaces.CommitInDoubt):
        tm.commit()
    [event] = finished
    assert (event.count, event.error) == (1, error)


def test_handled_message_notifies_no_send(tm, log, events):
    finished = events(gocept.amqprun.interfaces.ISendFinished)
    join(tm, handled_session(FakeServer()))
    tm.commit()
    assert finished == []


# -- an AMQP commit in doubt -------------------------------------------------

class InDoubtRecorder(RecordingDataManager):
    """Records what ``commit_in_doubt`` says when the transaction ends."""

    def _ended(self, txn):
        self.log.append('%s.in_doubt=%s' % (
            self.name, gocept.amqprun.datamanager.commit_in_doubt(txn)))

    def tpc_finish(self, txn):
        super().tpc_finish(txn)
        self._ended(txn)

    def tpc_abort(self, txn):
        super().tpc_abort(txn)
        self._ended(txn)


def test_commit_in_doubt_of_a_received_message_commits_the_others(
        tm, log, caplog):
    server = LoggingServer(log, error=CommitInDoubt('lost in tx.commit'))
    session = handled_session(server)
    join(tm, session)
    tm.get().join(InDoubtRecorder(log, 'db', 'db:1'))
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.datamanager'):
        tm.commit()
    assert log == [
        'db.tpc_begin', 'db.commit', 'db.tpc_vote', 'amqp.submit',
        'db.tpc_finish', 'db.in_doubt=True']
    assert session.in_doubt
    assert not session.settled
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert '<orig@example>' in record.getMessage()
    assert 'redelivers it flagged redelivered' in record.getMessage()


def test_commit_in_doubt_of_a_pure_send_fails_the_vote(tm, log):
    server = LoggingServer(log, error=CommitInDoubt('lost in tx.commit'))
    session = Session(server)
    session.messages.append(outgoing_message())
    join(tm, session)
    tm.get().join(InDoubtRecorder(log, 'db', 'db:1'))
    with pytest.raises(CommitInDoubt):
        tm.commit()
    assert log[-2:] == ['db.tpc_abort', 'db.in_doubt=True']
    assert not session.in_doubt


def test_commit_not_in_doubt_is_not_reported_in_doubt(tm, log):
    session = handled_session(LoggingServer(log))
    join(tm, session)
    tm.get().join(InDoubtRecorder(log, 'db', 'db:1'))
    tm.commit()
    assert log[-1] == 'db.in_doubt=False'
    assert not session.in_doubt
