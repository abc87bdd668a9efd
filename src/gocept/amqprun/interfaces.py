"""The contracts of gocept.amqprun: read this module first.

Public section: what handler authors and operators use (``IHandler``,
``IMessage``, ``IResponse``, ``ISender``, ``ISettings``, the events).
Internal section: how the I/O thread and the workers talk to each other
(``IServer``, ``IChannelOp``, ``ISession``, ``ILoop``). Exceptions come
last; each says
whether it is recoverable (the message goes back to the broker, the
connection is re-established) or fatal (the process stops).
"""
import zope.interface
import zope.interface.common.mapping

# --------------------------------------------------------------------------
# public


class IHandler(zope.interface.Interface):
    """A message handler: one function bound to exactly one queue.

    Registered as a named utility (``<utility component="..." name="..."/>``).
    The I/O thread declares :attr:`queue_name` (durable), binds it to
    ``amq.topic`` with every routing key and consumes from it. A worker
    thread calls the handler once per received message, inside a
    transaction.
    """

    queue_name = zope.interface.Attribute('Name of the queue to consume.')
    routing_key = zope.interface.Attribute(
        'One routing key, or a list (or tuple) of routing keys, the queue '
        'is bound with.')
    arguments = zope.interface.Attribute(
        'dict passed as ``arguments`` to ``queue.declare`` (or None). '
        'Values keep their type (ints stay ints).')
    principal = zope.interface.Attribute(
        'Principal id the handler runs as in a zope.security interaction, '
        'or None.')
    settings = zope.interface.Attribute(
        'The ISettings utility, or None when none is registered.')
    retry_policy = zope.interface.Attribute(
        'An IRetryPolicy for this handler\'s failed messages, or None for '
        'the server\'s policy (the ``<worker>`` section).')

    def __call__(message):
        """Handle one received :class:`IMessage`.

        Called from a worker thread inside a transaction. Returns a sequence
        of :class:`IMessage` to send (published atomically with the ack of
        ``message`` when the transaction commits) or an :class:`IResponse`.
        An exception aborts the transaction: nothing is published and the
        message goes back to the broker.
        """


class IResponse(zope.interface.Interface):
    """A handler result that knows how to report a failed commit."""

    responses = zope.interface.Attribute(
        'Sequence of IMessage to send when the transaction commits.')

    def exception():
        """Return the messages to send instead when the commit failed.

        Called by the worker (with the commit error being the current
        exception) after aborting the first transaction. The returned
        messages are sent in a new transaction together with the ack of the
        received message, so the original message is not retried.
        """


class IMessage(zope.interface.Interface):
    """One AMQP message, received or to be sent."""

    header = zope.interface.Attribute(
        'The AMQP basic properties as attributes (content_type, message_id, '
        'correlation_id, timestamp, ...) plus ``headers`` (alias '
        '``application_headers``), the dict of application headers.')
    body = zope.interface.Attribute(
        'The body: bytes for received messages; bytes, str or None for '
        'messages to send.')
    delivery_tag = zope.interface.Attribute(
        'Delivery tag of a received message, else None.')
    routing_key = zope.interface.Attribute('The routing key (text).')
    exchange = zope.interface.Attribute(
        'Exchange the message is (to be) published to; '
        'default ``amq.topic``.')
    redelivered = zope.interface.Attribute(
        'True when the broker delivered this message before (received '
        'messages only).')

    def generate_filename(pattern):
        """Return ``pattern`` with ``${date}``, ``${msgid}``,
        ``${routing_key}``, ``${unique}`` and ``${xfilename}`` substituted.
        """

    def reference(message):
        """Point this message at ``message``, its parent.

        Sets ``correlation_id`` to the parent's message id (unless already
        set) and the ``references`` application header to the parent's
        references plus the parent's message id (unless already set). Does
        nothing when the parent is not an IMessage or has no message id.
        """

    def acknowledge():
        """Acknowledge a received message when the current transaction
        commits, even after an abort of the handler's first transaction.

        Raises ``RuntimeError`` for a message that was not received.
        """


class ISender(zope.interface.Interface):
    """Sends messages when the current transaction commits.

    The daemon registers its server as the ``ISender`` utility before
    ``IConfigFinished``; look it up with ``zope.component.getUtility``.
    """

    def send(message):
        """Queue ``message`` for publishing at commit of the caller's
        transaction.

        Any thread. Inside a handler the message joins the handler's
        transaction (it is published in the same AMQP transaction as the
        ack). Elsewhere it is published on a separate channel when the
        calling thread's transaction commits; an abort publishes nothing.

        The publish happens on the I/O thread once it is connected. A
        transaction committed before that (before ``IProcessStarted``, or
        while the connection is being re-established) waits in its commit
        for up to 60 seconds (``datamanager.COMMIT_TIMEOUT``); if no
        connection is usable by then the commit fails with
        ``CommitFailed`` and nothing is published. Returns None; raises
        nothing itself (errors surface in the caller's ``commit()``).
        """


