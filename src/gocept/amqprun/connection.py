"""The AMQP connection: connect, open channels, publish, and what a broken
connection means.

Runs on: the I/O thread. Together with ``server.py`` the only module that
talks to the AMQP client library: ``connect`` opens a connection to one
node of the ``parameters`` module's ``Parameters`` (importable from here as
ever), ``OpChannel`` is the face of a channel that channel ops see,
``ScratchChannel`` asks the questions that may cost a channel (and
carries the commits that may), ``Channel`` names the channel a broker's
``channel.close`` was about, ``Loss``
classifies why a connection ended, ``ConnectionHistory`` remembers the
losses of the last connections.
"""
import collections
import logging
import re
import socket
import ssl
import struct

import amqp
import amqp.exceptions
import amqp.spec
import amqp.transport

import gocept.amqprun.interfaces
import gocept.amqprun.message
from gocept.amqprun.parameters import Parameters  # noqa: F401 (public name)


log = logging.getLogger(__name__)


#: Errors after which the connection (and every channel on it) is unusable.
CONNECTION_ERRORS = (
    OSError, socket.timeout, EOFError, IOError,
    amqp.exceptions.ConnectionError, amqp.exceptions.ChannelError,
    amqp.exceptions.RecoverableConnectionError,
    amqp.exceptions.IrrecoverableConnectionError,
)

#: Broker answers to a login that no retry can fix.
REFUSALS = (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed)

#: Broker answers to a declare or bind that mean the configuration does
#: not fit the broker (the channel is closed, the connection is intact).
CONFIGURATION_REFUSALS = (
    amqp.exceptions.PreconditionFailed, amqp.exceptions.NotFound,
    amqp.exceptions.AccessRefused)

#: The same for an exchange declare, plus the broker's answer to a type no
#: enabled plugin provides (it closes the connection for that, but no
#: reconnect can fix it).
EXCHANGE_REFUSALS = CONFIGURATION_REFUSALS + (
    amqp.exceptions.InvalidCommand,)

#: What RabbitMQ answers (NOT_FOUND, "failed to perform operation on queue
#: ... due to timeout") when a queue's process cannot be reached in time:
#: a quorum queue without a leader while the cluster elects one. Not a
#: configuration problem; the cluster heals.
UNAVAILABLE_QUEUE_TEXT = re.compile(r'due to timeout|nodedown|noproc', re.I)

#: The heartbeat we ask for when ``heartbeat_interval`` is 0. py-amqp turns
#: heartbeats off for 0, but 0 means "take the broker's proposal" here (as
#: in the 1.x line): the broker's value wins as the smaller one; a broker
#: proposing none gets the protocol maximum, which is as good as none.
ACCEPT_BROKER_HEARTBEAT = 65535

#: Bytes one ``recv`` may take from the socket (see :func:`buffer_reads`);
#: py-amqp copies what is left after each frame part, so not much more
#: than a pass brings in.
READ_CHUNK = 4096

#: Seconds a synchronous broker call (``tx.commit``, ``close``) or a write
#: may block when the connection has no usable heartbeat to bound it.
MAX_IO_TIMEOUT = 60.0


