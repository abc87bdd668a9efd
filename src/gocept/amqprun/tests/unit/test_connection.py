"""Tests for gocept.amqprun.connection: connect, OpChannel, ScratchChannel,
describe, ConnectionHistory.

``amqp.Connection`` is replaced by FakeAMQPConnection; no socket is opened.
"""
import contextlib
import ssl
import struct

import amqp
import amqp.exceptions
import amqp.method_framing
import amqp.serialization
import amqp.spec
import amqp.transport
import pytest

from gocept.amqprun.connection import LOSS_REASONS
from gocept.amqprun.connection import READ_CHUNK
from gocept.amqprun.connection import ConnectionHistory
from gocept.amqprun.connection import OpChannel
from gocept.amqprun.parameters import Parameters
from gocept.amqprun.connection import TLSTransport
from gocept.amqprun.connection import buffer_reads
from gocept.amqprun.connection import connect
from gocept.amqprun.connection import describe
from gocept.amqprun.connection import has_buffered_data
from gocept.amqprun.connection import open_channel
from gocept.amqprun.connection import publish
from gocept.amqprun.connection import report_blocked_reason
from gocept.amqprun.interfaces import AccessRefused
from gocept.amqprun.interfaces import AckTimedOut
from gocept.amqprun.interfaces import ConnectionLost
from gocept.amqprun.interfaces import FatalError
from gocept.amqprun.interfaces import TLSError
from gocept.amqprun.message import Message
from gocept.amqprun.server import Delivery
from gocept.amqprun.tests.unit.fakes import FakeAMQPConnection
from gocept.amqprun.tests.unit.fakes import FakeChannel
from gocept.amqprun.tests.unit.fakes import FakeTransport


# -- connect and open_channel -------------------------------------------------

def test_connect_passes_parameters_to_the_client(fake_amqp):
    connection = connect(Parameters(
        hostname='broker', port='1234', username='user', password='secret',
        virtual_host='vhost', heartbeat_interval=30, connect_timeout=3))
    assert connection.kw == dict(
        host='broker:1234', userid='user', password='secret',
        virtual_host='vhost', heartbeat=30, connect_timeout=3.0, ssl=False)
    assert connection.calls == ['connect']
    assert 'Transport' not in vars(connection)


def test_connect_goes_to_the_node_it_is_given(fake_amqp):
    parameters = Parameters(hostname='rabbit1 rabbit2:5673')
    connection = connect(parameters, parameters.nodes[1])
    assert connection.kw['host'] == 'rabbit2:5673'


def test_connect_with_tls_wraps_the_socket_with_our_context(fake_amqp):
    context = ssl.create_default_context()
    parameters = Parameters(hostname='rabbit1 rabbit2', ssl=context)
    connection = connect(parameters, parameters.nodes[1])
    assert connection.kw['ssl'] == dict(
        context=context, server_hostname='rabbit2')
    assert connection.Transport == TLSTransport.for_connection


def test_connect_with_tls_checks_the_configured_server_hostname(fake_amqp):
    connection = connect(Parameters(
        hostname='127.0.0.1', ssl=True, ssl_server_hostname='localhost'))
    assert connection.kw['ssl']['server_hostname'] == 'localhost'


def test_tls_transport_wraps_with_the_context_without_handshake():
    calls = []

    class Context:
        def wrap_socket(self, sock, **kw):
            calls.append((sock, kw))
            return 'wrapped'

    transport = TLSTransport.for_connection(
        'rabbit:5671', 3, ssl=dict(context=Context(),
                                   server_hostname='rabbit'))
    assert transport._wrap_socket('sock', **transport.sslopts) == 'wrapped'
    assert calls == [('sock', dict(server_hostname='rabbit',
                                   do_handshake_on_connect=False))]


