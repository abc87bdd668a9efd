"""Fakes shared by the unit tests: a channel, a server, a session, a
data manager and an AMQP delivery, each recording what was done to it.

None of them talks to a broker, opens a socket or sleeps.
"""
import contextlib
import os
import queue
import threading

import amqp.exceptions
import amqp.spec
import zope.interface

import gocept.amqprun.connection
import gocept.amqprun.parameters
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.server


class FakeChannel:
    """An AMQP channel that records its calls as tuples in ``calls``.

    It has both faces: the py-amqp channel the server uses
    (``basic_publish``, ``tx_commit``, ``queue_declare``, ...) and the
    ``OpChannel`` face channel ops see (``publish``). ``fail`` maps a
    method name to the exception that method raises.
    """

    #: The ChannelError it raised last, as ``connection.Channel`` does
    #: when the broker closes it.
    closed_by_broker = None

    def __init__(self, broker=None, **fail):
        self.calls = []
        self.fail = fail
        self.auto_decode = True
        self._consumer_tags = 0
        #: consumer tag -> callback given to basic_consume
        self.callbacks = {}
        #: The FakeBroker that decides what is refused, or None.
        self.broker = broker
        #: The refusal the next tx_commit/tx_rollback raises (as a broker
        #: closes the channel for a publish: the error comes later).
        self._refusal = None
        self.connection = FakeWire()

    def _record(self, name, *args, **kw):
        self.calls.append((name,) + args + tuple(sorted(kw.items())))
        if name in self.fail:
            self._raise(self.fail[name])

    def _raise(self, error):
        if isinstance(error, amqp.exceptions.ChannelError) and getattr(
                error, 'channel', self) is self:
            self.closed_by_broker = error
        raise error

    @property
    def names(self):
        """The names of the recorded calls, in order."""
        return [call[0] for call in self.calls]

    # py-amqp face
    def basic_ack(self, delivery_tag):
        self._record('basic_ack', delivery_tag)

    def basic_reject(self, delivery_tag, requeue):
        self._record('basic_reject', delivery_tag, requeue)

    def basic_publish(self, amqp_message, exchange, routing_key):
        self.calls.append(('basic_publish', amqp_message.body,
                           dict(amqp_message.properties), exchange,
                           routing_key))
        if 'basic_publish' in self.fail:
            self._raise(self.fail['basic_publish'])
        if self.broker is not None and self._refusal is None:
            self._refusal = self.broker.refusal(amqp_message.body, exchange)

    def send_method(self, method_sig, argsig=None, args=None, content=None):
        """What ``connection.publish`` and ``OpChannel.send_commit`` send:
        a publish is recorded as basic_publish; ``tx.commit`` is recorded
        with its answer (:meth:`wait`), ``fail['send_commit']`` is raised
        as if writing it failed."""
        if method_sig == amqp.spec.Tx.Commit:
            if 'send_commit' in self.fail:
                self._raise(self.fail['send_commit'])
            return
        assert method_sig == amqp.spec.Basic.Publish
        _, exchange, routing_key, _, _ = args
        self.basic_publish(content, exchange=exchange,
                           routing_key=routing_key)

    def wait(self, method_sig):
        """Wait for ``tx.commit-ok``: recorded as tx_commit."""
        assert method_sig == amqp.spec.Tx.CommitOk
        self.tx_commit()

    def _raise_refusal(self):
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            self._raise(refusal)

    def tx_select(self):
        self._record('tx_select')

    def tx_commit(self):
        self._record('tx_commit')
        self._raise_refusal()

    def tx_rollback(self):
        self._record('tx_rollback')
        self._raise_refusal()

    def exchange_declare(self, exchange, **kw):
        self._record('exchange_declare', exchange=exchange, **kw)
        if self.broker is not None and exchange in self.broker.missing:
            self._raise(amqp.exceptions.NotFound(
                "NOT_FOUND - no exchange '%s' in vhost '/'" % exchange))

    def close(self):
        self._record('close')

    def queue_declare(self, **kw):
        self._record('queue_declare', **kw)

    def queue_bind(self, **kw):
        self._record('queue_bind', **kw)

    def basic_qos(self, prefetch_size, prefetch_count, a_global):
        self._record('basic_qos', prefetch_size, prefetch_count, a_global)

    def basic_consume(self, queue, callback):
        self._record('basic_consume', queue)
        self._consumer_tags += 1
        tag = 'ctag%d' % self._consumer_tags
        self.callbacks[tag] = callback
        return tag

    def basic_cancel(self, consumer_tag):
        self._record('basic_cancel', consumer_tag)

    # OpChannel face
    def publish(self, message):
        self._record('publish', message)


