"""Tests for gocept.amqprun.worker: task -> transaction -> handler -> commit.

``Worker.handle`` runs in the test thread with a FakeServer whose
``submit`` carries each op out (or fails it) at once and records it.
"""
import logging
import time

import pytest
import transaction
import ZODB
import ZODB.MappingStorage
import ZODB.POSException
import zope.component
import zope.interface
import zope.security.management

from gocept.amqprun.channelops import Commit
from gocept.amqprun.channelops import Reject
from gocept.amqprun.handler import ErrorHandlingHandler
from gocept.amqprun.handler import Handler
from gocept.amqprun.interfaces import CommitFailed
from gocept.amqprun.interfaces import CommitInDoubt
from gocept.amqprun.interfaces import ConnectionLost
from gocept.amqprun.interfaces import IMessageHandled
from gocept.amqprun.interfaces import IResponse
from gocept.amqprun.server import Task
from gocept.amqprun.tests.unit.fakes import FakeServer
from gocept.amqprun.tests.unit.fakes import RecordingDataManager
from gocept.amqprun.tests.unit.fakes import outgoing_message
from gocept.amqprun.tests.unit.fakes import received_message
from gocept.amqprun.worker import STOP
from gocept.amqprun.retry import RetryPolicy
from gocept.amqprun.worker import Worker
from gocept.amqprun.worker import WorkerPool


@pytest.fixture
def server():
    return FakeServer()


@pytest.fixture
def outcomes(registry):
    """The outcomes of the IMessageHandled events, in order."""
    seen = []
    zope.component.provideHandler(
        lambda event: seen.append(event.outcome), (IMessageHandled,))
    return seen


@pytest.fixture
def pool(server):
    return WorkerPool(server, 1, RetryPolicy(delay=3))


@pytest.fixture
def worker(pool):
    return Worker(pool, 1)


def task(function, message=None, **kw):
    """A task for a handler made of ``function``."""
    handler = Handler('queue', 'routing', function, **kw)
    return Task(message or received_message(), handler, 'test')


def returning(*messages):
    return lambda message: list(messages)


def failing(message):
    raise RuntimeError('boom')


@zope.interface.implementer(IResponse)
class RecordingResponse:
    """An IResponse that records when ``exception()`` is asked."""

    def __init__(self, log, responses, error_messages):
        self.log = log
        self.responses = responses
        self.error_messages = error_messages

    def exception(self):
        self.log.append('exception')
        if isinstance(self.error_messages, Exception):
            raise self.error_messages
        return self.error_messages


# -- Worker.handle ----------------------------------------------------------

def test_worker_calls_the_handler_with_the_received_message(worker):
    received = []
    message = received_message()
    worker.handle(task(received.append, message))
    assert received == [message]


def test_worker_commits_ack_and_handler_messages_in_one_op(worker, server,
                                                           pool, outcomes):
    reply_1, reply_2 = outgoing_message(b'1'), outgoing_message(b'2')
    message = received_message(tag=11)
    worker.handle(task(returning(reply_1, reply_2), message))
    [op] = server.ops
    assert isinstance(op, Commit)
    assert op.delivery is message.delivery
    assert op.messages == [reply_1, reply_2]
    assert server.channel.calls == [
        ('basic_ack', 11), ('publish', reply_1), ('publish', reply_2),
        ('tx_commit',)]
    assert message._session.settled
    assert outcomes == ['handled']


def test_worker_acks_a_message_whose_handler_returns_nothing(worker, server):
    worker.handle(task(lambda message: None))
    [op] = server.ops
    assert server.channel.names == ['basic_ack', 'tx_commit']


def test_worker_references_replies_to_the_received_message(worker, server):
    reply = outgoing_message()
    worker.handle(task(returning(reply), received_message(
        message_id='<orig@x>', headers={'references': '<a@x>'})))
    assert reply.header.correlation_id == '<orig@x>'
    assert reply.header.headers['references'] == '<a@x>\n<orig@x>'