class ISettings(zope.interface.common.mapping.IReadMapping):
    """The ``<settings>`` section of the configuration file.

    Keys keep their case, values are text.
    """

    def update(mapping):
        """Add the items of ``mapping``."""


class IConfigFinished(zope.interface.Interface):
    """Event: the configuration is loaded, nothing is connected yet.

    ``ISender`` is registered but sending fails until ``IProcessStarted``.
    """


@zope.interface.implementer(IConfigFinished)
class ConfigFinished:
    """Sent once the configuration (ZConfig and ZCML) is loaded."""


class IProcessStarted(zope.interface.Interface):
    """Event: the server is connected and consuming; sending works."""


@zope.interface.implementer(IProcessStarted)
class ProcessStarted:
    """Sent once the server's connection is usable."""


class IProcessStopping(zope.interface.Interface):
    """Event: shutdown has begun; consuming stops.

    Handlers may still be running: release what they use on
    :class:`IWorkersStopped` instead.
    """


@zope.interface.implementer(IProcessStopping)
class ProcessStopping:
    """Sent when the process starts to shut down."""


class IWorkersStopped(zope.interface.Interface):
    """Event: at shutdown, after the last handler has finished.

    The order at shutdown is ``IProcessStopping`` (consuming stops; handlers
    may still run), then ``IWorkersStopped`` (no handler runs any more:
    close databases here), then the connection is closed. Handlers that did
    not finish within ``shutdown-timeout`` are counted in
    :attr:`unfinished`; their threads may still run.

    .. versionadded:: 2.0
    """

    unfinished = zope.interface.Attribute(
        'Number of handlers still running after the shutdown timeout.')


@zope.interface.implementer(IWorkersStopped)
class WorkersStopped:
    """Sent once the worker threads have ended (or timed out)."""

    def __init__(self, unfinished=0):
        self.unfinished = unfinished


#: Outcomes of :class:`IMessageHandled`.
HANDLED = 'handled'
RETRIED = 'retried'
DEAD_LETTERED = 'dead-lettered'
ERROR_HANDLED = 'error-handled'
RETURNED = 'returned'
IN_DOUBT = 'in-doubt'
OUTCOMES = (HANDLED, RETRIED, DEAD_LETTERED, ERROR_HANDLED, RETURNED,
            IN_DOUBT)


class IMessageHandled(zope.interface.Interface):
    """Event: a received message's handling has ended, in every outcome.

    Notified on the worker thread once the message's transaction has ended
    (committed, or aborted and given back). Subscribers run on that worker
    thread: they must be quick and must not block. An exception in a
    subscriber is logged and otherwise ignored; it never turns a committed
    message into a failure.

    .. versionadded:: 2.0
    """

    message = zope.interface.Attribute('The received IMessage.')
    handler_name = zope.interface.Attribute(
        'The name the handler utility is registered under.')
    outcome = zope.interface.Attribute(
        'One of ``handled`` (committed), ``retried`` (failed, given back '
        'to the broker for another attempt), ``dead-lettered`` (failed for '
        'the last time, sent to the dead-letter destination), '
        '``error-handled`` (the handler reported its error as a message and '
        'the received message was acknowledged: IResponse, '
        'ErrorHandlingHandler), ``returned`` (not the handler\'s fault: '
        'the connection was lost, the broker redelivers it) or '
        '``in-doubt`` (the connection was lost during the AMQP commit: '
        'the other resources committed; the broker redelivers the message, '
        'flagged redelivered, unless it committed too; see CommitInDoubt).')
    duration = zope.interface.Attribute(
        'Seconds from the start of the handling to its end (float).')
    error = zope.interface.Attribute(
        'The exception that failed the handling, or None.')


@zope.interface.implementer(IMessageHandled)
class MessageHandled:
    """Notified by the worker for each message it is done with."""

    def __init__(self, message, handler_name, outcome, duration=0.0,
                 error=None):
        self.message = message
        self.handler_name = handler_name
        self.outcome = outcome
        self.duration = duration
        self.error = error


class IMessageStored(zope.interface.Interface):
    """Event: ``<amqp:writefiles>`` stores a message.

    Sent before the files are written (they are written when the
    transaction commits); a subscriber that raises aborts the transaction.
    """

    message = zope.interface.Attribute('The IMessage being stored.')
    path = zope.interface.Attribute(
        'Path of the body file, relative to the directive\'s directory.')


@zope.interface.implementer(IMessageStored)
class MessageStored:
    """Sent by writefiles for each message it stores."""

    def __init__(self, message, path):
        self.message = message
        self.path = path