class FakeBroker:
    """Decides what FakeChannels made by :meth:`channel` refuse.

    ``missing`` holds the names of exchanges that do not exist (a publish
    to one, a passive declare of one is refused with NOT_FOUND);
    ``refused`` maps a body to the error the broker closes the channel
    with when it is published. Stands in for the connection a
    ``ScratchChannel`` opens channels on.
    """

    def __init__(self):
        self.missing = set()
        self.refused = {}
        #: Every channel opened, in order.
        self.channels = []

    def channel(self):
        channel = FakeChannel(broker=self)
        self.channels.append(channel)
        return channel

    def scratch(self):
        """A real ScratchChannel on this broker."""
        return gocept.amqprun.connection.ScratchChannel(self)

    def refusal(self, body, exchange):
        if exchange in self.missing:
            return amqp.exceptions.NotFound(
                "NOT_FOUND - no exchange '%s' in vhost '/'" % exchange)
        return self.refused.get(body)


class FakeEncodingChannel(FakeChannel):
    """Encodes the properties of a publish as py-amqp does on the wire."""

    def __init__(self):
        super().__init__()
        self.published = []

    def basic_publish(self, amqp_message, exchange, routing_key):
        amqp_message._serialize_properties()
        self.published.append(amqp_message.body)


@zope.interface.implementer(gocept.amqprun.interfaces.IServer)
class FakeServer:
    """A server whose ``submit(op)`` carries the op out at once.

    Each submitted op is recorded in ``ops``. ``outcomes`` is a list of
    errors (or None for success) used for the submits in order; once it is
    used up, submits succeed. A successful op is executed on ``channel``
    followed by ``tx_commit``, as the I/O thread would; a failed one is
    resolved with its error and nothing is sent. The ILoop part only
    records: it never runs a loop.
    """

    running = True
    blocked = None
    republishing = 0
    held = 0
    node = 'localhost:5672'
    max_message_size = gocept.amqprun.parameters.DEFAULT_MAX_MESSAGE_SIZE

    def __init__(self, outcomes=()):
        self.channel = FakeChannel()
        self.ops = []
        self.outcomes = list(outcomes)
        self.tasks = queue.Queue()
        self.parameters = gocept.amqprun.connection.Parameters()
        self.consuming = True
        self.last_turn = None
        self.history = gocept.amqprun.connection.ConnectionHistory()
        self.commit_observers = []
        self._local = threading.local()

    def start(self):
        """Nothing to run."""

    def stop(self):
        self.running = False

    def wait_until_running(self, timeout=None):
        return self.running

    def stop_consuming(self):
        self.consuming = False

    def submit(self, op):
        self.ops.append(op)
        error = self.outcomes.pop(0) if self.outcomes else None
        if error is None:
            op.execute(self.channel)
            self.channel.tx_commit()
        op.resolve(error)

    @contextlib.contextmanager
    def handling(self, session):
        previous = getattr(self._local, 'session', None)
        self._local.session = session
        try:
            yield session
        finally:
            self._local.session = previous

    def send(self, message):
        self._local.session.send(message)

    @property
    def commits(self):
        return [op for op in self.ops if type(op).__name__ == 'Commit']

    @property
    def rejects(self):
        return [op for op in self.ops if type(op).__name__ == 'Reject']


class FakeSession:
    """Stands in for a Session where only ``acknowledge`` matters."""

    def __init__(self):
        self.acknowledged = []

    def acknowledge(self, message):
        self.acknowledged.append(message)