def test_worker_runs_the_handler_in_a_transaction_it_commits(worker):
    log = []

    def handler(message):
        transaction.get().join(RecordingDataManager(log))
    worker.handle(task(handler))
    assert log == ['db.tpc_begin', 'db.commit', 'db.tpc_vote',
                   'db.tpc_finish']


def test_worker_requeues_when_handler_raises(worker, server, pool, outcomes):
    message = received_message()
    before = time.time()
    worker.handle(task(failing, message))
    after = time.time()
    [op] = server.ops
    assert isinstance(op, Reject)
    assert op.delivery is message.delivery
    assert before + 3 <= op.not_before <= after + 3
    assert server.channel.calls == [
        ('basic_reject', 1, True), ('tx_commit',)]
    assert outcomes == ['retried']


def test_worker_aborts_the_transaction_when_handler_raises(worker):
    log = []

    def handler(message):
        transaction.get().join(RecordingDataManager(log))
        raise RuntimeError('boom')
    worker.handle(task(handler))
    assert log == ['db.abort']


def test_worker_survives_a_resource_whose_abort_fails(worker, server):
    def handler(message):
        transaction.get().join(RecordingDataManager([], fail_in='abort'))
        raise RuntimeError('boom')
    worker.handle(task(handler))
    [op] = server.ops
    assert isinstance(op, Reject)
    worker.handle(task(returning(outgoing_message())))
    assert isinstance(server.ops[-1], Commit)


def test_worker_logs_handler_error_with_traceback(worker, caplog):
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.worker'):
        worker.handle(task(failing))
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith('Error while processing message')
    assert record.exc_info[0] is RuntimeError


def test_worker_requeues_without_delay_when_policy_has_none(server):
    worker = Worker(WorkerPool(server, 1, RetryPolicy(delay=0)), 1)
    worker.handle(task(failing))
    [op] = server.ops
    assert op.not_before == 0


def test_worker_requeues_when_broker_commit_fails(pool, outcomes):
    server = pool.server = FakeServer(outcomes=[CommitFailed('no')])
    worker = Worker(pool, 1)
    worker.handle(task(returning(outgoing_message())))
    commit, reject = server.ops
    assert isinstance(commit, Commit)
    assert isinstance(reject, Reject)
    assert server.channel.names == ['basic_reject', 'tx_commit']
    assert outcomes == ['retried']


def test_worker_leaves_redelivery_to_the_broker_when_connection_is_lost(
        pool, caplog, outcomes):
    server = pool.server = FakeServer(outcomes=[ConnectionLost('gone')])
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.worker'):
        Worker(pool, 1).handle(task(returning(outgoing_message())))
    [op] = server.ops
    assert isinstance(op, Commit)
    assert server.rejects == []
    assert outcomes == ['returned']
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_worker_requeues_when_another_resource_votes_no(worker, server):
    def handler(message):
        transaction.get().join(
            RecordingDataManager([], fail_in='tpc_vote'))
        return [outgoing_message()]
    worker.handle(task(handler))
    [op] = server.ops
    assert isinstance(op, Reject)


def test_worker_does_not_reject_a_message_whose_ack_was_committed(
        worker, server):
    def handler(message):
        transaction.get().join(
            RecordingDataManager([], fail_in='tpc_finish'))
    worker.handle(task(handler))
    assert server.rejects == []


def test_worker_sends_response_messages_of_an_IResponse(worker, server):
    reply = outgoing_message()
    worker.handle(task(lambda message: RecordingResponse([], [reply], [])))
    [op] = server.ops
    assert op.messages == [reply]


def test_worker_acks_with_exception_messages_when_IResponse_commit_fails(
        pool, outcomes):
    log = []
    server = pool.server = FakeServer(outcomes=[CommitFailed('no')])
    reply, error = outgoing_message(b'reply'), outgoing_message(b'error')
    message = received_message(tag=5)
    Worker(pool, 1).handle(task(
        lambda message: RecordingResponse(log, [reply], [error]), message))
    failed, retried = server.ops
    assert failed.messages == [reply]
    assert retried.delivery is message.delivery
    assert retried.messages == [error]
    assert server.channel.calls == [
        ('basic_ack', 5), ('publish', error), ('tx_commit',)]
    assert log == ['exception']
    assert outcomes == ['error-handled']