def test_connect_with_a_certificate_that_does_not_verify_is_fatal(
        fake_amqp):
    error = ssl.SSLCertVerificationError(
        1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed')
    error.verify_message = 'unable to get local issuer certificate'
    fake_amqp.connect_errors = [error]
    with pytest.raises(TLSError) as info:
        connect(Parameters(hostname='rabbit:5671', ssl=True))
    assert isinstance(info.value, FatalError)
    assert str(info.value) == (
        'TLS handshake with the AMQP broker at rabbit:5671 failed: the '
        'certificate does not verify (unable to get local issuer '
        'certificate)')
    assert fake_amqp.instances[0].calls == ['connect', 'collect']


def test_tls_against_a_plain_port_says_so(fake_amqp):
    error = ssl.SSLError(1, '[SSL: WRONG_VERSION_NUMBER] wrong version')
    error.reason = 'WRONG_VERSION_NUMBER'
    fake_amqp.connect_errors = [error]
    with pytest.raises(TLSError, match='rabbit:5672 failed: '
                       'WRONG_VERSION_NUMBER: the port does not speak TLS'):
        connect(Parameters(hostname='rabbit', port=5672, ssl=True))


def test_a_refused_client_certificate_names_the_files_to_check(fake_amqp):
    error = ssl.SSLError(1, 'alert')
    error.reason = 'TLSV13_ALERT_CERTIFICATE_REQUIRED'
    fake_amqp.connect_errors = [error]
    with pytest.raises(TLSError, match='refused our client certificate'):
        connect(Parameters(ssl=True))


def test_a_tls_eof_during_the_handshake_names_the_client_certificate(
        fake_amqp):
    # TLS 1.3: the broker refuses a missing client certificate after our
    # side of the handshake and may close before we read its alert.
    fake_amqp.connect_errors = [ssl.SSLEOFError(
        8, 'EOF occurred in violation of protocol (_ssl.c:2427)')]
    with pytest.raises(TLSError) as info:
        connect(Parameters(hostname='rabbit', ssl=True))
    assert str(info.value) == (
        'TLS handshake with the AMQP broker at rabbit:5671 failed: '
        'SSLEOFError: EOF occurred in violation of protocol (_ssl.c:2427): '
        'the broker closed the connection during the handshake; does it '
        'require a client certificate (ssl_cert_file, ssl_key_file), or '
        'refuse ours?')


def test_a_tls_handshake_failure_names_the_client_certificate(fake_amqp):
    # What TLS 1.2 answers a client without the certificate required.
    error = ssl.SSLError(1, '[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE] alert')
    error.reason = 'SSLV3_ALERT_HANDSHAKE_FAILURE'
    fake_amqp.connect_errors = [error]
    with pytest.raises(TLSError, match='failed: SSLV3_ALERT_HANDSHAKE_'
                       'FAILURE: no TLS version or cipher in common, or '
                       r'the broker requires a client certificate \('
                       'ssl_cert_file, ssl_key_file'):
        connect(Parameters(ssl=True))


@pytest.mark.parametrize('error', [
    ConnectionResetError(104, 'Connection reset by peer'),
    BrokenPipeError(32, 'Broken pipe'),
    EOFError(),
    OSError('Server unexpectedly closed connection'),
], ids=['reset', 'pipe', 'eof', 'closed'])
def test_a_tls_connection_closed_while_opening_names_the_likely_cause(
        fake_amqp, error):
    fake_amqp.connect_errors = [error]
    with pytest.raises(ConnectionResetError) as info:
        connect(Parameters(hostname='rabbit', ssl=True))
    message = str(info.value)
    assert message.startswith(describe(error) + '; ')
    assert 'the broker at rabbit:5671 closed the TLS connection while it ' \
        'was being opened: does it require a client certificate ' \
        '(ssl_cert_file, ssl_key_file), or refuse ours?' in message
    assert info.value.__cause__ is error
    assert fake_amqp.instances[0].calls == ['connect', 'collect']


@pytest.mark.parametrize('error', [
    ConnectionRefusedError(111, 'Connection refused'),
    TimeoutError('timed out'),
    OSError(113, 'No route to host'),
], ids=['refused', 'timeout', 'unreachable'])
def test_a_tls_connect_that_never_reached_the_broker_propagates(
        fake_amqp, error):
    fake_amqp.connect_errors = [error]
    with pytest.raises(OSError) as info:
        connect(Parameters(ssl=True))
    assert info.value is error


def test_a_plain_connection_reset_propagates_as_it_is(fake_amqp):
    error = ConnectionResetError(104, 'Connection reset by peer')
    fake_amqp.connect_errors = [error]
    with pytest.raises(ConnectionResetError) as info:
        connect(Parameters())
    assert info.value is error


def test_other_tls_errors_give_their_reason(fake_amqp):
    fake_amqp.connect_errors = [ssl.SSLError(1, 'odd')]
    with pytest.raises(TLSError, match='failed: SSLError: .*odd'):
        connect(Parameters(ssl=True))


def test_connect_hands_the_brokers_blocked_reason_to_the_callback():
    # A real py-amqp connection object (never connected): the frame
    # dispatch is py-amqp's own.
    connection = amqp.Connection(host='127.0.0.1:1')
    reasons = []
    report_blocked_reason(connection, reasons.append)
    # A method frame's payload: class and method id, then the arguments.
    connection.dispatch_method(
        amqp.spec.Connection.Blocked,
        struct.pack('>HH', *amqp.spec.Connection.Blocked)
        + amqp.serialization.dumps('s', ['low on memory']), None)
    assert reasons == ['low on memory']
    assert amqp.Connection._METHODS[amqp.spec.Connection.Blocked].args \
        is None  # other connections are left as they are


def test_connect_passes_the_unblocked_callback(fake_amqp):
    def unblocked():
        pass  # pragma: no cover (never called)
    connection = connect(Parameters(), on_blocked=print,
                         on_unblocked=unblocked)
    assert connection.on_unblocked is unblocked
    assert connection._callbacks[amqp.spec.Connection.Blocked] is print


def test_connect_without_username_and_password_uses_guest(fake_amqp):
    connection = connect(Parameters())
    assert connection.kw['userid'] == 'guest'
    assert connection.kw['password'] == 'guest'


@pytest.mark.parametrize('refusal', [
    amqp.exceptions.AccessRefused('ACCESS_REFUSED - login refused'),
    amqp.exceptions.NotAllowed('NOT_ALLOWED - vhost not found'),
], ids=['credentials', 'vhost'])
def test_connect_refused_by_broker_is_fatal(fake_amqp, refusal):
    fake_amqp.connect_errors = [refusal]
    with pytest.raises(AccessRefused) as info:
        connect(Parameters(hostname='broker', username='user',
                           virtual_host='vhost'))
    assert isinstance(info.value, FatalError)
    message = str(info.value)
    assert 'broker:5672' in message
    assert "'user'" in message
    assert "'vhost'" in message


def test_connect_forced_close_is_a_connection_refusal(fake_amqp):
    fake_amqp.connect_errors = [
        amqp.exceptions.ConnectionForced('broker shutting down')]
    with pytest.raises(ConnectionRefusedError, match='shutting down'):
        connect(Parameters())


def test_connect_network_errors_propagate(fake_amqp):
    fake_amqp.connect_errors = [ConnectionRefusedError('refused')]
    with pytest.raises(ConnectionRefusedError):
        connect(Parameters())


def test_open_channel_selects_tx_and_keeps_bodies_bytes():
    connection = FakeAMQPConnection()
    channel = open_channel(connection)
    assert channel is connection.channels[0]
    assert channel.calls == [('tx_select',)]
    assert channel.auto_decode is False


# -- declaring ----------------------------------------------------------------

@pytest.mark.parametrize('error', [
    amqp.exceptions.AccessRefused('ACCESS_REFUSED'),
    amqp.exceptions.ConnectionForced('closing'),
    ConnectionRefusedError('refused'),
], ids=['refused', 'forced', 'network'])
def test_connect_failure_leaves_no_half_open_connection(fake_amqp, error):
    fake_amqp.connect_errors = [error]
    with pytest.raises(Exception):
        connect(Parameters())
    [connection] = fake_amqp.instances
    assert connection.calls == ['connect', 'collect']


def test_connect_bounds_blocking_socket_calls(fake_amqp):
    connection = connect(Parameters(heartbeat_interval=10))
    assert 0 < connection.transport.sock.timeout <= 60


# -- OpChannel and describe ---------------------------------------------------

def test_op_channel_publishes_empty_body_for_none():
    channel = FakeChannel()
    OpChannel(channel).publish(Message(dict(message_id='id'), None))
    [call] = channel.calls
    assert call[1] == b''
    assert call[3:] == ('amq.topic', '')


def test_op_channel_passes_ack_and_reject_through():
    channel = FakeChannel()
    op_channel = OpChannel(channel)
    op_channel.basic_ack(3)
    op_channel.basic_reject(4, True)
    assert channel.calls == [('basic_ack', 3), ('basic_reject', 4, True)]


def test_describe_names_the_error_class_once():
    assert describe(ConnectionRefusedError('refused')) == (
        'ConnectionRefusedError: refused')
    assert describe(EOFError()) == 'EOFError'
    assert describe(amqp.exceptions.RecoverableConnectionError(
        'RecoverableConnectionError: gone')) == (
        'RecoverableConnectionError: gone')


# -- ConnectionHistory ------------------------------------------------------

def test_history_counts_generations_and_knows_the_current_one():
    history = ConnectionHistory()
    assert history.connected() == 1
    assert history.is_current(Delivery(1, 5))
    assert history.connected() == 2
    assert not history.is_current(Delivery(1, 5))


def test_history_keeps_the_first_reason_of_a_loss():
    history = ConnectionHistory()
    history.connected()
    first = history.lose(ConnectionResetError('reset'), 10)
    assert history.lose(EOFError(), 11) is first
    error = history.stale_error(Delivery(1, 3))
    assert isinstance(error, ConnectionLost)
    assert 'ConnectionResetError: reset' in str(error)


def test_history_names_an_ack_timeout_for_old_deliveries():
    history = ConnectionHistory()
    history.connected()
    history.lose(amqp.exceptions.PreconditionFailed(
        'delivery acknowledgement on channel 1 timed out. Timeout value '
        'used: 1800000 ms'), 2000)
    assert isinstance(
        history.stale_error(Delivery(1, 3, received=0)), AckTimedOut)


def test_history_forgets_old_generations():
    history = ConnectionHistory()
    for _ in range(history.keep + 3):
        history.connected()
        history.lose(EOFError('went away'), 0)
    error = history.stale_error(Delivery(1, 3))
    assert 'went away' not in str(error)
    assert isinstance(error, ConnectionLost)


@pytest.mark.parametrize('error, reason', [
    (amqp.exceptions.PreconditionFailed(
        'delivery acknowledgement on channel 1 timed out'), 'ack-timeout'),
    (amqp.exceptions.ConnectionForced('Too many heartbeats missed'),
     'heartbeat'),
    (amqp.exceptions.NotFound('no exchange'), 'channel-closed'),
    (amqp.exceptions.ConnectionForced('shutdown'), 'broker-closed'),
    (TimeoutError('timed out'), 'timeout'),
    (ConnectionResetError('reset'), 'network'),
    (EOFError(), 'network'),
    (ConnectionLost('gone'), 'other'),
])
def test_history_counts_losses_by_reason(error, reason):
    history = ConnectionHistory()
    history.connected()
    loss = history.lose(error, 0)
    history.lose(EOFError(), 1)  # the same connection: counted once
    assert loss.reason == reason
    assert reason in LOSS_REASONS
    assert history.losses == {reason: 1}
    assert history.last_loss is loss


class ChunkSocket:
    """Hands out ``data`` in pieces of at most the size asked for."""

    def __init__(self, data):
        self.data = data
        self.sizes = []

    def recv(self, size):
        self.sizes.append(size)
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk

    def sendall(self, data):
        raise AssertionError('nothing is written')

    def getsockname(self):
        return ('127.0.0.1', 1)

    def getpeername(self):
        return ('127.0.0.1', 1)


def heartbeat_frames(count):
    return b''.join(struct.pack('>BHI', 8, 0, 0) + b'\xce'
                    for _ in range(count))


def test_buffered_reads_take_several_frames_with_one_recv():
    # Fails loudly when py-amqp's TCPTransport internals change (the
    # version range in setup.py pins them): _quick_recv, _read_buffer.
    transport = amqp.transport.TCPTransport('127.0.0.1:1')
    transport.sock = ChunkSocket(heartbeat_frames(3))
    transport._setup_transport()
    buffer_reads(transport)
    connection = FakeAMQPConnection()
    connection.transport = transport
    assert transport.read_frame() == (8, 0, b'')
    assert has_buffered_data(connection)
    assert transport.read_frame() == (8, 0, b'')
    assert transport.read_frame() == (8, 0, b'')
    assert not has_buffered_data(connection)
    assert transport.sock.sizes == [READ_CHUNK]


def test_buffered_reads_leave_other_transports_alone():
    transport = FakeTransport()
    buffer_reads(transport)
    assert not hasattr(transport, '_quick_recv')


class WritingChannel(FakeChannel):
    """Writes each ack as py-amqp does: a view of a buffer it reuses."""

    def __init__(self):
        super().__init__()
        self._buffer = bytearray(1)

    def basic_ack(self, delivery_tag):
        super().basic_ack(delivery_tag)
        self._buffer[0] = delivery_tag
        self.connection.transport.write(memoryview(self._buffer))


def test_op_channel_writes_the_frames_of_its_ops_at_flush_in_one_go():
    channel = WritingChannel()
    op_channel = OpChannel(channel)
    op_channel.basic_ack(1)
    op_channel.basic_ack(2)
    assert channel.connection.transport.sent == []
    op_channel.flush()
    op_channel.flush()
    assert channel.connection.transport.sent == [b'\x01\x02']


def test_op_channel_restores_the_transport_when_a_method_fails():
    channel = FakeChannel(basic_ack=OSError('gone'))
    transport = channel.connection.transport
    own = transport._write
    with pytest.raises(OSError):
        OpChannel(channel).basic_ack(1)
    assert transport._write == own


def test_op_channel_collects_what_py_amqp_transport_writes():
    # Fails loudly when py-amqp's TCPTransport stops writing through its
    # _write attribute (version range pinned in setup.py).
    sent = []
    transport = amqp.transport.TCPTransport('127.0.0.1:1')
    transport.sock = ChunkSocket(b'')
    transport.sock.sendall = sent.append
    transport._setup_transport()
    channel = FakeChannel()
    channel.connection.transport = transport
    op_channel = OpChannel(channel)
    op_channel._buffered(transport.write, memoryview(b'frame'))
    assert sent == []
    op_channel.flush()
    assert sent == [b'frame']
    assert transport._write == transport.sock.sendall


class WritingConnection:
    """A py-amqp connection as far as writing frames goes (py-amqp's own
    frame writer); its transport records each write.

    It has no ``drain_events``: a publish that reads fails loudly.
    ``blocked_capability`` is what the broker announced about
    ``connection.blocked`` (py-amqp's ``basic_publish`` reads the socket
    before each publish when it did).
    """

    frame_max = 131072
    bytes_sent = 0

    def __init__(self, blocked_capability=True):
        self.client_properties = {'capabilities': {
            'connection.blocked': blocked_capability}}
        self.transport = FakeTransport()
        # py-amqp hands over views of a buffer it reuses: record copies.
        self.transport._write = (
            lambda data: self.transport.sent.append(bytes(data)))
        self.transport.having_timeout = (
            lambda timeout: contextlib.nullcontext())
        self.frame_writer = amqp.method_framing.frame_writer(
            self, self.transport)


def py_amqp_channel(connection):
    """A py-amqp Channel on ``connection``, without the channel.open."""
    channel = object.__new__(amqp.Channel)
    channel.connection = connection
    channel.channel_id = 1
    return channel


def test_publish_writes_what_py_amqp_basic_publish_writes_without_reading():
    # Fails loudly when py-amqp changes what it sends for basic.publish
    # (version range pinned in setup.py): publish() sends the method
    # itself, without basic_publish's read before each publish.
    message = Message({'message_id': '<m@test>'}, b'body', routing_key='key')
    ours = WritingConnection(blocked_capability=True)
    publish(py_amqp_channel(ours), message)
    theirs = WritingConnection(blocked_capability=False)  # no read first
    py_amqp_channel(theirs).basic_publish(
        amqp.Message(b'body', **message.header.properties()),
        exchange=message.exchange, routing_key='key')
    assert ours.transport.sent == theirs.transport.sent
    method_frame = ours.transport.sent[0]
    assert struct.unpack('>HH', method_frame[7:11]) == amqp.spec.Basic.Publish


def waits(channel):
    """The methods ``channel`` waits for from now on (recorded, not read)."""
    waited = []
    channel.wait = lambda method, returns_tuple=False: waited.append(method)
    return waited


def test_send_commit_writes_what_py_amqp_tx_commit_writes_in_one_go():
    # Fails loudly when py-amqp changes how tx_commit sends and waits
    # (version range pinned in setup.py).
    ours, theirs = WritingConnection(), WritingConnection()
    our_channel, their_channel = py_amqp_channel(ours), py_amqp_channel(theirs)
    we_waited, they_waited = waits(our_channel), waits(their_channel)
    op_channel = OpChannel(our_channel)
    op_channel.basic_ack(7)
    op_channel.send_commit()
    op_channel.wait_for_commit()
    their_channel.basic_ack(7)
    their_channel.tx_commit()
    assert len(ours.transport.sent) == 1
    assert ours.transport.sent == [b''.join(theirs.transport.sent)]
    assert we_waited == they_waited == [amqp.spec.Tx.CommitOk]


def test_publish_on_a_closed_channel_is_a_connection_error():
    with pytest.raises(amqp.exceptions.RecoverableConnectionError):
        publish(py_amqp_channel(None),
                Message({}, b'body', routing_key='key'))