def connect(parameters, node=None, on_blocked=None, on_unblocked=None):
    """Open and return an AMQP connection to ``node`` (default: the first).

    ``on_blocked(reason)`` and ``on_unblocked()`` are called on the I/O
    thread, from inside a frame read, when the broker blocks or unblocks
    publishing on the connection (``connection.blocked``).

    Raises ``AccessRefused`` (fatal) when the broker rejects credentials or
    virtual host and ``TLSError`` (fatal) when the TLS handshake fails;
    network errors propagate as ``OSError`` and friends. A TLS connection
    the broker resets or closes while it is being opened is a
    ``ConnectionResetError`` that names the likely cause (a client
    certificate the broker requires or refuses).
    """
    node = parameters.nodes[0] if node is None else node
    tls = parameters.tls_context
    connection = amqp.Connection(
        host=node.address,
        userid=parameters.username or 'guest',
        password=parameters.password or 'guest',
        virtual_host=parameters.virtual_host,
        heartbeat=parameters.heartbeat_interval or ACCEPT_BROKER_HEARTBEAT,
        connect_timeout=parameters.connect_timeout,
        ssl=dict(context=tls, server_hostname=parameters.server_hostname(
            node)) if tls is not None else False,
    )
    if tls is not None:
        connection.Transport = TLSTransport.for_connection
    connection.Channel = Channel
    if on_blocked is not None:
        report_blocked_reason(connection, on_blocked)
    connection.on_unblocked = on_unblocked
    try:
        connection.connect()
    except REFUSALS as e:
        connection.collect()
        raise gocept.amqprun.interfaces.AccessRefused(
            'The broker at %s refused user %r on virtual host %r: %s' % (
                node, parameters.username or 'guest',
                parameters.virtual_host, e.reply_text or e)) from e
    except ssl.SSLError as e:
        connection.collect()
        raise gocept.amqprun.interfaces.TLSError(
            'TLS handshake with the AMQP broker at %s failed: %s' % (
                node, describe_tls_error(e))) from e
    except amqp.exceptions.ConnectionForced as e:
        connection.collect()
        raise ConnectionRefusedError(str(e)) from e
    except (OSError, EOFError) as e:
        connection.collect()
        if tls is None or not closed_while_opening(e):
            raise
        # Under TLS 1.3 a broker checks the client certificate after our
        # side of the handshake is done; its refusal may reach us as a
        # mere reset or EOF. Still a network error (a node going down
        # looks the same), but the operator learns what to check.
        raise ConnectionResetError(
            '%s; the broker at %s closed the TLS connection while it was '
            'being opened: %s' % (describe(e), node, CLIENT_CERTIFICATE_HINT)
        ) from e
    except BaseException:
        connection.collect()  # no half-open socket is left behind
        raise
    # py-amqp leaves the socket blocking without a timeout: a synchronous
    # call (tx.commit, close) or a write on a stalled connection would hang
    # the I/O thread forever, and heartbeat_tick() never runs meanwhile.
    # A live broker sends something at least every heartbeat interval.
    connection.transport.sock.settimeout(io_timeout(connection.heartbeat))
    buffer_reads(connection.transport)
    return connection


class TLSTransport(amqp.transport.SSLTransport):
    """py-amqp's TLS transport, wrapping the socket with our SSLContext.

    py-amqp 5 builds a context of its own from a dict of options; it
    cannot take a ready ``ssl.SSLContext`` (client certificate, CA file,
    host name check and whatever a user configured on theirs).
    """

    @classmethod
    def for_connection(cls, host, connect_timeout, ssl=None,
                       read_timeout=None, write_timeout=None,
                       socket_settings=None, **kw):
        """Stands in for ``amqp.Connection.Transport``."""
        return cls(host, connect_timeout=connect_timeout, ssl=ssl,
                   read_timeout=read_timeout, write_timeout=write_timeout,
                   socket_settings=socket_settings, **kw)

    def _wrap_socket(self, sock, context=None, server_hostname=None):
        return context.wrap_socket(
            sock, server_hostname=server_hostname,
            do_handshake_on_connect=False)


class Channel(amqp.Channel):
    """py-amqp's channel; when the broker closes it, the error says so.

    py-amqp raises the ``ChannelError`` of a broker's ``channel.close``
    from whichever call is reading frames at the time, which may be a wait
    on another channel of the connection. This one sets ``channel`` on
    that error and remembers it as :attr:`closed_by_broker` (py-amqp then
    reopens the channel, outside transaction mode and without consumers:
    it must not be used any more). Hooks py-amqp's ``_on_close`` (an
    internal, pinned in setup.py and checked by the integration tests of
    ``test_connection``).
    """

    #: The ChannelError with which the broker closed this channel, or None.
    closed_by_broker = None

    def _on_close(self, *args, **kw):
        try:
            return super()._on_close(*args, **kw)
        except amqp.exceptions.ChannelError as e:
            e.channel = self
            self.closed_by_broker = e
            raise


def closed_while_opening(error):
    """True for an error meaning the peer closed the connection: a reset,
    a broken pipe, an EOF, py-amqp's ``OSError('Server unexpectedly
    closed connection')`` (no errno) -- not a refused connect or a
    timeout."""
    return isinstance(error, (ConnectionResetError, BrokenPipeError,
                              EOFError)) or (
        type(error) is OSError and error.errno is None)