def test_worker_acks_when_IResponse_exception_returns_no_messages(
        pool, outcomes):
    server = pool.server = FakeServer(outcomes=[CommitFailed('no')])
    Worker(pool, 1).handle(task(
        lambda message: RecordingResponse([], [outgoing_message()], [])))
    assert server.channel.names == ['basic_ack', 'tx_commit']
    assert outcomes == ['error-handled']


def test_worker_requeues_when_IResponse_exception_fails(pool, caplog):
    server = pool.server = FakeServer(outcomes=[CommitFailed('no')])
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.worker'):
        Worker(pool, 1).handle(task(lambda message: RecordingResponse(
            [], [outgoing_message()], ValueError('cannot report'))))
    assert isinstance(server.ops[-1], Reject)
    assert 'Error during exception handling' in caplog.messages


class Failing(ErrorHandlingHandler):
    queue_name = 'queue'
    routing_key = 'routing'
    error_routing_key = 'test.error'

    def run(self):
        self.send('partial', 'test.result')
        raise RuntimeError('asdf')


class Succeeding(Failing):

    def run(self):
        self.send('result', 'test.result')


def test_worker_commits_ack_and_error_message_of_ErrorHandlingHandler(
        worker, server, pool, outcomes):
    message = received_message(tag=4, message_id='orig message id')
    worker.handle(Task(message, Failing(), 'failing'))
    [op] = server.ops
    assert isinstance(op, Commit)
    assert op.delivery is message.delivery
    [error] = op.messages
    assert error.routing_key == 'test.error'
    assert error.body.startswith(b'RuntimeError: asdf\nTraceback')
    assert error.header.correlation_id == 'orig message id'
    assert server.channel.names == ['basic_ack', 'publish', 'tx_commit']
    assert outcomes == ['error-handled']


def test_worker_commits_ack_and_results_of_ErrorHandlingHandler(
        worker, server):
    worker.handle(Task(received_message(), Succeeding(), 'succeeding'))
    [op] = server.ops
    [result] = op.messages
    assert result.body == b'result'
    assert server.channel.names == ['basic_ack', 'publish', 'tx_commit']


def test_worker_aborts_ErrorHandlingHandler_side_effects(worker, server):
    log = []

    class Writing(Failing):
        def run(self):
            transaction.get().join(RecordingDataManager(log))
            raise RuntimeError('asdf')
    worker.handle(Task(received_message(), Writing(), 'writing'))
    assert log == ['db.abort']
    assert len(server.commits) == 1


def test_worker_reports_commit_error_of_ErrorHandlingHandler(pool):
    server = pool.server = FakeServer(outcomes=[CommitFailed('tx failed')])
    Worker(pool, 1).handle(Task(received_message(), Succeeding(), 'x'))
    first, second = server.ops
    [error] = second.messages
    assert error.routing_key == 'test.error'
    assert error.body.startswith(b'CommitFailed: tx failed\nTraceback')
    assert server.channel.names == ['basic_ack', 'publish', 'tx_commit']


def test_worker_send_via_server_joins_the_handlers_commit(worker, server):
    sent, returned = outgoing_message(b'sent'), outgoing_message(b'returned')

    def handler(message):
        server.send(sent)
        return [returned]
    worker.handle(task(handler))
    [op] = server.ops
    assert op.messages == [sent, returned]


# -- the outcome event ------------------------------------------------------

def test_worker_notifies_the_outcome_with_handler_name_duration_error(
        worker, registry):
    events = []
    zope.component.provideHandler(events.append, (IMessageHandled,))
    message = received_message()
    worker.handle(Task(message, Handler('q', 'r', failing), 'the-handler'))
    [event] = events
    assert event.message is message
    assert event.handler_name == 'the-handler'
    assert event.outcome == 'retried'
    assert isinstance(event.error, RuntimeError)
    assert event.duration >= 0


