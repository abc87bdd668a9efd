"""Worker(Pool): task -> transaction -> handler -> commit or give back.

Runs on: the worker threads. A worker takes a task from the server's queue,
begins a transaction, joins the session's data manager and calls the
handler. The commit is carried out by the I/O thread (see
``datamanager``); the worker only waits for its outcome. A transient error
(one the transaction manager calls retryable, e.g. a ZODB
``ConflictError``) is retried at once in a fresh transaction, up to
``transient_retries`` times. A message whose transaction did not commit
goes back to the broker after the retry delay, or to the dead-letter
destination once it used up its attempts.
"""
import logging
import threading
import time

import transaction

import gocept.amqprun.channelops
import gocept.amqprun.datamanager
import gocept.amqprun.interfaces
import gocept.amqprun.process
import gocept.amqprun.retry
import gocept.amqprun.security
import gocept.amqprun.session


log = logging.getLogger(__name__)

#: Handed to each worker to make it stop.
STOP = object()

#: How many body bytes a DEBUG line shows.
BODY_PREVIEW = 200


class Worker(threading.Thread):
    """Handles tasks from ``pool.server.tasks`` until told to stop."""

    def __init__(self, pool, number):
        super().__init__(name='amqprun-worker-%d' % number, daemon=True)
        self.pool = pool
        self.server = pool.server

    def run(self):
        """Take tasks until STOP or until the pool is stopping."""
        tasks = self.server.tasks
        while True:
            task = tasks.get()
            try:
                if task is STOP or self.pool.stopping.is_set():
                    # An unhandled task is unacked: the broker redelivers
                    # it when the connection closes.
                    return
                self.handle(task)
            finally:
                tasks.task_done()

    def handle(self, task):
        """Handle one task in a transaction; give it back if not committed.

        Notifies ``IMessageHandled`` with the outcome once done.
        """
        started = time.monotonic()
        outcome, error = self._handle(task)
        gocept.amqprun.process.notify(
            gocept.amqprun.interfaces.MessageHandled(
                task.message, task.handler_name, outcome,
                time.monotonic() - started, error))

    def _handle(self, task):
        """Return the outcome of handling ``task`` and its error."""
        message, handler = task.message, task.handler
        if self._used_up(message, handler):
            return gocept.amqprun.interfaces.DEAD_LETTERED, None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Processing message %s %s (%s) with '%s'; body %r",
                      message.delivery_tag, message.header.message_id,
                      message.routing_key, task.handler_name,
                      (message.body or b'')[:BODY_PREVIEW])
        started = time.monotonic()
        retries = self.pool.transient_retries
        while True:
            session = gocept.amqprun.session.Session(self.server, message)
            error, transient = self._attempt(
                session, message, handler, retries)
            if not transient or not retries:
                break
            retries -= 1
        if session.in_doubt:
            # Neither reject nor count: the delivery's channel is gone and
            # the broker redelivers the message unless it committed.
            return gocept.amqprun.interfaces.IN_DOUBT, None
        if not session.settled:
            return self._give_back(message, handler, error, transient), error
        self.pool.failures.forget(message)
        log.info("Handled message %s (%s) with '%s' in %.3f s",
                 message.header.message_id, message.routing_key,
                 task.handler_name, time.monotonic() - started)
        if session.error_handled:
            return gocept.amqprun.interfaces.ERROR_HANDLED, error
        return gocept.amqprun.interfaces.HANDLED, None

    def _used_up(self, message, handler):
        """Dead-letter without handling a message that used up its attempts.

        Happens when its last failure could not dead-letter it (the
        connection was lost meanwhile, or the broker's consumer_timeout hit
        it): the broker redelivered it instead. Returns True when the
        message was dealt with.
        """
        policy = self._policy(handler)
        attempts = self.pool.failures.count(message)
        if not policy.gives_up(attempts):
            return False
        error_text = (self.pool.failures.last_error(message)
                      or 'failed %d times' % attempts)
        if not self._dead_letter(message, policy, error_text, attempts):
            self._requeue(message, policy)
        return True

    def _policy(self, handler):
        return getattr(handler, 'retry_policy', None) or self.pool.policy

    def _attempt(self, session, message, handler, retries):
        """Handle ``message`` once in ``session``; return (error,
        transient)."""
        try:
            with self.server.handling(session), \
                    gocept.amqprun.security.interaction(handler.principal):
                return self._run_transaction(
                    session, message, handler, retries)
        except Exception as e:  # e.g. a resource whose abort fails
            log.error('Unhandled exception, prevent thread from crashing',
                      exc_info=True)
            return e, False

    def _run_transaction(self, session, message, handler, retries):
        """Run the handler and commit; return (error or None, transient).

        ``transient`` is True for an error the transaction manager calls
        retryable; with ``retries`` left it is logged at INFO only.
        """
        response = None
        try:
            transaction.begin()
            session.join_transaction()
            response = handler(message)
            outgoing = (response.responses
                        if gocept.amqprun.interfaces.IResponse.providedBy(
                            response) else response)
            for outgoing_message in outgoing:
                log.debug('Sending message to %s in response to message %s',
                          outgoing_message.routing_key,
                          message.delivery_tag)
                session.send(outgoing_message)
            transaction.commit()
        except Exception as e:
            # Asked before the abort: the resources of the failed
            # transaction decide (zope.sqlalchemy's should_retry).
            transient = transaction.get().isRetryableError(e)
            lost = isinstance(e, gocept.amqprun.interfaces.ConnectionLost)
            if transient and retries:
                log.info('Transient error while processing message %s '
                         '(%s), trying again at once (%d more time(s) at '
                         'most): %s: %s', message.delivery_tag,
                         message.header.message_id, retries,
                         type(e).__name__, e)
            elif not lost and not transient:
                log.error('Error while processing message %s (%s)',
                          message.delivery_tag, message.header.message_id,
                          exc_info=True)
            # else: not the handler's fault (or a conflict that kept
            # coming back), _give_back logs a warning
            transaction.abort()
            if (gocept.amqprun.interfaces.IResponse.providedBy(response)
                    and not transient and not lost):
                # (After a lost connection the delivery cannot be acked;
                # the broker hands the message out again, to be handled
                # afresh. A transient error is tried again first.)
                self._report_commit_error(session, message, response)
            return e, transient
        # ErrorHandlingHandler turned an error into a message itself.
        session.error_handled = getattr(response, 'error', None) is not None
        return None, False

    def _report_commit_error(self, session, message, response):
        """IResponse: ack the message with the response's error messages."""
        try:
            transaction.begin()
            session.acknowledge(message)
            for error_message in response.exception():
                session.send(error_message)
            transaction.commit()
        except Exception:
            log.error('Error during exception handling', exc_info=True)
            transaction.abort()
        else:
            session.error_handled = True

    def _give_back(self, message, handler, error, transient=False):
        """Requeue the message after the delay, or dead-letter it; return
        the outcome."""
        policy = self._policy(handler)
        error_text = '%s: %s' % (type(error).__name__, error)
        if transient:
            # Conflicts say nothing about the message: never dead-letter
            # it for them.
            log.warning('Message %s (%s) kept failing with transient '
                        'errors (%s); returning it to the broker in %.1f s, '
                        'not counted as a failed attempt',
                        message.header.message_id, message.routing_key,
                        error_text, policy.delay)
            self._requeue(message, policy)
            return gocept.amqprun.interfaces.RETRIED
        if isinstance(error, gocept.amqprun.interfaces.AckTimedOut):
            # The handler took longer than the broker allows: that is an
            # attempt, or a handler that always does would loop forever.
            attempts = self.pool.failures.record(message, error_text)
            log.warning('Message %s (%s) failed %d time(s): %s; its '
                        'redelivery is flagged redelivered',
                        message.header.message_id, message.routing_key,
                        attempts, error)
            return gocept.amqprun.interfaces.RETRIED
        if isinstance(error, gocept.amqprun.interfaces.ConnectionLost):
            # Not the handler's fault: the broker redelivers the message.
            log.warning('Message %s (%s) goes back to the broker: %s',
                        message.header.message_id, message.routing_key,
                        error)
            return gocept.amqprun.interfaces.RETURNED
        attempts = self.pool.failures.record(message, error_text)
        if policy.gives_up(attempts) and self._dead_letter(
                message, policy, error_text, attempts):
            return gocept.amqprun.interfaces.DEAD_LETTERED
        log.warning('Message %s (%s) failed %d time(s); returning it to the '
                    'broker in %.1f s', message.header.message_id,
                    message.routing_key, attempts, policy.delay)
        self._requeue(message, policy)
        return gocept.amqprun.interfaces.RETRIED

    def _requeue(self, message, policy):
        """Return the message to the broker after the policy's delay."""
        self.server.submit(gocept.amqprun.channelops.Reject(
            message.delivery, delay=policy.delay, now=time.time()))

    def _dead_letter(self, message, policy, error_text, attempts):
        """Ack the message and publish it to the dead-letter destination."""
        op = gocept.amqprun.channelops.Commit(
            message.delivery,
            [policy.dead_letter(message, error_text, attempts)])
        self.server.submit(op)
        try:
            op.wait(gocept.amqprun.datamanager.COMMIT_TIMEOUT)
        except gocept.amqprun.interfaces.AMQPRunError:
            log.error('Could not dead-letter message %s',
                      message.header.message_id, exc_info=True)
            return False
        self.pool.failures.forget(message)
        log.error("Message %s (%s) failed %d times; sent it to '%s'",
                  message.header.message_id, message.routing_key,
                  attempts, policy.dead_letter_routing_key)
        return True


class WorkerPool:
    """``amount`` worker threads sharing the server's task queue."""

    def __init__(self, server, amount, policy=None, transient_retries=3):
        self.server = server
        self.amount = amount
        self.policy = policy or gocept.amqprun.retry.RetryPolicy()
        #: How often a transient error is retried at once, in the worker.
        self.transient_retries = transient_retries
        self.failures = gocept.amqprun.retry.FailureCounter()
        self.stopping = threading.Event()
        self.workers = []

    def start(self):
        """Start the worker threads."""
        self.workers = [Worker(self, number + 1)
                        for number in range(self.amount)]
        for worker in self.workers:
            worker.start()

    def stop(self, timeout):
        """Let running handlers finish (at most ``timeout`` seconds).

        Tasks not yet started stay unacked and go back to the broker.
        Returns the workers still running after the timeout.
        """
        self.stopping.set()
        for _ in self.workers:
            self.server.tasks.put(STOP)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0, deadline - time.monotonic()))
        return [worker for worker in self.workers if worker.is_alive()]
