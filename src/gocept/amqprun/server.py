"""Server, the I/O thread: deliveries in, channel ops out.

Runs on: the I/O thread (``start``); ``send``, ``submit`` and ``stop`` may be
called from any thread. The server owns the one AMQP connection; no other
thread touches it. Its loop waits for socket data or a wake-up, turns each
delivery into a task for the workers, carries out the ops workers submitted
(committing all ops of one pass in one AMQP transaction per channel) and
keeps heartbeats flowing. When the connection is lost it fails every pending
op with ``ConnectionLost``, reconnects with capped exponential backoff,
re-declares and consumes again.
"""
import collections
import contextlib
import fcntl
import heapq
import itertools
import logging
import os
import queue
import select
import socket
import threading
import time

import amqp
import zope.component
import zope.interface

import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.session


log = logging.getLogger(__name__)


class Delivery:
    """Where a received message came from: connection generation and tag.

    A delivery tag only means something on the channel that delivered it;
    ``generation`` changes with every (re)connect, so a stale tag is never
    sent on a new channel.
    """

    def __init__(self, generation, tag):
        self.generation = generation
        self.tag = tag

    def __repr__(self):
        return '<Delivery %s/%s>' % (self.generation, self.tag)


class Task:
    """A received message and the handler it is for, queued for workers."""

    def __init__(self, message, handler, handler_name):
        self.message = message
        self.handler = handler
        self.handler_name = handler_name

    def __iter__(self):
        # (session-less) tuple unpacking: ``message, handler = task``
        return iter((self.message, self.handler))


class OpChannel:
    """The face of an AMQP channel that channel ops see."""

    def __init__(self, channel):
        self._channel = channel

    def basic_ack(self, delivery_tag):
        """Acknowledge a delivery (transactional)."""
        self._channel.basic_ack(delivery_tag)

    def basic_reject(self, delivery_tag, requeue):
        """Reject a delivery (transactional)."""
        self._channel.basic_reject(delivery_tag, requeue)

    def publish(self, message):
        """Publish a :class:`gocept.amqprun.message.Message`."""
        body = message.body if message.body is not None else b''
        self._channel.basic_publish(
            amqp.Message(body, **message.header.properties()),
            exchange=message.exchange, routing_key=message.routing_key or '')


@zope.interface.implementer(gocept.amqprun.interfaces.ILoop,
                            gocept.amqprun.interfaces.ISender)