def test_a_failing_subscriber_never_fails_a_committed_message(
        worker, server, registry, caplog):
    def broken_subscriber(event):
        raise RuntimeError('subscriber broke')
    zope.component.provideHandler(broken_subscriber, (IMessageHandled,))
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.process'):
        worker.handle(task(returning()))
    assert server.rejects == []
    assert [op.delivery.tag for op in server.commits] == [1]
    assert ("A subscriber failed for <MessageHandled <orig@example> by "
            "'test': handled>") in caplog.messages


# -- retry policy and dead letters -------------------------------------------

def dead_letter_pool(server, **kw):
    return WorkerPool(server, 1, RetryPolicy(
        delay=0, max_attempts=2, dead_letter_routing_key='test.dead', **kw))


def test_worker_dead_letters_a_message_after_max_attempts(server, outcomes):
    pool = dead_letter_pool(server)
    worker = Worker(pool, 1)
    worker.handle(task(failing, received_message(tag=1, message_id='<m@x>')))
    [reject] = server.ops
    assert isinstance(reject, Reject)
    redelivered = received_message(
        b'poison', tag=2, message_id='<m@x>', headers={'app': 'x'},
        content_type='text/plain')
    worker.handle(task(failing, redelivered))
    reject, commit = server.ops
    assert isinstance(commit, Commit)
    assert commit.delivery is redelivered.delivery
    [dead] = commit.messages
    assert dead.routing_key == 'test.dead'
    assert dead.exchange == 'amq.topic'
    assert dead.body == b'poison'
    assert dead.header.message_id == '<m@x>'
    assert dead.header.content_type == 'text/plain'
    assert dead.header.headers == {
        'app': 'x',
        'x-amqprun-error': 'RuntimeError: boom',
        'x-amqprun-attempts': 2,
        'x-amqprun-routing-key': 'test.routing',
        'x-amqprun-exchange': 'amq.topic'}
    assert server.channel.names[-3:] == ['basic_ack', 'publish', 'tx_commit']
    assert outcomes == ['retried', 'dead-lettered']


def test_worker_dead_letters_to_the_configured_exchange(server):
    pool = dead_letter_pool(server, dead_letter_exchange='dlx')
    pool.failures.record(received_message())
    Worker(pool, 1).handle(task(failing))
    [commit] = server.ops
    assert commit.messages[0].exchange == 'dlx'


def test_worker_forgets_failures_of_a_handled_message(server):
    pool = dead_letter_pool(server)
    worker = Worker(pool, 1)
    worker.handle(task(failing))
    worker.handle(task(lambda message: None))
    worker.handle(task(failing))
    assert [type(op).__name__ for op in server.ops] == [
        'Reject', 'Commit', 'Reject']


def test_worker_requeues_when_dead_letter_commit_fails(caplog, outcomes):
    server = FakeServer(outcomes=[CommitFailed('no')])
    pool = dead_letter_pool(server)
    pool.failures.record(received_message())
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.worker'):
        Worker(pool, 1).handle(task(failing))
    commit, reject = server.ops
    assert isinstance(commit, Commit)
    assert isinstance(reject, Reject)
    assert 'Could not dead-letter message <orig@example>' in caplog.messages
    assert outcomes == ['retried']


def test_worker_uses_the_retry_policy_of_the_handler(worker, server):
    handler = Handler('queue', 'routing', failing)
    handler.retry_policy = RetryPolicy(delay=0)
    worker.handle(Task(received_message(), handler, 'test'))
    [op] = server.ops
    assert op.not_before == 0


def test_worker_counts_quorum_queue_delivery_count_as_attempts(server):
    pool = dead_letter_pool(server)
    Worker(pool, 1).handle(task(failing, received_message(
        headers={'x-delivery-count': 1})))
    [op] = server.ops
    assert isinstance(op, Commit)