class IRetryPolicy(zope.interface.Interface):
    """What happens to a received message whose handling failed.

    Public: handler authors pass one as ``declare(..., retry_policy=...)``
    (see :class:`gocept.amqprun.retry.RetryPolicy`). Used by worker threads
    after a failed attempt; a policy is a value and must be thread-safe.
    """

    delay = zope.interface.Attribute(
        'Seconds a failed message waits before it goes back to the broker '
        '(it keeps its prefetch slot meanwhile).')
    max_attempts = zope.interface.Attribute(
        'Failed attempts after which the message is dead-lettered; 0 means '
        'never give up.')
    dead_letter_routing_key = zope.interface.Attribute(
        'Routing key of the dead-letter destination, or None: without one '
        'a message is retried forever, never lost.')
    dead_letter_exchange = zope.interface.Attribute(
        'Exchange of the dead-letter destination.')

    def gives_up(attempts):
        """True when a message that failed ``attempts`` times is to be
        dead-lettered rather than retried."""

    def dead_letter(message, error, attempts):
        """Return the IMessage to publish instead of retrying ``message``.

        ``error`` is the text of the last error; the copy carries it and
        ``attempts`` in its headers.
        """


# --------------------------------------------------------------------------
# internal


class ILoop(zope.interface.Interface):
    """A loop that owns the thread that calls :meth:`start`.

    :meth:`start` runs in the loop's own thread; every other member may be
    called from any thread.
    """

    running = zope.interface.Attribute(
        'True while the loop serves (for the server: while connected).')

    def start():
        """Run the loop in the calling thread until :meth:`stop`."""

    def stop():
        """Make the loop end; any thread; returns at once."""

    def wait_until_running(timeout=None):
        """Block until the loop runs (or ``timeout``); return ``running``."""


class IServer(ILoop, ISender):
    """The I/O thread's face towards workers, data managers and senders.

    ``Server`` implements it; ``tests/unit/fakes.FakeServer`` imitates it.
    Only the I/O thread (``start``) touches the AMQP connection; every
    member below is safe to call from any other thread and returns without
    waiting for the broker.
    """

    tasks = zope.interface.Attribute(
        'The queue.Queue of ``Task`` objects (received message, handler, '
        'handler name) the I/O thread fills and workers take from. Its size '
        'is bounded by the prefetch count. The worker pool also puts its '
        'stop sentinels on it.')

    def submit(op):
        """Hand an :class:`IChannelOp` to the I/O thread.

        Called by a worker (commit, reject, dead letter) or a sending
        thread's data manager, which then blocks in ``op.wait()``. Returns
        at once. The I/O thread executes the op no earlier than
        ``op.not_before``, in the next pass of its loop, together with the
        other ops due then (group commit). An op whose delivery belongs to
        a lost connection is resolved with ``ConnectionLost`` without being
        executed.
        """

    def handling(session):
        """Context manager: while it is active, ``send()`` from the calling
        thread queues messages in ``session`` (an :class:`ISession`).

        Used by workers around a handler call so that ``ISender.send``
        inside a handler joins the handler's transaction. Restores the
        thread's previous session on exit.
        """

    def stop_consuming():
        """Cancel the consumers at the next loop pass; any thread.

        Deliveries already queued stay in :attr:`tasks`; commits of running
        handlers still go through. Used at shutdown before the workers are
        stopped.
        """


class ISession(zope.interface.Interface):
    """What one transaction will do on the broker.

    Lives on one worker thread (or any thread that sends) and is never
    shared. Collects the messages to publish and, for a handled message,
    the delivery to ack; the data manager turns it into one ``Commit`` op.
    """

    server = zope.interface.Attribute('The IServer that carries it out.')
    received_message = zope.interface.Attribute(
        'The IMessage being handled, or None for a pure send session.')
    messages = zope.interface.Attribute('The IMessages to publish.')
    settled = zope.interface.Attribute(
        'True once the broker committed the ack of the received message.')
    error_handled = zope.interface.Attribute(
        'True when the handler reported its error as a message instead of '
        'failing (IResponse, ErrorHandlingHandler).')
    in_doubt = zope.interface.Attribute(
        'True when the AMQP commit of the received message ended with an '
        'unknown outcome (CommitInDoubt) and the transaction committed '
        'anyway; the message is then not given back by the worker.')

    def send(message):
        """Queue ``message`` and join the current transaction."""

    def acknowledge(message):
        """Ack ``message`` with the commit of the current transaction
        (also after an abort of the handler's first transaction)."""

    def join_transaction():
        """Join the current transaction (at most once until reset)."""

    def commit_op():
        """Return the ``Commit`` :class:`IChannelOp` for what is queued.

        Called by the data manager in ``commit``; sets correlation id and
        references of the queued messages to the received message.
        """

    def committed():
        """Record that the broker committed the op (sets ``settled``)."""

    def reset():
        """Forget the queued messages (after commit or abort)."""


