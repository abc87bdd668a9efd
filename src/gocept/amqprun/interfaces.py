"""The contracts of gocept.amqprun: read this module first.

Public section: what handler authors and operators use (``IHandler``,
``IExchange``, ``IMessage``, ``IResponse``, ``ISender``, ``ISettings``,
the events).
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
    After every (re)connect the I/O thread declares :attr:`queue_name`
    (durable), binds it to :attr:`exchange` with every routing key (and
    :attr:`binding_arguments`) and consumes from it. A worker thread calls
    the handler once per received message, inside a transaction.

    An implementation without :attr:`exchange` or
    :attr:`binding_arguments` (one written for 1.x) is bound to
    ``amq.topic`` without arguments.

    .. versionchanged:: 2.0
       :attr:`exchange` and :attr:`binding_arguments`.
    """

    queue_name = zope.interface.Attribute('Name of the queue to consume.')
    routing_key = zope.interface.Attribute(
        'One routing key, or a list (or tuple) of routing keys, the queue '
        'is bound with.')
    arguments = zope.interface.Attribute(
        'dict passed as ``arguments`` to ``queue.declare`` (or None). '
        'Values keep their type (ints stay ints).')
    exchange = zope.interface.Attribute(
        'Name of the exchange the queue is bound to; default ``amq.topic``. '
        'It must exist on the broker or be declared (:class:`IExchange`).')
    binding_arguments = zope.interface.Attribute(
        'dict passed as ``arguments`` to every ``queue.bind`` (or None), '
        'e.g. ``{"x-match": "all", "format": "pdf"}`` for a ``headers`` '
        'exchange.')
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


class IExchange(zope.interface.Interface):
    """An exchange the server declares before it binds the handler queues.

    Registered as a utility named like the exchange, usually by
    ``<amqp:exchange>``. The I/O thread declares every one after each
    (re)connect, before any queue is bound. Names starting with ``amq.``
    are the broker's own and are never declared (refused when the
    configuration loads). A declare the broker refuses (the exchange exists
    with another type or other arguments, no permission, an ``x-`` type no
    plugin provides) stops the process with ``DeclareRefused``.

    .. versionadded:: 2.0
    """

    name = zope.interface.Attribute('The exchange\'s name.')
    type = zope.interface.Attribute(
        '``direct``, ``topic``, ``fanout``, ``headers`` or a plugin\'s '
        '``x-`` type.')
    durable = zope.interface.Attribute(
        'True: the exchange survives a broker restart.')
    auto_delete = zope.interface.Attribute(
        'True: the broker deletes the exchange when its last binding goes.')
    arguments = zope.interface.Attribute(
        'dict passed as ``arguments`` to ``exchange.declare`` (or None), '
        'e.g. ``{"alternate-exchange": "unrouted"}``.')


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

    max_message_size = zope.interface.Attribute(
        'The largest body (bytes) :meth:`send` accepts, 0 for no limit: the '
        '``max_message_size`` of ``<amqp-server>``, which should match the '
        'broker\'s (RabbitMQ 3.x: 128 MiB by default, 4.x: 16 MiB).')

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
        ``CommitFailed`` and nothing is published. While the broker blocks
        publishing (a resource alarm) a commit the I/O thread has taken
        waits until the broker unblocks, however long; when the server
        stops meanwhile it fails with ``ConnectionLost``. Returns None.

        A body above :attr:`max_message_size` raises ``PublishRefused`` at
        once, naming the size and the limit: the broker would refuse it
        (and close the channel), so it is never put on the wire. Every
        other error surfaces in the caller's ``commit()``: a publish the
        broker refuses (a missing exchange, a property it rejects) fails
        with ``PublishRefused``, and only the transaction it belongs to.
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
#: The outcomes an operator counts as failed (the exit summary,
#: ``amqprun-status``).
FAILED_OUTCOMES = (RETRIED, DEAD_LETTERED, RETURNED)


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

    def __repr__(self):
        return '<MessageHandled %s by %r: %s>' % (
            self.message.header.message_id, self.handler_name, self.outcome)


class ISendFinished(zope.interface.Interface):
    """Event: a transaction that sent messages outside a handler ended.

    Notified on the sending thread (the application's own thread, a
    readfiles reader) by the AMQP data manager once the broker committed
    the send or it failed; not for messages a handler sends (those are
    part of :class:`IMessageHandled`). Subscribers must be quick; an
    exception in one is logged and otherwise ignored.

    .. versionadded:: 2.0
    """

    count = zope.interface.Attribute('How many messages the send held.')
    error = zope.interface.Attribute(
        'The exception that failed the send, or None when committed.')


