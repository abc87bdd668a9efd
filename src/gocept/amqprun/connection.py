"""Parameters and the AMQP connection: connect, open channels, publish,
and what a broken connection means.

Runs on: the I/O thread (``Parameters`` is a value usable anywhere). Together
with ``server.py`` the only module that talks to the AMQP client library:
``OpChannel`` is the face of a channel that channel ops see, ``Loss``
classifies why a connection ended, ``ConnectionHistory`` remembers the
losses of the last connections.
"""
import logging
import re
import socket
import struct

import amqp
import amqp.exceptions
import amqp.transport

import gocept.amqprun.interfaces


log = logging.getLogger(__name__)

DEFAULT_PORT = 5672

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


class Parameters:
    """How to reach the broker and how to behave on the connection.

    The keyword names of the original (``hostname``, ``port``,
    ``username``, ``password``, ``virtual_host``, ``heartbeat_interval``)
    plus this project's additions. Unknown keywords are a ``TypeError``.
    """

    def __init__(self, hostname='localhost', port=DEFAULT_PORT,
                 username=None, password=None, virtual_host='/',
                 heartbeat_interval=0, connect_timeout=10,
                 prefetch_count=10, ssl=False, startup_attempts=5,
                 reconnect_delay=1.0, reconnect_max_delay=30.0):
        self.hostname = hostname
        self.port = int(port) if port else DEFAULT_PORT
        self.username = username
        self.password = password
        self.virtual_host = virtual_host or '/'
        self.heartbeat_interval = int(heartbeat_interval or 0)
        self.connect_timeout = float(connect_timeout)
        self.prefetch_count = int(prefetch_count)
        self.ssl = ssl
        self.startup_attempts = int(startup_attempts)
        self.reconnect_delay = float(reconnect_delay)
        self.reconnect_max_delay = float(reconnect_max_delay)

    @classmethod
    def from_section(cls, section, **overrides):
        """Build parameters from a ZConfig ``<amqp-server>`` section."""
        names = cls.__init__.__code__.co_varnames[
            1:cls.__init__.__code__.co_argcount]
        kw = {name: getattr(section, name) for name in names
              if getattr(section, name, None) is not None}
        kw.update(overrides)
        return cls(**kw)

    @property
    def address(self):
        """``host:port`` as shown in log lines."""
        return '%s:%s' % (self.hostname, self.port)

    def __repr__(self):
        return '<Parameters amqp://%s@%s/%s>' % (
            self.username or 'guest', self.address,
            self.virtual_host.lstrip('/') or '%2F')


def connect(parameters):
    """Open and return an AMQP connection.

    Raises ``AccessRefused`` (fatal) when the broker rejects credentials or
    virtual host; network errors propagate as ``OSError`` and friends.
    """
    connection = amqp.Connection(
        host=parameters.address,
        userid=parameters.username or 'guest',
        password=parameters.password or 'guest',
        virtual_host=parameters.virtual_host,
        heartbeat=parameters.heartbeat_interval or ACCEPT_BROKER_HEARTBEAT,
        connect_timeout=parameters.connect_timeout,
        ssl=parameters.ssl,
    )
    try:
        connection.connect()
    except REFUSALS as e:
        connection.collect()
        raise gocept.amqprun.interfaces.AccessRefused(
            'The broker at %s refused user %r on virtual host %r: %s' % (
                parameters.address, parameters.username or 'guest',
                parameters.virtual_host, e.reply_text or e)) from e
    except amqp.exceptions.ConnectionForced as e:
        connection.collect()
        raise ConnectionRefusedError(str(e)) from e
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

    The frames of the ops are collected and written in one go by
    :meth:`flush`, which the commit queue calls before ``tx.commit`` (or
    ``tx.rollback``): one write per transaction instead of one per ack and
    per publish. Until then nothing of them is on the wire, which changes
    nothing for the broker: it acts on a transaction at its commit.
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
        body = message.body if message.body is not None else b''
        try:
            self._buffered(
                self._channel.basic_publish,
                amqp.Message(body, **message.header.properties()),
                exchange=message.exchange,
                routing_key=message.routing_key or '')
        except UNSENDABLE as e:
            raise gocept.amqprun.interfaces.CommitFailed(
                'Cannot publish %r: %s' % (message, describe(e))) from e

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