# -- security ----------------------------------------------------------------

def current_principal_id():
    interaction = zope.security.management.queryInteraction()
    if interaction is None:
        return None
    [participation] = interaction.participations
    return participation.principal.id


def test_worker_runs_handler_with_principal_in_an_interaction(worker):
    seen = []
    worker.handle(task(lambda message: seen.append(current_principal_id()),
                       principal='zope.user'))
    assert seen == ['zope.user']
    assert zope.security.management.queryInteraction() is None


def test_worker_ends_the_interaction_when_handler_fails(worker, server):
    worker.handle(task(failing, principal='zope.user'))
    assert zope.security.management.queryInteraction() is None
    assert isinstance(server.ops[0], Reject)


def test_worker_runs_handler_without_principal_outside_interactions(worker):
    seen = []
    worker.handle(task(lambda message: seen.append(current_principal_id())))
    assert seen == [None]


# -- the thread and the pool --------------------------------------------------

def test_worker_is_a_named_daemon_thread(worker):
    assert worker.daemon
    assert worker.name == 'amqprun-worker-1'


def test_worker_run_handles_tasks_until_stop(worker, server):
    handled = []
    server.tasks.put(task(handled.append))
    server.tasks.put(task(handled.append))
    server.tasks.put(STOP)
    worker.run()
    assert len(handled) == 2
    assert server.tasks.unfinished_tasks == 0


def test_worker_run_leaves_tasks_unhandled_once_the_pool_stops(
        worker, server, pool):
    handled = []
    server.tasks.put(task(handled.append))
    pool.stopping.set()
    worker.run()
    assert handled == []
    assert server.ops == []
    assert server.tasks.unfinished_tasks == 0


def test_pool_starts_and_stops_its_worker_threads(server):
    pool = WorkerPool(server, 3)
    pool.start()
    assert [worker.name for worker in pool.workers] == [
        'amqprun-worker-1', 'amqprun-worker-2', 'amqprun-worker-3']
    assert all(worker.is_alive() for worker in pool.workers)
    assert pool.stop(10) == []
    assert not any(worker.is_alive() for worker in pool.workers)


def test_pool_workers_handle_queued_tasks(server, outcomes):
    handled = []
    pool = WorkerPool(server, 2)
    for _ in range(4):
        server.tasks.put(task(handled.append))
    pool.start()
    server.tasks.join()
    pool.stop(10)
    assert len(handled) == 4
    assert outcomes == ['handled'] * 4


def test_pool_default_policy_loses_nothing(server):
    policy = WorkerPool(server, 1).policy
    assert not policy.gives_up(10 ** 6)


# -- databases: an AMQP commit in doubt, transient errors --------------------

@pytest.fixture
def zodb():
    """A real ZODB in memory and a connection of the test thread."""
    db = ZODB.DB(ZODB.MappingStorage.MappingStorage())
    connection = db.open()
    yield db, connection.root()
    connection.close()
    db.close()


def counting(root, name='count'):
    """A handler that counts its messages in ``root[name]``."""
    def handler(message):
        root[name] = root.get(name, 0) + 1
        return [outgoing_message()]
    return handler


def stored(db, name='count'):
    """What another connection reads from the database."""
    with db.transaction() as connection:
        return connection.root().get(name)


def test_worker_keeps_the_database_write_when_the_amqp_commit_is_in_doubt(
        pool, zodb, outcomes, caplog):
    db, root = zodb
    server = pool.server = FakeServer(outcomes=[CommitInDoubt('lost')])
    message = received_message()
    with caplog.at_level(logging.INFO):
        Worker(pool, 1).handle(task(counting(root), message))
    assert stored(db) == 1
    [commit] = server.ops  # neither rejected ...
    assert isinstance(commit, Commit)
    assert outcomes == ['in-doubt']
    assert pool.failures.count(message) == 0  # ... nor counted
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.levelname for r in caplog.records
            if '<orig@example>' in r.getMessage()] == ['WARNING']