@zope.interface.implementer(ISendFinished)
class SendFinished:
    """Notified by the data manager for each send outside a handler."""

    def __init__(self, count, error=None):
        self.count = count
        self.error = error

    def __repr__(self):
        return '<SendFinished %d message(s)%s>' % (
            self.count, ', failed' if self.error is not None else '')


class IFileWritten(zope.interface.Interface):
    """Event: ``<amqp:writefiles>`` wrote a message's files, or failed to.

    Notified on the worker thread in the data manager's vote, after the
    files were renamed into place (``error`` None) or when writing failed
    (the vote says no, the message comes back). Errors of subscribers are
    logged and ignored.

    .. versionadded:: 2.0
    """

    directory = zope.interface.Attribute(
        'The directive\'s ``directory`` (absolute).')
    path = zope.interface.Attribute(
        'Path of the body file, relative to ``directory``.')
    error = zope.interface.Attribute('The exception, or None.')


@zope.interface.implementer(IFileWritten)
class FileWritten:
    """Notified by writefiles for each message it wrote (or failed to)."""

    def __init__(self, directory, path, error=None):
        self.directory = directory
        self.path = path
        self.error = error

    def __repr__(self):
        return '<FileWritten %s in %s>' % (self.path, self.directory)


class IFileSent(zope.interface.Interface):
    """Event: ``<amqp:readfiles>`` sent a file, or failed to.

    Notified on the reader's thread once the broker committed the file's
    message and the file is in ``cur/`` (``error`` None), or when the send
    failed (the file stays in ``new/`` and is sent again). Errors of
    subscribers are logged and ignored.

    .. versionadded:: 2.0
    """

    directory = zope.interface.Attribute(
        'The directive\'s ``directory`` (the Maildir).')
    name = zope.interface.Attribute('The file\'s name in ``new/``.')
    error = zope.interface.Attribute('The exception, or None.')


