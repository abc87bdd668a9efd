"""The op queue and the group commit: one AMQP transaction per channel per
pass of the I/O loop.

Runs on: the I/O thread, except :meth:`CommitQueue.submit` (any thread).
Workers submit ops (commit, reject); each pass of the server's loop calls
:meth:`CommitQueue.commit_due`, which executes every op that is due and
commits each channel's share with one ``tx.commit``. Each op's ack and
publishes stay atomic: they are in one AMQP transaction and succeed or
fail together. What a failed batch means:

* an op that cannot be put on the wire (``CommitFailed`` from its
  ``execute``) fails alone: the transaction is rolled back and the others
  are executed again;
* a connection error before ``tx.commit`` was sent: nothing was
  committed; sends wait for the next connection, ops on deliveries fail
  with ``ConnectionLost`` (the broker redelivers);
* a connection error after ``tx.commit`` was sent: the outcome is unknown
  (``CommitInDoubt``), unless the broker closed the channel, which means
  it refused the transaction (``CommitFailed``).
"""
import collections
import heapq
import itertools
import logging
import time

import gocept.amqprun.connection
import gocept.amqprun.interfaces
from gocept.amqprun.connection import describe


log = logging.getLogger(__name__)


class CommitQueue:
    """Ops waiting for the I/O thread, and the group commit of a pass."""

    def __init__(self, history):
        #: The server's ConnectionHistory: which deliveries are stale.
        self.history = history
        self._ops = collections.deque()
        self._delayed = []
        self._sequence = itertools.count()
        #: AMQP transactions committed, and the ops they carried (the mean
        #: batch size of the group commit is their ratio).
        self.transactions = 0
        self.committed_ops = 0

    def submit(self, op):
        """Queue an :class:`IChannelOp`; any thread."""
        self._ops.append(op)

    def poll_timeout(self, timeout, now=None):
        """How long the loop may wait for the socket: 0 with ops pending,
        else until the next delayed op is due, at most ``timeout``."""
        if self._ops:
            return 0
        if self._delayed:
            now = time.time() if now is None else now
            timeout = min(timeout, max(0, self._delayed[0][0] - now))
        return timeout

    def commit_due(self, channel, send_channel, now=None):
        """Execute every due op; commit each channel's share once.

        Ops on deliveries go to ``channel`` (the consumer channel), sends
        to ``send_channel``. Connection errors propagate after every taken
        op was resolved or put back.
        """
        batches = {}
        for op in self._take_due(time.time() if now is None else now):
            if not op.claim():
                continue  # its waiter gave up; it must not happen now
            target = self._channel_for(op, channel, send_channel)
            if target is None:
                op.resolve(self.history.stale_error(op.delivery))
                continue
            batches.setdefault(id(target), (target, []))[1].append(op)
        batches = list(batches.values())
        for number, (target, ops) in enumerate(batches):
            try:
                self._commit_batch(target, ops)
            except gocept.amqprun.connection.CONNECTION_ERRORS:
                # The other channels' batches were taken already: resolve
                # them here or their waiters hang.
                for _, others in batches[number + 1:]:
                    self._give_up_unexecuted(others)
                raise

    def fail_pending(self, error=None, stale_only=False):
        """Resolve pending ops with ``error`` (or their loss's error).

        With ``stale_only`` sends not yet carried out stay queued for the
        next connection: nothing of them reached the broker.
        """
        pending = list(self._ops)
        self._ops.clear()
        pending.extend(item[2] for item in self._delayed)
        self._delayed = []
        for op in pending:
            if stale_only and op.delivery is None:
                self._ops.append(op)
            elif error is None:
                op.resolve(self.history.stale_error(op.delivery))
            else:
                op.resolve(error)

    def _take_due(self, now):
        while self._ops:
            op = self._ops.popleft()
            if op.not_before > now:
                heapq.heappush(
                    self._delayed, (op.not_before, next(self._sequence), op))
            else:
                yield op
        while self._delayed and self._delayed[0][0] <= now:
            yield heapq.heappop(self._delayed)[2]

    def _channel_for(self, op, channel, send_channel):
        if op.delivery is None:
            return send_channel
        if not self.history.is_current(op.delivery):
            return None
        return channel

    def _commit_batch(self, channel, ops):
        """Execute ``ops`` and commit them in one AMQP transaction."""
        op_channel = gocept.amqprun.connection.OpChannel(channel)
        ops = list(ops)
        while ops:
            failed = error = None
            committing = False
            try:
                for op in ops:
                    try:
                        op.execute(op_channel)
                    except gocept.amqprun.interfaces.CommitFailed as e:
                        failed, error = op, e
                        break
                op_channel.flush()  # an error here: nothing committed
                if failed is None:
                    committing = True
                    channel.tx_commit()
                else:
                    channel.tx_rollback()
            except gocept.amqprun.connection.CONNECTION_ERRORS as e:
                self._fail_batch(ops, e, committing)
                raise
            if failed is None:
                break
            log.debug('%r failed, the others are tried again: %s',
                      failed, error)
            failed.resolve(error)
            ops.remove(failed)
        self.transactions += 1
        self.committed_ops += len(ops)
        for op in ops:
            op.resolve()
        log.debug('Committed %d op(s) in one AMQP transaction', len(ops))

    def _give_up_unexecuted(self, ops):
        """Ops claimed but not executed when the connection failed.

        Sends go back to the queue for the next connection (nothing of
        them reached the broker); ops on deliveries fail.
        """
        for op in ops:
            if op.delivery is None:
                op.unclaim()
                self._ops.append(op)
            else:
                op.resolve(self.history.stale_error(op.delivery))

    def _fail_batch(self, ops, error, committing):
        """Resolve the ops of a transaction the connection failed in."""
        loss = self.history.lose(error, time.monotonic())
        if not committing:
            self._give_up_unexecuted(ops)
            return
        in_doubt = gocept.amqprun.interfaces.CommitInDoubt(
            'The connection was lost during the AMQP commit (%s); outcome '
            'unknown, the broker redelivers the message unless it '
            'committed' % describe(error))
        if loss.ack_timeout is not None:
            # The consumer channel was closed before our commit on it was
            # handled (else its commit-ok would have come first); a send
            # committed on the other channel meanwhile may have gone through.
            for op in ops:
                op.resolve(in_doubt if op.delivery is None
                           else loss.error_for(op.delivery))
            return
        if gocept.amqprun.connection.is_channel_error(error):
            # The broker refused something in this transaction (e.g. a
            # publish to a missing exchange) and closed the channel; every
            # op of it counts as failed.
            failure = gocept.amqprun.interfaces.CommitFailed(
                'The broker refused the AMQP transaction: %s'
                % describe(error))
        else:
            log.warning('Connection lost while committing %d op(s): the '
                        'broker may or may not have committed them; what '
                        'it did not commit comes back redelivered',
                        len(ops))
            failure = in_doubt
        for op in ops:
            op.resolve(failure)