def test_worker_handles_the_redelivery_after_a_commit_in_doubt_afresh(
        pool, zodb, outcomes):
    db, root = zodb
    server = pool.server = FakeServer(outcomes=[CommitInDoubt('lost')])
    worker = Worker(pool, 1)
    worker.handle(task(counting(root)))
    redelivered = received_message(tag=2)
    redelivered.redelivered = True
    worker.handle(task(counting(root), redelivered))
    assert stored(db) == 2  # the handler decides (see the idempotency recipe)
    assert server.channel.names == ['basic_ack', 'publish', 'tx_commit']
    assert outcomes == ['in-doubt', 'handled']


def conflicting(times, calls):
    """A handler raising ConflictError ``times`` times, then replying."""
    def handler(message):
        calls.append(transaction.get())
        if len(calls) <= times:
            raise ZODB.POSException.ConflictError('provoked conflict')
        return [outgoing_message()]
    return handler


def test_worker_retries_a_transient_error_at_once_in_a_fresh_transaction(
        worker, server, pool, outcomes, caplog):
    calls = []
    message = received_message()
    with caplog.at_level(logging.INFO, 'gocept.amqprun.worker'):
        worker.handle(task(conflicting(2, calls), message))
    assert len(calls) == 3
    assert len(set(map(id, calls))) == 3
    [commit] = server.ops
    assert isinstance(commit, Commit)
    assert commit.delivery is message.delivery
    assert server.channel.names == ['basic_ack', 'publish', 'tx_commit']
    assert outcomes == ['handled']
    assert pool.failures.count(message) == 0
    retries = [r for r in caplog.records if 'Transient error' in r.message]
    assert [r.levelname for r in retries] == ['INFO', 'INFO']
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_worker_returns_a_message_that_keeps_conflicting_uncounted(
        server, outcomes, caplog):
    pool = WorkerPool(server, 1, RetryPolicy(
        delay=0, max_attempts=1, dead_letter_routing_key='test.dead'))
    calls = []
    message = received_message()
    with caplog.at_level(logging.INFO, 'gocept.amqprun.worker'):
        Worker(pool, 1).handle(task(conflicting(99, calls), message))
    assert len(calls) == 4  # the first try and 3 retries
    [reject] = server.ops  # not dead-lettered although max-attempts is 1
    assert isinstance(reject, Reject)
    assert outcomes == ['retried']
    assert pool.failures.count(message) == 0
    assert [r.levelname for r in caplog.records] == [
        'INFO', 'INFO', 'INFO', 'WARNING']
    assert 'not counted as a failed attempt' in caplog.records[-1].message


def test_worker_does_not_retry_transient_errors_when_told_not_to(server):
    pool = WorkerPool(server, 1, RetryPolicy(delay=0), transient_retries=0)
    calls = []
    Worker(pool, 1).handle(task(conflicting(1, calls)))
    assert len(calls) == 1
    assert isinstance(server.ops[0], Reject)


def test_worker_retries_a_real_zodb_conflict(worker, server, zodb, outcomes):
    db, root = zodb
    root['count'] = 0
    transaction.commit()
    calls = []

    def handler(message):
        calls.append(1)
        root['count'] += 1
        if len(calls) == 1:  # another thread's commit gets in between
            with db.transaction() as other:
                other.root()['count'] = 10
        return []
    worker.handle(task(handler))
    assert len(calls) == 2
    assert stored(db) == 11
    assert outcomes == ['handled']


def test_worker_retries_a_transient_commit_error_of_an_IResponse_first(
        worker, server):
    calls = []

    def handler(message):
        calls.append(1)
        if len(calls) == 1:
            transaction.get().join(
                RecordingDataManager([], fail_in='tpc_vote',
                                     error=ZODB.POSException.ConflictError))
        return RecordingResponse([], [outgoing_message()],
                                 [outgoing_message(b'error')])
    worker.handle(task(handler))
    assert len(calls) == 2
    [commit] = server.ops
    assert [m.body for m in commit.messages] == [b'reply']
