"""The op queue and the group commit: one AMQP transaction per channel per
pass of the I/O loop.

Runs on: the I/O thread, except :meth:`CommitQueue.submit` (any thread).
Workers submit ops (commit, reject); each pass of the server's loop calls
:meth:`CommitQueue.commit_due`, which executes every op that is due and
commits each channel's share with one ``tx.commit``. Each op's ack and
publishes stay atomic: they are in one AMQP transaction and succeed or
fail together. What a failed batch means:

* an op with a message to a missing exchange fails alone before anything
  is executed (the exchanges are checked on the scratch channel, once per
  connection); so does an op of a *suspect*, a message whose publish the
  broker refused before, when the scratch channel's dry run (publish,
  roll back) is refused again;
* an op that cannot be put on the wire (``CommitFailed`` from its
  ``execute``) fails alone: the transaction is rolled back and the others
  are executed again;
* the broker refused the transaction (it closed the channel, e.g. for a
  property it rejects): every delivery of the channel is dead, the broker
  requeues them. The ops' publishes are tried one by one on the scratch
  channel; the op whose publish is refused fails with ``PublishRefused``
  and becomes a suspect, the others fail with ``ConnectionLost`` (not a
  failed attempt: their messages come back redelivered), sends wait for
  the next connection;
* a connection error before ``tx.commit`` was sent: nothing was
  committed; sends wait for the next connection, ops on deliveries fail
  with ``ConnectionLost`` (the broker redelivers);
* a connection error after ``tx.commit`` was sent: the outcome is unknown
  (``CommitInDoubt``), unless the broker closed the channel, which means
  it refused the transaction (``CommitFailed``);
* the broker closed the channel with "partial tx completion": it applied
  the acks but a queue refused a publish. The ops' messages are published
  again (``Republish``), each op is resolved once they are committed.

The group commit gathers (``commit_delay``): while a handler that began
within the last ``commit_delay`` seconds has not submitted its op yet, a
pass leaves the pending ops waiting, for at most that long, so that the
op joins their transaction. Fewer, bigger AMQP transactions cost the
broker and the client less per message; a slow handler never holds the
others up for longer than the delay.

While the broker blocks publishing (``blocked``), an op that publishes is
claimed (its waiter then waits however long) and held, not written: the
broker would stop reading the socket after the first publish and the I/O
thread would hang in ``tx.commit``. Held ops go first once the block ends;
at a loss or stop they are resolved like pending ones.

While refused messages wait to be published again (a ``Republish`` is
pending), ops that publish to the same destination (exchange and routing
key) are held the same way: a queue that refused one result refuses the
next ones too, and each refused transaction would have its acks applied,
its results only in this process's memory. Held, their messages stay
unacknowledged on the broker (redelivered should the process die); the
``Republish`` goes ahead, on the scratch channel (a refusal costs that
channel, not the connection), and so do ops that publish elsewhere.
"""
import collections
import heapq
import itertools
import logging
import time

import amqp.exceptions

import gocept.amqprun.channelops
import gocept.amqprun.connection
import gocept.amqprun.interfaces
from gocept.amqprun.connection import describe


log = logging.getLogger(__name__)


def destination(message):
    """Where ``message`` is published: (exchange, routing key)."""
    return message.exchange, message.routing_key


