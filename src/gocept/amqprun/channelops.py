"""Commit, Reject (made on a worker) and Republish (made by the commit
queue after a partial commit), carried out by the I/O thread.

Runs on: both. A worker builds an op and blocks in ``wait()``; the server
calls ``execute(channel)`` on the I/O thread and then ``resolve()``. The
server commits the AMQP transaction of all ops it executed on one channel in
one ``tx.commit`` (group commit): each op's ack and publishes are still
atomic, since they all succeed or fail together; where RabbitMQ applies a
transaction only in part, ``Republish`` restores at least once.
"""
import logging
import threading

import zope.interface

import gocept.amqprun.interfaces


log = logging.getLogger(__name__)


@zope.interface.implementer(gocept.amqprun.interfaces.IChannelOp)
class ChannelOp:
    """Base class: a piece of channel work with a result a thread waits for.

    ``delivery`` is the received message's delivery (or None): the server
    uses it to pick the channel the message arrived on, and refuses the op
    with ``ConnectionLost`` when that channel is gone.
    """

    #: Seconds since the epoch before which the server must not execute it.
    not_before = 0
    #: The messages it publishes.
    messages = ()

    #: True when executing it publishes (held while the broker blocks).
    publishes = False

    def __init__(self, delivery=None):
        self.delivery = delivery
        self._done = threading.Event()
        self._error = None
        self._lock = threading.Lock()
        self._state = 'pending'

    def claim(self):
        """Take the op for execution; False when its waiter gave up.

        I/O thread. Guarantees that an op whose ``wait()`` timed out is
        never carried out later behind the waiter's back.
        """
        with self._lock:
            if self._state != 'pending':
                return False
            self._state = 'claimed'
            return True

    def unclaim(self):
        """Make a claimed but not executed op pending again. I/O thread.
        """
        with self._lock:
            if self._state == 'claimed':
                self._state = 'pending'

    def _abandon(self):
        with self._lock:
            if self._state != 'pending':
                return False  # being executed: its outcome is coming
            self._state = 'abandoned'
            return True

    def execute(self, channel):
        """Do the work on ``channel`` (the I/O thread's, never shared)."""
        raise NotImplementedError()

    def resolve(self, error=None):
        """Record the outcome and wake the waiting thread. I/O thread."""
        self._error = error
        self._done.set()

    def wait(self, timeout):
        """Block until resolved; raise the op's error. Worker threads."""
        if not self._done.wait(timeout) and self._abandon():
            raise gocept.amqprun.interfaces.CommitFailed(
                'The I/O thread did not carry out %r within %s seconds' % (
                    self, timeout))
        self._done.wait()
        if self._error is not None:
            raise self._error


class Commit(ChannelOp):
    """Ack the received message (if any) and publish the messages."""

    def __init__(self, delivery, messages):
        super().__init__(delivery)
        self.messages = list(messages)

    @property
    def publishes(self):
        """True when there is a message to publish."""
        return bool(self.messages)

    def __repr__(self):
        return '<Commit ack=%s publish=%d>' % (
            self.delivery.tag if self.delivery else None, len(self.messages))

    def execute(self, channel):
        """Ack and publish; the server's ``tx.commit`` makes it durable."""
        if self.delivery is not None:
            channel.basic_ack(self.delivery.tag)
        for message in self.messages:
            channel.publish(message)


class Republish(Commit):
    """Publish ``op``'s messages again, as a send: the broker applied the
    ack of ``op``'s transaction but maybe not its publishes (see
    ``connection.is_partial_commit``).

    Resolving it resolves ``op``: its waiter learns the outcome once the
    messages are committed. Each :meth:`schedule` waits longer (a queue
    that refuses publishes takes time to drain); a commit of it that is in
    doubt is scheduled again too. Should it fail for good (the server stops
    first, the broker refuses the publish itself), ``op`` is in doubt: its
    ack stands, its messages may be lost, which is logged as an ERROR.
    """

    #: Seconds before the first attempt; doubled for each further one.
    delay = 0.5
    #: The longest wait between two attempts.
    max_delay = 30.0

    def __init__(self, op):
        super().__init__(None, op.messages)
        self.original = op
        self.attempts = 0

    def __repr__(self):
        return '<Republish of %r, attempt %d>' % (
            self.original, self.attempts)

    def schedule(self, now):
        """Make it pending again, due after the next attempt's delay."""
        self.unclaim()
        self.attempts += 1
        self.not_before = now + min(
            self.delay * 2 ** (self.attempts - 1), self.max_delay)

    def resolve(self, error=None):
        """Resolve it and the original op."""
        super().resolve(error)
        if error is None:
            self.original.resolve()
            return
        log.error('Could not publish again the %d message(s) of %r, whose '
                  'acknowledgement the broker applied: they may be lost '
                  '(%s)', len(self.messages), self.original, error)
        self.original.resolve(gocept.amqprun.interfaces.CommitInDoubt(
            'The broker applied the acknowledgement, but its messages could '
            'not be published again: %s' % error))


class Reject(ChannelOp):
    """Give a received message back to the broker (requeue it).

    ``delay`` seconds pass first, so a failing message cannot spin in a hot
    loop; meanwhile it keeps its prefetch slot, which throttles delivery.
    """

    def __init__(self, delivery, delay=0, now=0):
        super().__init__(delivery)
        self.not_before = now + delay if delay else 0

    def __repr__(self):
        return '<Reject tag=%s>' % self.delivery.tag

    def execute(self, channel):
        """Reject with requeue; rejects are transactional in RabbitMQ."""
        channel.basic_reject(self.delivery.tag, requeue=True)
