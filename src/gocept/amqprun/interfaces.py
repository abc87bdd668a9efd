"""The contracts of gocept.amqprun: read this module first.

Public section: what handler authors and operators use (``IHandler``,
``IMessage``, ``IResponse``, ``ISender``, ``ISettings``, the events).
Internal section: how the I/O thread and the workers talk to each other
(``ILoop``, ``ISession``, ``IChannelOp``). Exceptions come last; each says
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
    The server declares :attr:`queue_name` (durable), binds it to
    :attr:`exchange` with every routing key and consumes from it. A worker
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
        'A gocept.amqprun.worker.RetryPolicy for this handler\'s failed '
        'messages, or None for the server\'s policy.')

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
    """Sends messages when the current transaction commits."""

    def send(message):
        """Queue ``message`` for publishing at commit of the caller's
        transaction.

        Inside a handler the message joins the handler's transaction (it is
        published in the same AMQP transaction as the ack). Elsewhere it is
        published on a separate channel when the calling thread's
        transaction commits; an abort publishes nothing.
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
    """Event: shutdown has begun."""


@zope.interface.implementer(IProcessStopping)
class ProcessStopping:
    """Sent when the process starts to shut down."""


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


# --------------------------------------------------------------------------
# internal


class ILoop(zope.interface.Interface):
    """Something that runs a loop in a thread of its own."""

    running = zope.interface.Attribute('True while the loop runs.')

    def start():
        """Run the loop in the calling thread until :meth:`stop`."""

    def stop():
        """Make the loop end; callable from any thread."""

    def wait_until_running(timeout=None):
        """Block until the loop runs (or ``timeout``); return ``running``."""


class ISession(zope.interface.Interface):
    """What one transaction will do on the broker.

    Lives on a worker thread (or any thread that sends). Collects the
    messages to publish and, for a handled message, the delivery to ack.
    """

    received_message = zope.interface.Attribute(
        'The IMessage being handled, or None for a pure send session.')
    messages = zope.interface.Attribute('The IMessages to publish.')

    def send(message):
        """Queue ``message`` and join the current transaction."""

    def join_transaction():
        """Join the current transaction (at most once until reset)."""

    def reset():
        """Forget the queued messages (after commit or abort)."""


class IChannelOp(zope.interface.Interface):
    """Work on the broker, created by a worker, carried out by the I/O thread.

    The worker hands the op to ``Server.submit()`` and blocks in
    :meth:`wait`; the I/O thread calls :meth:`execute` and resolves it.
    """

    def execute(channel):
        """Carry the op out on ``channel``. I/O thread only."""

    def wait(timeout):
        """Block until the op is resolved; re-raise its error. Workers only.
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

    Whether the broker committed it is unknown: the worker's transaction
    aborts (a "no" vote), and nothing is retried by us. If the broker did
    commit, the message stays acknowledged and its messages are published;
    otherwise the broker redelivers it.
    """


class ConfigurationError(FatalError):
    """The configuration cannot work (e.g. two handlers on one queue)."""


class BrokerUnreachable(FatalError):
    """The broker could not be reached within the start-up attempts."""


class AccessRefused(FatalError):
    """The broker refused the credentials or the virtual host."""