class Server:
    """Owns the AMQP connection; runs the I/O loop in ``start()``."""

    #: Seconds the loop sleeps at most between two looks at the connection.
    poll_interval = 1.0

    def __init__(self, parameters, setup_handlers=True):
        self.parameters = parameters
        self.setup_handlers = setup_handlers
        #: Deliveries for the workers; bounded by the prefetch count.
        self.tasks = queue.Queue()
        #: Set by ``start()`` when it gave up (a FatalError), else None.
        self.error = None
        self.connection = None
        self.consuming = False
        self._ops = collections.deque()
        self._delayed = []
        self._sequence = itertools.count()
        self._running = threading.Event()
        self._should_stop = False
        self._stop_consuming = False
        self._generation = 0
        self._channel = None
        self._send_channel = None
        self._consumer_tags = []
        self._handlers = {}
        self._local = threading.local()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    # -- any thread ---------------------------------------------------------

    @property
    def running(self):
        """True while connected and serving."""
        return self._running.is_set()

    def wait_until_running(self, timeout=None):
        """Block until the server is connected (or ``timeout``)."""
        self._running.wait(timeout)
        return self.running

    def stop(self):
        """Make ``start()`` return: it closes the connection first."""
        log.info('Stopping message reader.')
        self._should_stop = True
        self._wake()

    def stop_consuming(self):
        """Cancel the consumers; deliveries already received stay queued."""
        self._stop_consuming = True
        self._wake()

    def submit(self, op):
        """Hand an :class:`IChannelOp` to the I/O thread."""
        self._ops.append(op)
        self._wake()

    def send(self, message):
        """Publish ``message`` when the caller's transaction commits."""
        self._session_for_thread().send(message)

    @contextlib.contextmanager
    def handling(self, session):
        """Context manager: ``send`` from this thread joins ``session``."""
        previous = getattr(self._local, 'session', None)
        self._local.session = session
        try:
            yield session
        finally:
            self._local.session = previous

    def _session_for_thread(self):
        session = getattr(self._local, 'session', None)
        if session is None:
            session = self._local.session = (
                gocept.amqprun.session.Session(self))
        return session

    def _wake(self):
        try:
            os.write(self._wake_w, b'!')
        except BlockingIOError:
            pass  # the pipe is full, so the loop will wake up anyway

    # -- the I/O thread -----------------------------------------------------

    def start(self):
        """Run the I/O loop until ``stop()``; reconnect when needed."""
        threading.current_thread().name = 'amqprun-io'
        log.info('Starting message reader.')
        try:
            self._run()
        except gocept.amqprun.interfaces.FatalError as e:
            self.error = e
            log.critical('%s', e)
        finally:
            self._running.clear()
            self._disconnect()
            self._fail_pending(gocept.amqprun.interfaces.ConnectionLost(
                'The server stopped'))
            log.info('Message reader stopped.')

    def _run(self):
        failures = 0
        ever_connected = False
        while not self._should_stop:
            try:
                self._connect()
            except gocept.amqprun.connection.CONNECTION_ERRORS as e:
                failures += 1
                self._disconnect()
                if (not ever_connected
                        and failures >= self.parameters.startup_attempts):
                    raise gocept.amqprun.interfaces.BrokerUnreachable(
                        'Cannot connect to the AMQP broker at %s: %s '
                        '(gave up after %d attempts)' % (
                            self.parameters.address, describe(e), failures))
                self._back_off(failures, e)
                continue
            failures = 0
            ever_connected = True
            self._running.set()
            try:
                self._serve()
            except gocept.amqprun.connection.CONNECTION_ERRORS as e:
                log.warning('Lost the connection to %s: %s',
                            self.parameters.address, describe(e))
                self._lose_connection()

    def _back_off(self, failures, error):
        delay = min(self.parameters.reconnect_delay * 2 ** (failures - 1),
                    self.parameters.reconnect_max_delay)
        log.warning('Cannot connect to the AMQP broker at %s: %s; '
                    'retrying in %.1f s', self.parameters.address,
                    describe(error), delay)
        self._sleep(delay)

    def _sleep(self, seconds):
        """Sleep, but wake up early when stop() is called."""
        deadline = time.monotonic() + seconds
        while not self._should_stop:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            select.select([self._wake_r], [], [], remaining)
            self._drain_wake_pipe()

    def _connect(self):
        self.connection = gocept.amqprun.connection.connect(self.parameters)
        self._generation += 1
        log.info('AMQP connection to %s opened.', self.parameters.address)
        self._channel = gocept.amqprun.connection.open_channel(
            self.connection)
        self._send_channel = gocept.amqprun.connection.open_channel(
            self.connection)
        if self.setup_handlers:
            self._declare_and_consume()

    def _declare_and_consume(self):
        handlers = list(zope.component.getUtilitiesFor(
            gocept.amqprun.interfaces.IHandler))
        gocept.amqprun.connection.check_unique_queues(handlers)
        channel = self._channel
        for name, handler in handlers:
            gocept.amqprun.connection.declare_queue(channel, handler, name)
        channel.tx_commit()  # declare does not need it, but binds in tx
        if self._stop_consuming or not handlers:
            return
        channel.basic_qos(0, self.parameters.prefetch_count, False)
        self._consumer_tags = []
        for name, handler in handlers:
            tag = channel.basic_consume(
                queue=handler.queue_name,
                callback=self._on_delivery_callback(handler, name))
            self._consumer_tags.append(tag)
        self.consuming = True
        log.info('Consuming %d queue(s) with prefetch %d.',
                 len(handlers), self.parameters.prefetch_count)

    def _on_delivery_callback(self, handler, name):
        generation = self._generation

        def on_delivery(amqp_message):
            self.on_delivery(amqp_message, handler, name, generation)
        return on_delivery

    def on_delivery(self, amqp_message, handler, name, generation):
        """Queue a task for the workers. Only that: py-amqp calls this from
        inside its frame reader, where no channel method may be used."""
        info = amqp_message.delivery_info
        message = gocept.amqprun.message.Message(
            gocept.amqprun.message.header_from_properties(
                amqp_message.properties),
            amqp_message.body,
            delivery_tag=info['delivery_tag'],
            routing_key=info['routing_key'],
            redelivered=info.get('redelivered', False),
            exchange=info.get('exchange'))
        message.delivery = Delivery(generation, info['delivery_tag'])
        log.debug("Received message %s via routing key '%s' for '%s'",
                  info['delivery_tag'], info['routing_key'], name)
        self.tasks.put(Task(message, handler, name))

    def _serve(self):
        sock = self.connection.transport.sock
        while not self._should_stop:
            self._cancel_consumers_if_asked()
            self._execute_ops()
            readable, _, _ = select.select(
                [sock, self._wake_r], [], [], self._poll_timeout())
            if self._wake_r in readable:
                self._drain_wake_pipe()
            if sock in readable:
                self._read_frames(sock)
            if self.connection.heartbeat:
                self.connection.heartbeat_tick()
        self._execute_ops()

    def _read_frames(self, sock):
        # One frame per blocking_read; go on while the socket has data, so
        # that a lone heartbeat frame never makes us wait for more.
        while True:
            try:
                self.connection.blocking_read(timeout=self.poll_interval)
            except socket.timeout:
                return
            if not select.select([sock], [], [], 0)[0] and not (
                    hasattr(sock, 'pending') and sock.pending()):
                return

    def _poll_timeout(self):
        timeout = self.poll_interval
        heartbeat = self.connection.heartbeat
        if heartbeat:
            timeout = min(timeout, heartbeat / 4.0)
        if self._ops:
            return 0
        if self._delayed:
            timeout = min(timeout, max(0, self._delayed[0][0] - time.time()))
        return timeout

    def _drain_wake_pipe(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _cancel_consumers_if_asked(self):
        if not (self._stop_consuming and self._consumer_tags):
            return
        for tag in self._consumer_tags:
            self._channel.basic_cancel(tag)
        self._consumer_tags = []
        self.consuming = False
        log.info('Stopped consuming.')

    def _take_due_ops(self):
        now = time.time()
        while self._ops:
            op = self._ops.popleft()
            if op.not_before > now:
                heapq.heappush(
                    self._delayed, (op.not_before, next(self._sequence), op))
            else:
                yield op
        while self._delayed and self._delayed[0][0] <= now:
            yield heapq.heappop(self._delayed)[2]

    def _execute_ops(self):
        """Execute all due ops; commit each channel's share once."""
        batches = {}
        for op in self._take_due_ops():
            if not op.claim():
                continue  # its waiter gave up; it must not happen now
            channel = self._channel_for(op)
            if channel is None:
                op.resolve(gocept.amqprun.interfaces.ConnectionLost(
                    'The channel of %r is gone; the broker redelivers it'
                    % op.delivery))
                continue
            batches.setdefault(id(channel), (channel, []))[1].append(op)
        for channel, ops in batches.values():
            self._commit_batch(channel, ops)

    def _channel_for(self, op):
        if op.delivery is None:
            return self._send_channel
        if op.delivery.generation != self._generation:
            return None
        return self._channel

    def _commit_batch(self, channel, ops):
        op_channel = OpChannel(channel)
        executed = []
        try:
            for op in ops:
                op.execute(op_channel)
                executed.append(op)
            channel.tx_commit()
        except gocept.amqprun.connection.CONNECTION_ERRORS as e:
            error = gocept.amqprun.interfaces.CommitFailed(
                'AMQP commit failed: %s' % describe(e))
            for op in ops:
                op.resolve(error)
            raise
        for op in executed:
            op.resolve()
        log.debug('Committed %d op(s) in one AMQP transaction', len(ops))

    def _lose_connection(self):
        self._running.clear()
        self.consuming = False
        self._disconnect()
        self._fail_pending(gocept.amqprun.interfaces.ConnectionLost(
            'The connection to the broker was lost'))

    def _fail_pending(self, error):
        pending = list(self._ops) + [item[2] for item in self._delayed]
        self._ops.clear()
        self._delayed = []
        for op in pending:
            op.resolve(error)

    def _disconnect(self):
        connection, self.connection = self.connection, None
        self._channel = self._send_channel = None
        self._consumer_tags = []
        if connection is None:
            return
        try:
            connection.close()
        except Exception:
            try:
                connection.collect()
            except Exception:  # pragma: no cover (cleanup after a failure)
                pass


def describe(error):
    """One line describing a connection error."""
    text = str(error) or error.__class__.__name__
    return '%s: %s' % (error.__class__.__name__, text) \
        if error.__class__.__name__ not in text else text