@zope.interface.implementer(IFileSent)
class FileSent:
    """Notified by readfiles for each file it sent (or failed to)."""

    def __init__(self, directory, name, error=None):
        self.directory = directory
        self.name = name
        self.error = error

    def __repr__(self):
        return '<FileSent %s of %s>' % (self.name, self.directory)


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

    parameters = zope.interface.Attribute(
        'The ``connection.Parameters`` it connects with (``address`` names '
        'the broker in log lines and probes).')
    consuming = zope.interface.Attribute(
        'True while the consumers of the handlers\' queues are active; set '
        'and cleared by the I/O thread.')
    last_turn = zope.interface.Attribute(
        '``time.monotonic()`` when the I/O loop last turned, or None before '
        'it started. It turns at least every ``poll_interval`` (1 s), also '
        'while it waits to reconnect; a value that stays old means a wedged '
        'I/O thread (liveness).')
    history = zope.interface.Attribute(
        'The ``connection.ConnectionHistory``: ``generation`` counts the '
        'connections opened so far, ``losses`` (a ``collections.Counter``) '
        'the connections lost by reason (``ack-timeout``, ``heartbeat``, '
        '``timeout``, ``channel-closed``, ``broker-closed``, ``network``, '
        '``other``), ``last_loss`` is the latest ``Loss`` (``error``, '
        '``reason``) or None. Written by the I/O thread only.')
    commit_observers = zope.interface.Attribute(
        'List of callables ``observer(size, seconds)``. After each AMQP '
        'transaction it committed the I/O thread calls each with the number '
        'of ops in it and the seconds the ``tx.commit`` round trip took. '
        'They run on the I/O thread: they must be quick and must not '
        'raise. Empty by default (then it costs nothing).')

    def submit(op):
        """Hand an ``IChannelOp`` to the I/O thread.

        Called by a worker (commit, reject, dead letter) or a sending
        thread's data manager, which then blocks in ``op.wait()``. Returns
        at once. The I/O thread executes the op no earlier than
        ``op.not_before``, in the next pass of its loop, together with the
        other ops due then (group commit); while a handler that began
        within the last ``commit_delay`` (``<amqp-server>``) has not
        submitted its op yet, the pass waits for it, at most that long. An
        op whose delivery belongs to a lost connection is resolved with
        ``ConnectionLost`` without being executed.
        """

    def handling(session):
        """Context manager: while it is active, ``send()`` from the calling
        thread queues messages in ``session`` (an ``ISession``).

        Used by workers around a handler call so that ``ISender.send``
        inside a handler joins the handler's transaction. Restores the
        thread's previous session on exit.
        """

    blocked = zope.interface.Attribute(
        'None, or the reason text while the broker blocks publishing on '
        'the connection (``connection.blocked``: a memory or disk alarm).')
    node = zope.interface.Attribute(
        '``host:port`` of the broker node the server is connected to, or '
        'None while it is not connected.')
    republishing = zope.interface.Attribute(
        'How many messages a queue refused wait to be published again '
        '(see ``commits.CommitQueue``); while there are any, commits that '
        'publish to where they go are held.')
    held = zope.interface.Attribute(
        'How many commits are held: while the broker blocks publishing or '
        'refused messages wait to be published again.')

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
        """Return the ``Commit`` ``IChannelOp`` for what is queued.

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
    takes it once ``not_before`` has passed, :meth:`claim`\\ s it, checks
    that the exchange of each of its :attr:`messages` exists, calls
    :meth:`execute` with the channel of its :attr:`delivery`, commits the
    channel's AMQP transaction and :meth:`resolve`\\ s every op of it. The
    methods say which side may call them; no method blocks the I/O thread.

    Refusals stay with their op: an op whose message goes to a missing
    exchange is resolved with ``PublishRefused`` without being executed.
    When the broker refuses a transaction of several ops anyway (and closes
    the channel), the I/O thread tries each op's publishes alone on a
    scratch channel (publish, roll back) to find the one it refuses: that
    op fails with ``PublishRefused`` (or ``CommitFailed`` for a missing
    write permission), its neighbours with ``ConnectionLost`` (their
    messages come back redelivered; that is no failed attempt of theirs).
    A message whose publish was refused once is tried on the scratch
    channel before each later commit, so it never closes the consumer
    channel again.
    """

    delivery = zope.interface.Attribute(
        'The ``Delivery`` (connection generation, delivery tag and the '
        'received message\'s ``key``, which stays the same across '
        'redeliveries) of the received message the op settles, or None for '
        'a pure send (which runs on the send channel and survives a '
        'reconnect).')
    messages = zope.interface.Attribute(
        'The IMessages the op publishes (empty for a reject). Read by the '
        'I/O thread, which checks their exchanges before it executes the '
        'op.')
    not_before = zope.interface.Attribute(
        'Seconds since the epoch before which the I/O thread must not '
        'execute the op (0: at once). Read by the I/O thread only.')
    publishes = zope.interface.Attribute(
        'True when executing the op publishes messages. While the broker '
        'blocks publishing the I/O thread claims such an op and holds it '
        'until the broker unblocks (or the connection ends); ops that only '
        'ack or reject go on.')

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


class PublishRefused(CommitFailed):
    """The broker refuses to publish this message: retrying cannot help.

    A body above ``max_message_size`` (raised by ``send`` at once), an
    exchange that does not exist, a property the broker rejects (e.g. a
    ``user_id`` that is not the connection's user). Only the op of the
    message fails; the text names the message, exchange, routing key and
    the reason. A received message whose reply is refused counts a failed
    attempt (and is dead-lettered once it used them up); ``<amqp:readfiles>``
    moves such a file to ``failed/``.
    """


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
    ``NOT_FOUND`` (a missing exchange), ``ACCESS_REFUSED`` or, for an
    exchange, ``COMMAND_INVALID`` (a type no enabled plugin provides): the
    configuration does not fit the broker, and retrying cannot fix it.
    """


class QueueUnavailable(RecoverableError):
    """The broker could not reach a queue it has: a declare or consume
    timed out inside the broker.

    A quorum queue answers so while it has no leader (a node was lost and
    the cluster is electing one): the server reconnects and declares again
    after the backoff, as after a lost connection.

    .. versionadded:: 2.0
    """


class TLSError(FatalError):
    """The TLS handshake with a broker node failed.

    The node's certificate does not verify (unknown CA, wrong host name,
    expired), the node refused our client certificate, or the port does
    not speak TLS. Retrying cannot fix it: at start-up the process stops
    (exit status 1); once it was connected, the server tries the other
    nodes.

    .. versionadded:: 2.0
    """


class BrokerUnreachable(FatalError):
    """The broker could not be reached within the start-up attempts."""


class AccessRefused(FatalError):
    """The broker refused the credentials or the virtual host."""
