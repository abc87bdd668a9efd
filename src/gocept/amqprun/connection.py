"""Parameters and the AMQP connection: connect, declare, bind, consume.

Runs on: the I/O thread (``Parameters`` is a value usable anywhere). Together
with ``server.py`` the only module that talks to the AMQP client library.
"""
import logging
import socket

import amqp
import amqp.exceptions

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

#: Broker answers that no retry can fix.
REFUSALS = (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed)

#: The heartbeat we ask for when ``heartbeat_interval`` is 0. py-amqp turns
#: heartbeats off for 0, but 0 means "take the broker's proposal" here (as
#: in the 1.x line): the broker's value wins as the smaller one; a broker
#: proposing none gets the protocol maximum, which is as good as none.
ACCEPT_BROKER_HEARTBEAT = 65535

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
    return connection


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


def routing_keys(handler):
    """Return the routing keys of ``handler`` as a list."""
    keys = handler.routing_key
    if isinstance(keys, (list, tuple)):
        return list(keys)
    return [keys]


def declare_queue(channel, handler, name):
    """Declare the handler's durable queue and bind it to ``amq.topic``."""
    keys = routing_keys(handler)
    log.info("Handling routing key(s) '%s' on queue '%s' via '%s'",
             ', '.join(keys), handler.queue_name, name)
    channel.queue_declare(
        queue=handler.queue_name, durable=True, exclusive=False,
        auto_delete=False, arguments=dict(handler.arguments or {}))
    for key in keys:
        channel.queue_bind(
            queue=handler.queue_name, exchange='amq.topic', routing_key=key)


def check_unique_queues(named_handlers):
    """Raise ConfigurationError when two handlers share a queue."""
    seen = {}
    for name, handler in named_handlers:
        if handler.queue_name in seen:
            raise gocept.amqprun.interfaces.ConfigurationError(
                'Queue %r is bound to two handlers: %r and %r' % (
                    handler.queue_name, seen[handler.queue_name], name))
        seen[handler.queue_name] = name