class Gathering:
    """Which handlers a group commit waits for (I/O thread only).

    Those that began, or are about to begin, within the last ``delay``
    seconds and have not submitted their op yet: a handler that began that
    recently will likely finish soon. Its delivery arrived within the
    delay and is among the ``workers`` oldest deliveries without an op
    (newer ones wait for a worker that only a commit can free). Nothing
    older is waited for.
    """

    def __init__(self, delay, workers=None):
        self.delay = delay
        #: How many workers take deliveries (None: as many as arrive).
        self.workers = workers
        #: Deliveries of the current connection without an op yet, oldest
        #: first, with the ``time.monotonic()`` they arrived.
        self._unanswered = collections.OrderedDict()
        self._generation = None
        #: When pending ops began to wait, or None.
        self._since = None

    def delivered(self, delivery):
        """Note a delivery handed to the workers."""
        if not self.delay:
            return
        if delivery.generation != self._generation:
            # The deliveries of a lost connection get no op any more.
            self._unanswered.clear()
            self._generation = delivery.generation
        self._unanswered[delivery] = delivery.received

    def answered(self, op):
        """Note that ``op`` came: its delivery's handler is done."""
        if op.delivery is not None:
            self._unanswered.pop(op.delivery, None)

    def should_wait(self, pending, now):
        """True while the ``pending`` ops (a deque that workers append to)
        should wait for recent handlers.

        ``now`` is ``time.monotonic()``. Pending ops wait at most
        ``delay`` seconds from the first pass that let them wait.
        """
        if not (self.delay and pending):
            self._since = None
            return False
        # A copy: workers append meanwhile (list() copies in one step).
        for op in list(pending):
            self.answered(op)
        if self._since is None:
            self._since = now
        if now - self._since < self.delay and self._recent_handler(now):
            return True
        self._since = None
        return False

    def time_left(self, now):
        """Seconds the pending ops may still wait, or None when they do
        not wait."""
        if self._since is None:
            return None
        return max(0, self._since + self.delay - now)

    def _recent_handler(self, now):
        arrived_after = now - self.delay
        handled = itertools.islice(self._unanswered.values(), self.workers)
        return any(received > arrived_after for received in handled)


