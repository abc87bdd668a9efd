"""Server, the I/O thread: the connection and the loop.

Runs on: the I/O thread (``start``); ``send``, ``submit``, ``stop`` and
``stop_consuming`` may be called from any thread (see ``IServer``). The
server owns the one AMQP connection; no other thread touches it. Its loop
waits for socket data or a wake-up, turns each delivery into a task for the
workers, has the commit queue (``commits``) carry out the ops workers
submitted and keeps heartbeats flowing. When the connection is lost it fails
the pending ops of the lost connection with ``ConnectionLost`` (sends not yet
carried out wait for the next connection), drops the deliveries no worker
took yet, reconnects with capped exponential backoff, re-declares
(``topology``) and consumes again.
"""
import contextlib
import fcntl
import logging
import os
import queue
import select
import socket
import threading
import time

import amqp
import amqp.exceptions
import zope.component
import zope.interface

import gocept.amqprun.commits
import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.process
import gocept.amqprun.session
import gocept.amqprun.topology
from gocept.amqprun.connection import describe


log = logging.getLogger(__name__)


class Delivery:
    """Where a received message came from: connection generation and tag.

    A delivery tag only means something on the channel that delivered it;
    ``generation`` changes with every (re)connect, so a stale tag is never
    sent on a new channel.
    """

    def __init__(self, generation, tag, received=None):
        self.generation = generation
        self.tag = tag
        #: ``time.monotonic()`` when it arrived: tells which of the
        #: deliveries in flight a broker ``consumer_timeout`` was about.
        self.received = time.monotonic() if received is None else received

    def __repr__(self):
        return '<Delivery %s/%s>' % (self.generation, self.tag)


class Task:
    """A received message and the handler it is for, queued for workers."""

    def __init__(self, message, handler, handler_name):
        self.message = message
        self.handler = handler
        self.handler_name = handler_name