#: The likely cause of a TLS connection that ends without a word.
CLIENT_CERTIFICATE_HINT = (
    'does it require a client certificate (ssl_cert_file, ssl_key_file), '
    'or refuse ours?')


def describe_tls_error(error):
    """Why a TLS handshake failed, in words an operator can act on."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return 'the certificate does not verify (%s)' % (
            error.verify_message or error.reason)
    if isinstance(error, ssl.SSLEOFError):
        # TLS 1.3: the broker refused our (missing) client certificate
        # after the handshake and closed before we read its alert.
        return '%s: the broker closed the connection during the ' \
            'handshake; %s' % (describe(error), CLIENT_CERTIFICATE_HINT)
    reason = getattr(error, 'reason', None) or describe(error)
    if 'HANDSHAKE_FAILURE' in reason:
        # TLS 1.2 answers a missing client certificate so.
        return '%s: no TLS version or cipher in common, or the broker ' \
            'requires a client certificate (ssl_cert_file, ssl_key_file)' \
            % reason
    if reason in ('WRONG_VERSION_NUMBER', 'UNKNOWN_PROTOCOL',
                  'RECORD_LAYER_FAILURE', 'PACKET_LENGTH_TOO_LONG',
                  'HTTP_REQUEST'):
        return '%s: the port does not speak TLS (a plain AMQP port?)' % (
            reason)
    if 'CERTIFICATE_REQUIRED' in reason or 'UNKNOWN_CA' in reason \
            or 'BAD_CERTIFICATE' in reason:
        return '%s: the broker refused our client certificate ' \
            '(ssl_cert_file, ssl_key_file)' % reason
    return reason


def report_blocked_reason(connection, on_blocked):
    """Call ``on_blocked(reason)`` with the broker's own reason text.

    py-amqp 5 declares ``connection.blocked`` without arguments and hands
    its callback a fixed text; the frame carries the broker's reason ("low
    on memory", "low on disk"), which is what an operator needs to read.
    """
    blocked = amqp.spec.Connection.Blocked
    connection._METHODS = dict(connection._METHODS)
    connection._METHODS[blocked] = amqp.spec.method(blocked, 's')
    connection._callbacks[blocked] = on_blocked


def buffer_reads(transport):
    """Make py-amqp's TCP transport read the socket in chunks.

    py-amqp reads each frame in three ``recv`` calls (header, payload,
    end octet), nine for a delivery. Its ``_read`` keeps whatever ``recv``
    returned beyond what it asked for in ``_read_buffer`` for the next
    frame, so asking for a chunk makes it buffered. py-amqp internals
    (``_quick_recv``, ``_read_buffer``; pinned in setup.py, checked by
    ``test_connection``); TLS transports are left as they are. The reader
    must then look at :func:`has_buffered_data` before waiting on the
    socket.
    """
    if type(transport) is not amqp.transport.TCPTransport:
        return
    recv = transport.sock.recv

    def chunked_recv(size):
        return recv(max(size, READ_CHUNK))
    transport._quick_recv = chunked_recv


def has_buffered_data(connection):
    """True when bytes read from the socket wait in py-amqp's buffer
    (a ``select`` on the socket does not see them)."""
    return bool(connection.transport._read_buffer)


def io_timeout(heartbeat):
    """Seconds one blocking read or write may take on a connection.

    Twice the negotiated heartbeat, as py-amqp's heartbeat check allows,
    at most :data:`MAX_IO_TIMEOUT`; a connection whose socket stays silent
    that long is dead.
    """
    if not heartbeat:
        return MAX_IO_TIMEOUT
    return min(2.0 * heartbeat, MAX_IO_TIMEOUT)


def open_channel(connection):
    """Open a channel in transaction mode that hands bodies over as bytes."""
    channel = connection.channel()
    # auto_decode would turn bodies into text when content_encoding is set;
    # handlers always get bytes.
    channel.auto_decode = False
    channel.tx_select()
    return channel


class OpChannel:
    """The face of an AMQP channel that channel ops see.

    The frames of the ops are collected and written in one go, with
    ``tx.commit`` after them (:meth:`send_commit`), or before
    ``tx.rollback`` (:meth:`flush`): one write per transaction instead of
    one per ack, per publish and for the commit. Until then nothing of
    them is on the wire, which changes nothing for the broker: it acts on
    a transaction at its commit.
    """

    def __init__(self, channel):
        self._channel = channel
        self._transport = channel.connection.transport
        self._frames = []

    def basic_ack(self, delivery_tag):
        """Acknowledge a delivery (transactional)."""
        self._buffered(self._channel.basic_ack, delivery_tag)

    def basic_reject(self, delivery_tag, requeue):
        """Reject a delivery (transactional)."""
        self._buffered(self._channel.basic_reject, delivery_tag, requeue)

    def publish(self, message):
        """Publish a :class:`gocept.amqprun.message.Message`.

        Raises ``CommitFailed`` for a message that cannot be put on the wire
        (a header value AMQP has no type for, a routing key longer than 255
        bytes): py-amqp encodes a frame completely before writing it, so
        nothing of it is collected and only this op fails.
        """
        self._buffered(publish, self._channel, message)

    def send_commit(self):
        """Write the collected frames and ``tx.commit`` in one go.

        A connection error here means that nothing was committed:
        ``tx.commit`` is the last frame of the write, so the broker never
        got it whole.
        """
        self._buffered(self._channel.send_method, amqp.spec.Tx.Commit)
        self.flush()

    def wait_for_commit(self):
        """Wait for the broker's answer to :meth:`send_commit`.

        Returns once the broker committed. A connection error here leaves
        the outcome unknown (unless the broker closed the channel: then it
        refused the transaction).
        """
        self._channel.wait(amqp.spec.Tx.CommitOk)

    def flush(self):
        """Write the collected frames; connection errors propagate."""
        if self._frames:
            data = b''.join(self._frames)
            self._frames = []
            self._transport.write(data)

    def _collect(self, data):
        # py-amqp hands over a view of a buffer it reuses for the next
        # frame: keep a copy.
        self._frames.append(bytes(data))

    def _buffered(self, method, *args, **kw):
        """Call a channel method with the transport's writes collected.

        py-amqp writes through ``transport._write`` (an internal, pinned
        in setup.py and checked by ``test_connection``).
        """
        transport = self._transport
        own = transport.__dict__.get('_write')
        transport._write = self._collect
        try:
            method(*args, **kw)
        finally:
            if own is None:
                del transport._write
            else:
                transport._write = own


#: The argument signature of ``basic.publish`` (reserved, exchange,
#: routing key, mandatory, immediate), as py-amqp's ``basic_publish``
#: sends it (checked by ``test_connection``).
PUBLISH_ARGSIG = 'Bssbb'


def publish(channel, message):
    """Publish ``message`` on the py-amqp ``channel`` (see OpChannel).

    Sends the method itself rather than through ``basic_publish``: for a
    broker that announces ``connection.blocked`` (RabbitMQ), that one
    first reads the socket with a zero timeout on every call (two
    ``settimeout`` calls and a ``recv``), to learn of a block before the
    publish. The server's loop reads every frame anyway, and holds
    publishing commits while the broker blocks.
    """
    body = message.body if message.body is not None else b''
    try:
        channel.send_method(
            amqp.spec.Basic.Publish, PUBLISH_ARGSIG,
            (0, message.exchange, message.routing_key or '', False, False),
            amqp.Message(body, **message.header.properties()))
    except UNSENDABLE as e:
        raise gocept.amqprun.interfaces.CommitFailed(
            'Cannot publish %r: %s' % (message, describe(e))) from e


def refusal(message, error):
    """The error for ``message`` when the broker closed a channel with
    ``error`` because of it.

    ``ACCESS_REFUSED`` (no write permission) is a ``CommitFailed``: the
    operator fixes it for every message alike. Everything else the broker
    refuses about one publish is a ``PublishRefused``.
    """
    kind = (gocept.amqprun.interfaces.CommitFailed
            if isinstance(error, amqp.exceptions.AccessRefused)
            else gocept.amqprun.interfaces.PublishRefused)
    return kind('The broker refused %s: %s' % (
        gocept.amqprun.message.describe_publish(message), describe(error)))


class ScratchChannel:
    """A channel of the I/O thread for questions that may cost a channel.

    One per connection. :meth:`check_exchange` asks whether an exchange
    exists (a passive declare; known exchanges are remembered for the
    connection's life); :meth:`try_publish` publishes a message in a
    transaction and rolls it back, to learn whether the broker takes it.
    A refusal closes this channel, never the consumer or send channel;
    the next question opens a fresh one. The commit queue also commits
    republishes on it (:meth:`channel`): a queue that still refuses them
    costs this channel, not the connection. Connection errors propagate,
    and so does the close of another channel that arrives while this one
    waits for an answer.
    """

    #: Seconds a missing exchange is believed missing before it is asked
    #: about again (it may have been created meanwhile).
    recheck_missing = 1.0

    def __init__(self, connection):
        self._connection = connection
        self._channel = None
        self._known = {''}  # the default exchange always exists
        self._missing = {}  # name -> (monotonic time, the broker's reason)

    def channel(self):
        """The channel, in transaction mode; a new one after a refusal.

        For commits that may be refused (``commits``: republishes).
        Connection errors propagate.
        """
        if self._channel is not None and (
                self._channel.closed_by_broker is not None):
            self._refused()
        if self._channel is None:
            self._channel = open_channel(self._connection)
        return self._channel

    def _refused(self):
        """The broker closed the channel (py-amqp reopened it, outside
        transaction mode): close it, open a new one next time."""
        channel, self._channel = self._channel, None
        try:
            channel.close()
        except amqp.exceptions.ChannelError:  # pragma: no cover (race)
            pass

    def check_exchange(self, message, now):
        """Raise ``PublishRefused`` when ``message.exchange`` is missing.

        ``now`` is ``time.monotonic()``; a missing exchange is asked about
        again once :attr:`recheck_missing` seconds have passed.
        """
        name = message.exchange or ''
        if name in self._known:
            return
        at, reason = self._missing.get(name, (None, None))
        if at is None or now - at >= self.recheck_missing:
            channel = self.channel()
            try:
                channel.exchange_declare(
                    exchange=name, type='topic', passive=True)
            except amqp.exceptions.ChannelError as e:
                if not is_close_of(e, channel):
                    raise  # about another channel: the connection's trouble
                self._refused()
                at, reason = self._missing[name] = (now, e)
            else:
                self._missing.pop(name, None)
                self._known.add(name)
                return
        raise refusal(message, reason)

    def try_publish(self, message):
        """Publish ``message`` and roll back; raise the broker's refusal.

        A refusal raises ``PublishRefused`` or ``CommitFailed`` (see
        :func:`refusal`); nothing of it is ever delivered.
        """
        channel = self.channel()
        publish(channel, message)
        try:
            channel.tx_rollback()
        except amqp.exceptions.ChannelError as e:
            if not is_close_of(e, channel):
                raise  # about another channel: the connection's trouble
            self._refused()
            raise refusal(message, e) from e


#: What py-amqp raises while encoding a message it cannot send. (Its
#: FrameSyntaxError is a connection error class, but raised before any byte
#: of the frame is written.)
UNSENDABLE = (amqp.exceptions.FrameSyntaxError, struct.error, TypeError,
              ValueError, OverflowError)

#: RabbitMQ's reply text when it closes a channel because a delivery stayed
#: unacknowledged longer than ``consumer_timeout``, see
#: https://www.rabbitmq.com/consumers.html#acknowledgement-timeout
ACK_TIMEOUT_TEXT = re.compile(r'acknowledgement.*timed out', re.I | re.S)
ACK_TIMEOUT_VALUE = re.compile(r'(\d+) ms')


#: The values of :attr:`Loss.reason`.
LOSS_REASONS = ('ack-timeout', 'heartbeat', 'timeout', 'channel-closed',
                'broker-closed', 'network', 'other')


class Loss:
    """Why and when the connection of one generation was lost."""

    def __init__(self, error, at, ack_timeout=None):
        self.error = error
        self.at = at
        #: Seconds of the broker's consumer_timeout when it closed the
        #: channel for it (0 when it did not say), else None.
        self.ack_timeout = ack_timeout

    @classmethod
    def of(cls, error, at):
        """Classify a connection error."""
        ack_timeout = None
        if isinstance(error, amqp.exceptions.PreconditionFailed):
            text = str(error)
            if ACK_TIMEOUT_TEXT.search(text):
                value = ACK_TIMEOUT_VALUE.search(text)
                ack_timeout = int(value.group(1)) / 1000.0 if value else 0
        return cls(error, at, ack_timeout)

    @property
    def reason(self):
        """Why, as one word of a fixed set (a metric label: never text
        from the broker or a message)."""
        error = self.error
        if self.ack_timeout is not None:
            return 'ack-timeout'
        if 'heartbeat' in str(error).lower():
            return 'heartbeat'  # py-amqp: "Too many heartbeats missed"
        if isinstance(error, amqp.exceptions.ChannelError):
            return 'channel-closed'
        if isinstance(error, amqp.exceptions.ConnectionError):
            return 'broker-closed'
        if isinstance(error, socket.timeout):
            return 'timeout'
        if isinstance(error, (OSError, EOFError)):
            return 'network'
        return 'other'

    def error_for(self, delivery):
        """The error of an op on a ``delivery`` of the lost connection."""
        # 10 % slack: we saw the delivery a little after the broker sent it.
        if (self.ack_timeout is not None and delivery is not None
                and self.at - delivery.received >= 0.9 * self.ack_timeout):
            return gocept.amqprun.interfaces.AckTimedOut(
                '%r was not acknowledged within the broker\'s '
                'consumer_timeout (%.1f s); the broker redelivers it' % (
                    delivery, self.ack_timeout))
        return gocept.amqprun.interfaces.ConnectionLost(
            'The channel of %r is gone (%s); the broker redelivers it' % (
                delivery, describe(self.error)))


def describe(error):
    """One line describing a connection error."""
    text = str(error) or error.__class__.__name__
    return '%s: %s' % (error.__class__.__name__, text) \
        if error.__class__.__name__ not in text else text


class ConnectionHistory:
    """The generation of the current connection and why the last few
    ended.

    Every (re)connect starts a new generation; a delivery remembers the
    generation it arrived in, so its tag is never used on a later
    connection.
    """

    #: How many lost generations are remembered.
    keep = 10

    def __init__(self):
        self.generation = 0
        #: Connections lost so far, by :attr:`Loss.reason`.
        self.losses = collections.Counter()
        #: The latest :class:`Loss`, or None.
        self.last_loss = None
        self._losses = {}

    def connected(self):
        """Start the next generation; return its number."""
        self.generation += 1
        return self.generation

    def lose(self, error, at):
        """Record why the current connection ended (the first reason
        wins); return its :class:`Loss`."""
        loss = self._losses.get(self.generation)
        if loss is None:
            loss = self._losses[self.generation] = Loss.of(error, at)
            self.losses[loss.reason] += 1
            self.last_loss = loss
            for generation in list(self._losses):
                if generation < self.generation - self.keep:
                    del self._losses[generation]
        return loss

    def is_current(self, delivery):
        """True when ``delivery`` arrived on the current connection."""
        return delivery.generation == self.generation

    def stale_error(self, delivery):
        """The error for an op on a delivery of a lost connection."""
        loss = self._losses.get(delivery.generation)
        if loss is None:
            return gocept.amqprun.interfaces.ConnectionLost(
                'The channel of %r is gone; the broker redelivers it'
                % delivery)
        return loss.error_for(delivery)


def is_channel_error(error):
    """True when the broker closed a channel (the connection may live)."""
    return isinstance(error, amqp.exceptions.ChannelError)


def is_close_of(error, channel):
    """True when ``error`` is the broker closing ``channel``.

    An error that names no channel is taken for the one of the call that
    raised it.
    """
    return (is_channel_error(error)
            and getattr(error, 'channel', channel) is channel)


def is_partial_commit(error):
    """True when RabbitMQ failed a ``tx.commit`` after applying part of it.

    RabbitMQ applies a transaction's acks and rejects when it handles
    ``tx.commit`` and routes its publishes; when a queue then refuses one
    of them (a full queue with ``x-overflow reject-publish``) it closes
    the channel with "partial tx completion": the acks stand, which of the
    publishes arrived it does not say.
    """
    return (isinstance(error, amqp.exceptions.PreconditionFailed)
            and error.method_sig in (None, amqp.spec.Tx.Commit)
            and 'partial tx completion' in str(error.reply_text))