class IChannelOp(zope.interface.Interface):
    """Work on the broker: made on a worker, carried out by the I/O thread.

    The life of an op: a worker (or data manager) builds it and calls
    ``IServer.submit(op)``, then blocks in :meth:`wait`. The I/O thread
    takes it once ``not_before`` has passed, :meth:`claim`\\ s it, calls
    :meth:`execute` with the channel of its :attr:`delivery`, commits the
    channel's AMQP transaction and :meth:`resolve`\\ s every op of it. The
    methods say which side may call them; no method blocks the I/O thread.
    """

    delivery = zope.interface.Attribute(
        'The ``Delivery`` (connection generation and delivery tag) of the '
        'received message the op settles, or None for a pure send (which '
        'runs on the send channel and survives a reconnect).')
    not_before = zope.interface.Attribute(
        'Seconds since the epoch before which the I/O thread must not '
        'execute the op (0: at once). Read by the I/O thread only.')

    def claim():
        """Take the op for execution; I/O thread only.

        Returns False when the waiter gave up (its :meth:`wait` timed out):
        such an op must never be executed. Returns True otherwise; from
        then on the waiter waits for :meth:`resolve`.
        """

    def unclaim():
        """Make a claimed but not executed op pending again; I/O thread.

        For sends that could not be carried out on a lost connection and
        wait for the next one.
        """

    def execute(channel):
        """Do the op's work on ``channel``; I/O thread only.

        ``channel`` is an ``OpChannel`` in transaction mode; the I/O thread
        commits after executing every op of the pass. Raises
        ``CommitFailed`` when this op alone cannot be carried out (the
        channel stays usable); connection errors propagate.
        """

    def resolve(error=None):
        """Record the outcome (None: committed) and wake the waiter; I/O
        thread only. Called exactly once per claimed op."""

    def wait(timeout):
        """Block until resolved; re-raise the op's error. Workers only.

        Raises ``CommitFailed`` when the op was not claimed within
        ``timeout`` seconds (then it is never executed); once claimed it
        waits for the outcome, however long.
        """


# --------------------------------------------------------------------------
# exceptions


class AMQPRunError(Exception):
    """Base class of this package's errors."""


class RecoverableError(AMQPRunError):
    """The message goes back to the broker; the process goes on."""


class FatalError(AMQPRunError):
    """The process cannot go on and stops with a non-zero exit status."""


class ConnectionLost(RecoverableError):
    """The connection (or channel) of a delivery is gone.

    Its delivery tag is meaningless now; the broker redelivers the message.
    """


class AckTimedOut(ConnectionLost):
    """The broker's ``consumer_timeout`` expired before the delivery was
    acknowledged.

    The broker closed the channel and redelivers the message (flagged
    ``redelivered``); the server reconnects. Unlike other connection losses
    this counts as a failed attempt of the message: its handler ran longer
    than the broker allows.
    """


class CommitFailed(RecoverableError):
    """The broker did not commit the AMQP transaction."""


class CommitInDoubt(ConnectionLost, CommitFailed):
    """The connection was lost while the AMQP transaction was committed.

    Whether the broker committed it is unknown. For the commit of a
    received message the data manager does not fail its vote: the
    resources that voted before it (databases, files) commit, a WARNING
    names the message, and the worker neither rejects it nor counts an
    attempt (outcome ``in-doubt``). If the broker did commit, the message
    stays acknowledged and its messages are published; otherwise the
    broker redelivers it flagged ``redelivered`` and the handler runs
    again on top of its own committed writes (see the idempotency recipe
    in the Databases chapter). At least once, never a lost write.

    For a pure send (``ISender`` outside a handler) nothing would come
    back, so the vote fails with this error and the caller's transaction
    aborts: send again to be sure, at the price of a possible duplicate.
    Either way ``gocept.amqprun.datamanager.commit_in_doubt(txn)`` is True
    afterwards, in ``tpc_finish`` or ``tpc_abort`` of the other resources.
    """


class ConfigurationError(FatalError):
    """The configuration cannot work (e.g. two handlers on one queue)."""


class DeclareRefused(ConfigurationError):
    """The broker refused to declare or bind a queue or exchange.

    ``PRECONDITION_FAILED`` (it exists with other arguments or type),
    ``NOT_FOUND`` (a missing exchange) or ``ACCESS_REFUSED``: the
    configuration does not fit the broker, and retrying cannot fix it.
    """


class BrokerUnreachable(FatalError):
    """The broker could not be reached within the start-up attempts."""


class AccessRefused(FatalError):
    """The broker refused the credentials or the virtual host."""