@zope.interface.implementer(gocept.amqprun.interfaces.IServer)
class Server(gocept.amqprun.process.LoopState):
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
        self.history = gocept.amqprun.connection.ConnectionHistory()
        self.commits = gocept.amqprun.commits.CommitQueue(self.history)
        super().__init__()
        self._should_stop = False
        self._stop_consuming = False
        self._channel = None
        self._send_channel = None
        self._consumer_tags = []
        self._next_heartbeat_tick = 0
        self._local = threading.local()
        self._wake_r, self._wake_w = os.pipe()
        #: True from a wake-up byte's write until the loop has drained it:
        #: meanwhile further wake-ups need no write (see ``_wake``).
        self._wake_pending = False
        for fd in (self._wake_r, self._wake_w):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    # -- any thread ---------------------------------------------------------

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
        self.commits.submit(op)
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
        # One write per loop pass, not per submit: while a byte is pending
        # the loop is bound to look at the op queue after draining it
        # (``_drain_wake_pipe`` clears the flag only after the read, so an
        # op queued before a skipped write is seen by the pass that
        # follows the drain).
        if self._wake_pending:
            return
        self._wake_pending = True
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
        except Exception as e:
            # A bug, not the broker: stop (non-zero exit) rather than spin.
            self.error = e
            log.critical('The I/O thread failed: %s', describe(e),
                         exc_info=True)
        finally:
            self._running.clear()
            self._disconnect()
            self.commits.fail_pending(
                gocept.amqprun.interfaces.ConnectionLost(
                    'The server stopped'))
            log.info('Committed %d op(s) in %d AMQP transaction(s).',
                     self.commits.committed_ops, self.commits.transactions)
            log.info('Message reader stopped.')

    def _run(self):
        failures = 0
        ever_connected = False
        while not self._should_stop:
            try:
                self._connect()
            except gocept.amqprun.interfaces.AccessRefused as e:
                if not ever_connected:
                    raise  # wrong credentials or vhost: fatal at once
                # Once we were in, a refusal may be a vhost that is still
                # starting after a broker restart: keep trying.
                failures += 1
                self._disconnect(graceful=False)
                self._back_off(failures, e)
                continue
            except gocept.amqprun.connection.CONNECTION_ERRORS as e:
                failures += 1
                self._disconnect(graceful=False)
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
                self._lose_connection(e)

    def _back_off(self, failures, error):
        delay = min(self.parameters.reconnect_delay * 2 ** (failures - 1),
                    self.parameters.reconnect_max_delay)
        log.warning('Cannot connect to the AMQP broker at %s: %s; '
                    'retrying in %.1f s', self.parameters.address,
                    describe(error), delay)
        self._sleep(delay)

    def _sleep(self, seconds):
        """Sleep, but wake up early when stop() is called.

        Disconnected meanwhile: an op submitted for a delivery fails at
        once (its tag is dead) instead of waiting for the next connection
        until its waiter gives up; sends wait for the next connection.
        """
        deadline = time.monotonic() + seconds
        while not self._should_stop:
            self.commits.fail_pending(stale_only=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            select.select([self._wake_r], [], [], remaining)
            self._drain_wake_pipe()

    def _connect(self):
        self.connection = gocept.amqprun.connection.connect(self.parameters)
        self.history.connected()
        self._next_heartbeat_tick = 0
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
        channel = self._channel
        gocept.amqprun.topology.declare(channel, handlers)
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
        generation = self.history.generation

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
            self._commit_due()
            readable, _, _ = select.select(
                [sock, self._wake_r], [], [], self._poll_timeout())
            if self._wake_r in readable:
                self._drain_wake_pipe()
            if sock in readable or gocept.amqprun.connection.has_buffered_data(
                    self.connection):
                self._read_frames(sock)
            self._tick_heartbeat()
        self._commit_due()

    def _tick_heartbeat(self, now=None):
        """Have py-amqp send and check heartbeats, once per quarter of the
        heartbeat interval rather than on every pass (it logs two DEBUG
        lines per call; traffic counts as a heartbeat either way)."""
        heartbeat = self.connection.heartbeat
        now = time.monotonic() if now is None else now
        if not heartbeat or now < self._next_heartbeat_tick:
            return
        self._next_heartbeat_tick = now + heartbeat / 4.0
        self.connection.heartbeat_tick()

    def _commit_due(self):
        self.commits.commit_due(self._channel, self._send_channel)

    def _read_frames(self, sock):
        # One frame per blocking_read; go on while the socket or the
        # transport's read buffer has data, so that a lone heartbeat frame
        # never makes us wait for more, and select never waits for frames
        # that were read already.
        while True:
            try:
                self.connection.blocking_read(timeout=self.poll_interval)
            except socket.timeout:
                return
            if gocept.amqprun.connection.has_buffered_data(
                    self.connection):
                continue
            if not select.select([sock], [], [], 0)[0] and not (
                    hasattr(sock, 'pending') and sock.pending()):
                return

    def _poll_timeout(self):
        if gocept.amqprun.connection.has_buffered_data(self.connection):
            # Frames read along with the answer to tx_commit wait in the
            # transport's buffer, where select does not see them.
            return 0
        timeout = self.poll_interval
        heartbeat = self.connection.heartbeat
        if heartbeat:
            timeout = min(timeout, heartbeat / 4.0)
        return self.commits.poll_timeout(timeout)

    def _drain_wake_pipe(self):
        # One read is enough: bytes left over only cause one more pass.
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        # Only after the read: cleared before it, a wake-up written in
        # between would be read away while the caller has already looked
        # at the op queue, and its op would wait for the poll timeout.
        self._wake_pending = False

    def _cancel_consumers_if_asked(self):
        if not (self._stop_consuming and self._consumer_tags):
            return
        for tag in self._consumer_tags:
            self._channel.basic_cancel(tag)
        self._consumer_tags = []
        self.consuming = False
        log.info('Stopped consuming.')

    def _lose_connection(self, error=None):
        """Log the loss, drop what belongs to the dead connection."""
        if error is None:
            error = gocept.amqprun.interfaces.ConnectionLost(
                'The connection to the broker was lost')
        loss = self.history.lose(error, time.monotonic())
        if loss.ack_timeout is not None:
            log.warning(
                'The broker closed the channel: a delivery was not '
                'acknowledged within its consumer_timeout (%s). Every '
                'message in flight is redelivered, flagged redelivered; '
                'make handlers faster or raise consumer_timeout. '
                'Reconnecting.', describe(error))
        else:
            log.warning('Lost the connection to %s: %s; reconnecting',
                        self.parameters.address, describe(error))
        self._running.clear()
        self.consuming = False
        # A dead or stalled peer never answers connection.close; a closed
        # channel leaves a connection that can be closed properly.
        self._disconnect(graceful=isinstance(error, (
            amqp.exceptions.ChannelError,
            gocept.amqprun.interfaces.ConnectionLost)))
        self._discard_queued_tasks()
        self.commits.fail_pending(stale_only=True)

    def _discard_queued_tasks(self):
        """Drop deliveries no worker took yet: their tags are dead.

        The broker redelivers them; handling them now would only run the
        handler for a commit that must fail.
        """
        kept = []
        discarded = 0
        while True:
            try:
                item = self.tasks.get_nowait()
            except queue.Empty:
                break
            self.tasks.task_done()
            if isinstance(item, Task):
                discarded += 1
            else:
                kept.append(item)  # e.g. a worker's stop sentinel
        for item in kept:
            self.tasks.put(item)
        if discarded:
            log.info('Dropped %d queued delivery(s) of the lost connection; '
                     'the broker redelivers them', discarded)

    def _disconnect(self, graceful=True):
        """Forget the connection; close it (``graceful``) or drop it."""
        connection, self.connection = self.connection, None
        self._channel = self._send_channel = None
        self._consumer_tags = []
        if connection is None:
            return
        if graceful:
            try:
                connection.close()
                return
            except Exception:
                pass
        try:
            connection.collect()
        except Exception:  # pragma: no cover (cleanup after a failure)
            pass