class RecordingDataManager:
    """A resource manager (e.g. a database) that records its phases.

    Appends ``'<name>.<phase>'`` to ``log``; the phase named ``fail_in``
    raises ``error`` (RuntimeError).
    """

    transaction_manager = None

    def __init__(self, log, name='db', sort_key='db', fail_in=None,
                 error=RuntimeError):
        self.log = log
        self.name = name
        self.sort_key = sort_key
        self.fail_in = fail_in
        self.error = error

    def _phase(self, phase):
        self.log.append('%s.%s' % (self.name, phase))
        if phase == self.fail_in:
            raise self.error('%s failed in %s' % (self.name, phase))

    def abort(self, txn):
        self._phase('abort')

    def tpc_begin(self, txn):
        self._phase('tpc_begin')

    def commit(self, txn):
        self._phase('commit')

    def tpc_vote(self, txn):
        self._phase('tpc_vote')

    def tpc_finish(self, txn):
        self._phase('tpc_finish')

    def tpc_abort(self, txn):
        self._phase('tpc_abort')

    def sortKey(self):
        return self.sort_key


class FakeAMQPMessage:
    """What py-amqp hands to a consumer callback."""

    def __init__(self, body, delivery_info, properties=None):
        self.body = body
        self.delivery_info = delivery_info
        self.properties = properties or {}


def received_message(body=b'body', tag=1, message_id='<orig@example>',
                     routing_key='test.routing', generation=1, headers=None,
                     **properties):
    """A Message as the I/O thread builds it for a delivery."""
    header = gocept.amqprun.message.Header(
        headers=headers, message_id=message_id, **properties)
    message = gocept.amqprun.message.Message(
        header, body, delivery_tag=tag, routing_key=routing_key)
    message.delivery = gocept.amqprun.server.Delivery(generation, tag)
    return message


def outgoing_message(body=b'reply', routing_key='test.response', **header):
    """A Message as a handler builds it."""
    return gocept.amqprun.message.Message(
        header, body, routing_key=routing_key)


def close_server(server):
    """Close the wake-up pipe of a real Server that never ran."""
    for fd in (server._wake_r, server._wake_w):
        try:
            os.close(fd)
        except OSError:
            pass


class FakeSocket:
    """The socket of a FakeAMQPConnection's transport."""

    def __init__(self):
        self.timeout = None

    def settimeout(self, timeout):
        self.timeout = timeout


class FakeTransport:
    """py-amqp's transport: ``write`` goes through ``_write``; what reached
    the socket is in ``sent``."""

    def __init__(self):
        self.sock = FakeSocket()
        self._read_buffer = b''
        self.sent = []
        self._write = self.sent.append

    def write(self, data):
        self._write(data)


class FakeWire:
    """The connection of a FakeChannel: just its transport."""

    def __init__(self):
        self.transport = FakeTransport()


class FakeAMQPConnection:
    """Stands in for ``amqp.Connection``: records what it was built with.

    ``connect_errors`` (class attribute) lists what ``connect()`` raises,
    one per attempt; None for success. ``instances`` collects every
    connection made.
    """

    instances = []
    connect_errors = []
    #: py-amqp's table of method signatures (``connect`` extends it).
    _METHODS = {}

    def __init__(self, **kw):
        self.kw = kw
        self._callbacks = {}
        self.on_unblocked = None
        self.heartbeat = kw.get('heartbeat') or 0
        self.transport = FakeTransport()
        self.channels = []
        self.calls = []
        self.instances.append(self)

    def connect(self):
        self.calls.append('connect')
        error = self.connect_errors.pop(0) if self.connect_errors else None
        if error is not None:
            raise error

    def channel(self):
        channel = FakeChannel()
        self.channels.append(channel)
        return channel

    def close(self):
        self.calls.append('close')

    def collect(self):
        self.calls.append('collect')


def resolved(op):
    return op._done.is_set()


def error_of(op):
    """The error ``op`` was resolved with (None for success)."""
    assert resolved(op), '%r was not resolved' % op
    try:
        op.wait(0)
    except Exception as error:
        return error
    return None