class CommitQueue:
    """Ops waiting for the I/O thread, and the group commit of a pass."""

    #: How many suspects (see :meth:`_isolate`) are remembered.
    suspects_kept = 1000

    def __init__(self, history, commit_delay=0, workers=None):
        #: The server's ConnectionHistory: which deliveries are stale.
        self.history = history
        #: Which handlers a pass waits for (see :class:`Gathering`).
        self.gathering = Gathering(commit_delay, workers)
        self._ops = collections.deque()
        self._delayed = []
        #: Claimed ops that publish, held (see :meth:`_must_hold`).
        self._held = []
        self._sequence = itertools.count()
        #: Callables ``observer(size, seconds)`` told about each AMQP
        #: transaction committed (see ``IServer.commit_observers``).
        self.observers = []
        #: How many refused messages wait to be published again (ops that
        #: publish where they go are held meanwhile); as of the last pass.
        self.republishing = 0
        #: Keys of received messages whose publish the broker refused.
        self._suspects = collections.OrderedDict()
        #: AMQP transactions committed, and the ops they carried (the mean
        #: batch size of the group commit is their ratio).
        self.transactions = 0
        self.committed_ops = 0

    def submit(self, op):
        """Queue an ``IChannelOp``; any thread."""
        self._ops.append(op)

    @property
    def held(self):
        """How many ops are held: the broker blocks publishing, or they
        publish where refused messages wait to be published again."""
        return len(self._held)

    def delivered(self, delivery):
        """Note a delivery handed to the workers; I/O thread (see
        :class:`Gathering`)."""
        self.gathering.delivered(delivery)

    def poll_timeout(self, timeout, now=None):
        """How long the loop may wait for the socket: with ops pending 0,
        or what is left of their gathering; else until the next delayed op
        is due; at most ``timeout``."""
        if self._ops:
            left = self.gathering.time_left(time.monotonic())
            return 0 if left is None else min(timeout, left)
        if self._delayed:
            now = time.time() if now is None else now
            timeout = min(timeout, max(0, self._delayed[0][0] - now))
        return timeout

    def commit_due(self, channel, send_channel, scratch, now=None,
                   blocked=False, gather=True):
        """Execute every due op; commit each channel's share once.

        Ops on deliveries go to ``channel`` (the consumer channel), sends
        to ``send_channel``; ``scratch`` (a ``ScratchChannel``) answers
        whether an op's publishes would be refused. With ``blocked`` ops
        that publish are held instead. With ``gather`` the pass does
        nothing while recent handlers are still running (see
        :class:`Gathering`). Connection errors propagate after every taken
        op was resolved or put back.
        """
        if gather and self.gathering.should_wait(
                self._ops, time.monotonic()):
            return
        now = time.time() if now is None else now
        batches = {}
        taken = []
        for op in self._claim_due(now, blocked):
            target = self._channel_for(op, channel, send_channel, scratch)
            if target is None:
                op.resolve(self.history.stale_error(op.delivery))
                continue
            taken.append((target, op))
        for number, (target, op) in enumerate(taken):
            try:
                refused = self._refusal(op, scratch)
            except gocept.amqprun.connection.CONNECTION_ERRORS:
                self._give_up_unexecuted(op for _, op in taken[number:])
                for _, ops in batches.values():
                    self._give_up_unexecuted(ops)
                raise
            if refused is not None:
                op.resolve(refused)
                continue
            batches.setdefault(id(target), (target, []))[1].append(op)
        batches = list(batches.values())
        for number, (target, ops) in enumerate(batches):
            try:
                if target is scratch:
                    self._commit_republishes(ops, scratch, now)
                else:
                    self._commit_batch(target, ops, scratch, now)
            except gocept.amqprun.connection.CONNECTION_ERRORS:
                # The other channels' batches were taken already: resolve
                # them here or their waiters hang.
                for _, others in batches[number + 1:]:
                    self._give_up_unexecuted(others)
                raise

    def _refusal(self, op, scratch):
        """The error the broker would refuse ``op`` with, or None.

        Checks the exchange of each message (cheap: remembered per
        connection); a suspect's publishes are also tried on the scratch
        channel, so that a refusal costs the scratch channel only.
        """
        now = time.monotonic()
        suspect = self._is_suspect(op)
        try:
            for message in op.messages:
                scratch.check_exchange(message, now)
                if suspect:
                    scratch.try_publish(message)
        except gocept.amqprun.interfaces.CommitFailed as e:
            log.debug('%r is refused before execution: %s', op, e)
            return e
        return None

    def _is_suspect(self, op):
        return op.delivery is not None and op.delivery.key in self._suspects

    def _suspect(self, op):
        """Remember that the broker refused a publish of ``op``'s message.
        """
        if op.delivery is None:
            return  # a send's sender learns it from its commit
        self._suspects[op.delivery.key] = True
        self._suspects.move_to_end(op.delivery.key)
        while len(self._suspects) > self.suspects_kept:
            self._suspects.popitem(last=False)

    def republish_now(self):
        """Make every waiting ``Republish`` due at once: before a stop the
        last pass is their last chance (their messages exist nowhere
        else)."""
        for op in self._waiting_republishes():
            op.not_before = 0
        self._delayed = [(op.not_before, sequence, op)
                         for _, sequence, op in self._delayed]
        heapq.heapify(self._delayed)

    def fail_pending(self, error=None, stale_only=False):
        """Resolve pending and held ops with ``error`` (or their loss's
        error); return how many were resolved, not counting republishes
        (each logs what its failure means).

        With ``stale_only`` sends not yet carried out stay queued for the
        next connection: nothing of them reached the broker.
        """
        pending = list(self._ops)
        self._ops.clear()
        pending.extend(item[2] for item in self._delayed)
        self._delayed = []
        held, self._held = self._held, []
        resolved = 0
        for op in held + pending:
            if stale_only and op.delivery is None:
                op.unclaim()  # a held send is pending again
                self._ops.append(op)
            elif op in held or op.claim():
                op.resolve(error or self.history.stale_error(op.delivery))
                if not isinstance(op, gocept.amqprun.channelops.Republish):
                    resolved += 1
        return resolved

    def _claim_due(self, now, blocked):
        """The ops to execute now, claimed; hold publishing ones while
        ``blocked``, and those that publish where refused messages wait
        to be published again (see :meth:`_must_hold`)."""
        republishes = self._waiting_republishes()
        refused = {destination(message)
                   for op in republishes for message in op.messages}
        self._tell_republishing(sum(len(op.messages) for op in republishes))
        held, self._held = self._held, []
        for op in itertools.chain(held, self._claim_taken(now)):
            if self._must_hold(op, blocked, refused):
                self._held.append(op)
            else:
                yield op

    @staticmethod
    def _must_hold(op, blocked, refused):
        """While the broker blocks, every op that publishes waits. While
        messages wait to be published again, so does every op that
        publishes to one of their ``refused`` destinations (exchange,
        routing key): its queue would refuse it too, after its ack."""
        if not op.publishes:
            return False
        if blocked:
            return True
        if not refused or isinstance(
                op, gocept.amqprun.channelops.Republish):
            return False
        return any(destination(message) in refused
                   for message in op.messages)

    def _tell_republishing(self, count):
        """Log when messages begin and end to wait to be published again.
        """
        if count and not self.republishing:
            log.info('Commits that publish where the broker refused %d '
                     'message(s) wait until it takes them', count)
        elif self.republishing and not count:
            log.info('The refused messages are published; %d held '
                     'commit(s) go ahead', len(self._held))
        self.republishing = count

    def _claim_taken(self, now):
        for op in self._take_due(now):
            if op.claim():
                yield op
            # else its waiter gave up; it must not happen now

    def _waiting_republishes(self):
        """The ``Republish`` ops that wait (queued, delayed or held)."""
        republish = gocept.amqprun.channelops.Republish
        waiting = itertools.chain(
            list(self._ops), (item[2] for item in self._delayed), self._held)
        return [op for op in waiting if isinstance(op, republish)]

    def _take_due(self, now):
        while self._ops:
            op = self._ops.popleft()
            # Also those submitted after the pass looked at the pending ops.
            self.gathering.answered(op)
            if op.not_before > now:
                heapq.heappush(
                    self._delayed, (op.not_before, next(self._sequence), op))
            else:
                yield op
        while self._delayed and self._delayed[0][0] <= now:
            yield heapq.heappop(self._delayed)[2]

    def _channel_for(self, op, channel, send_channel, scratch):
        if isinstance(op, gocept.amqprun.channelops.Republish):
            return scratch  # see _commit_republishes
        if op.delivery is None:
            return send_channel
        if not self.history.is_current(op.delivery):
            return None
        return channel

    def _commit_batch(self, channel, ops, scratch, now):
        """Execute ``ops`` and commit them in one AMQP transaction (``now``:
        the pass's ``time.time()``, from which republishes are delayed)."""
        op_channel = gocept.amqprun.connection.OpChannel(channel)
        ops = list(ops)
        seconds = None  # of the tx.commit, once one went through
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
                if failed is None:
                    started = time.perf_counter()
                    op_channel.send_commit()  # an error: nothing committed
                    committing = True
                    op_channel.wait_for_commit()
                    seconds = time.perf_counter() - started
                else:
                    op_channel.flush()  # an error here: nothing committed
                    channel.tx_rollback()
            except gocept.amqprun.connection.CONNECTION_ERRORS as e:
                if committing and gocept.amqprun.connection.is_partial_commit(
                        e):
                    self._publish_again(ops, e, now)
                elif committing and self._was_refused(e, channel):
                    self._isolate(ops, e, scratch)
                else:
                    self._fail_batch(ops, e, committing, now)
                raise
            if failed is None:
                break
            log.debug('%r failed, the others are tried again: %s',
                      failed, error)
            failed.resolve(error)
            ops.remove(failed)
        if seconds is not None:
            self.transactions += 1
            self.committed_ops += len(ops)
        for op in ops:
            if op.messages and self._is_suspect(op):
                # Its publishes went through (a reject proves nothing).
                del self._suspects[op.delivery.key]
            op.resolve()
        log.debug('Committed %d op(s) in one AMQP transaction', len(ops))
        if seconds is not None:
            for observer in self.observers:
                observer(len(ops), seconds)

    def _commit_republishes(self, ops, scratch, now):
        """Commit ``Republish`` ops on the scratch channel.

        The queue that refused their messages may refuse them again; the
        broker then closes that channel only, and the connection, its
        consumers and the commits held meanwhile live on. Connection errors
        propagate.
        """
        try:
            channel = scratch.channel()
        except gocept.amqprun.connection.CONNECTION_ERRORS:
            self._give_up_unexecuted(ops)
            raise
        try:
            self._commit_batch(channel, ops, scratch, now)
        except amqp.exceptions.ChannelError as e:
            if not gocept.amqprun.connection.is_close_of(e, channel):
                raise

    def _was_refused(self, error, channel):
        """True when the broker closed ``channel`` because of something in
        the transaction (not a consumer_timeout, which closes it too; not
        the close of another channel, which leaves the outcome unknown)."""
        return (gocept.amqprun.connection.is_close_of(error, channel)
                and gocept.amqprun.connection.Loss.of(
                    error, 0).ack_timeout is None)

    def _isolate(self, ops, error, scratch):
        """The broker refused the transaction of ``ops`` and closed their
        channel: find the op(s) it refused; resolve every op.

        Nothing of the transaction was committed. The refused ops fail with
        the broker's reason and become suspects; the others fail with
        ``ConnectionLost`` (their deliveries died with the channel, the
        broker redelivers them) or, for sends, wait for the next
        connection. Without a culprit (the refusal was not about a publish)
        every op fails with ``CommitFailed``.
        """
        try:
            culprits = self._find_culprits(ops, scratch)
        except gocept.amqprun.connection.CONNECTION_ERRORS:
            self._give_up_unexecuted(ops)
            raise
        if not culprits:
            log.warning('The broker refused an AMQP transaction of %d '
                        'op(s) (%s), not for one of its publishes; all of '
                        'them fail', len(ops), describe(error))
            failure = gocept.amqprun.interfaces.CommitFailed(
                'The broker refused the AMQP transaction: %s'
                % describe(error))
            for op in ops:
                op.resolve(failure)
            return
        log.warning('The broker refused an AMQP transaction of %d op(s) '
                    'because of %d of them and closed the channel: %s; '
                    'the others are not counted as failed', len(ops),
                    len(culprits), '; '.join(
                        str(culprit) for culprit in culprits.values()))
        innocent = gocept.amqprun.interfaces.ConnectionLost(
            'The broker closed the channel because of another message in '
            'the same AMQP transaction (%s); the broker redelivers this one'
            % describe(error))
        for op in ops:
            if op in culprits:
                self._suspect(op)
                op.resolve(culprits[op])
            elif op.delivery is None:
                op.unclaim()
                self._ops.append(op)
            else:
                op.resolve(innocent)

    def _publish_again(self, ops, error, now):
        """The broker applied the acks and rejects of the transaction of
        ``ops`` but not all of its publishes (it does not say which).

        Publishing their messages again (as sends, on this or the next
        connection, after a growing delay) may duplicate some but loses
        none; each op is resolved once its messages are committed. Ops
        without messages are done.
        """
        republish = gocept.amqprun.channelops.Republish
        if all(isinstance(op, republish) for op in ops):
            for op in ops:
                self._republish(op, now)
            log.warning('The broker refused %d message(s) published again '
                        '(%s); next attempt in %.1f s',
                        sum(len(op.messages) for op in ops),
                        describe(error), ops[0].not_before - now)
            return
        again = [op for op in ops if op.messages]
        log.warning('The broker applied the acknowledgements of an AMQP '
                    'transaction of %d op(s) but refused one of its '
                    'publishes (%s): publishing the messages of %d op(s) '
                    'again; some may arrive twice', len(ops),
                    describe(error), len(again))
        for op in ops:
            if not op.messages:
                op.resolve()
                continue
            self._republish(op if isinstance(op, republish)
                            else republish(op), now)

    def _republish(self, republish, now):
        """Queue a ``Republish`` for its next attempt."""
        republish.schedule(now)
        self.submit(republish)

    @staticmethod
    def _find_culprits(ops, scratch):
        """{op: refusal} of the ops whose publishes the broker refuses."""
        culprits = {}
        for op in ops:
            for message in op.messages:
                try:
                    scratch.try_publish(message)
                except gocept.amqprun.interfaces.CommitFailed as e:
                    culprits[op] = e
                    break
        return culprits

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

    def _fail_batch(self, ops, error, committing, now):
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
        log.warning('Connection lost while committing %d op(s): the '
                    'broker may or may not have committed them; what it '
                    'did not commit comes back redelivered', len(ops))
        for op in ops:
            if isinstance(op, gocept.amqprun.channelops.Republish):
                # Its message's ack stands: a second copy beats a loss.
                self._republish(op, now)
            else:
                op.resolve(in_doubt)
