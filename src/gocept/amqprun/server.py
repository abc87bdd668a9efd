"""Server, the I/O thread: deliveries in, channel ops out.

Runs on: the I/O thread (``start``); ``send``, ``submit`` and ``stop`` may be
called from any thread. The server owns the one AMQP connection; no other
thread touches it. Its loop waits for socket data or a wake-up, turns each
delivery into a task for the workers, carries out the ops workers submitted
(committing all ops of one pass in one AMQP transaction per channel) and
keeps heartbeats flowing. When the connection is lost it fails the pending
ops of the lost connection with ``ConnectionLost`` (sends not yet carried
out wait for the next connection), drops the deliveries no worker took yet,
reconnects with capped exponential backoff, re-declares and consumes again.
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
import amqp.exceptions
import zope.component
import zope.interface

import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.session
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
        #: generation -> Loss, for the last few lost connections
        self._losses = {}
        self._channel = None
        self._send_channel = None
        self._consumer_tags = []
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
        except Exception as e:
            # A bug, not the broker: stop (non-zero exit) rather than spin.
            self.error = e
            log.critical('The I/O thread failed: %s', describe(e),
                         exc_info=True)
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
            self._fail_pending(None, stale_only=True)
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
        # One read is enough: bytes left over only cause one more pass.
        try:
            os.read(self._wake_r, 4096)
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
                op.resolve(self._stale_error(op.delivery))
                continue
            batches.setdefault(id(channel), (channel, []))[1].append(op)
        batches = list(batches.values())
        for number, (channel, ops) in enumerate(batches):
            try:
                self._commit_batch(channel, ops)
            except gocept.amqprun.connection.CONNECTION_ERRORS:
                # The other channels' batches were taken from _ops already:
                # resolve them here or their waiters hang.
                for _, others in batches[number + 1:]:
                    self._give_up_unexecuted(others)
                raise

    def _give_up_unexecuted(self, ops):
        """Ops claimed but not executed when the connection failed.

        Sends go back to the queue for the next connection (nothing of
        them reached the broker); ops on deliveries fail.
        """
        for op in ops:
            if op.delivery is None:
                op.unclaim()
                self._ops.append(op)
            else:
                op.resolve(self._stale_error(op.delivery))

    def _channel_for(self, op):
        if op.delivery is None:
            return self._send_channel
        if op.delivery.generation != self._generation:
            return None
        return self._channel

    def _commit_batch(self, channel, ops):
        """Execute ``ops`` and commit them in one AMQP transaction.

        An op that cannot be carried out (``CommitFailed`` from its
        ``execute``) fails alone: the transaction is rolled back and the
        others are executed again. A connection error fails them all and
        propagates (the caller reconnects).
        """
        op_channel = gocept.amqprun.connection.OpChannel(channel)
        ops = list(ops)
        while ops:
            failed = error = None
            committing = False
            try:
                for op in ops:
                    try:
                        op.execute(op_channel)
                    except gocept.amqprun.interfaces.CommitFailed as e:
                        failed, error = op, e
                        break
                if failed is None:
                    committing = True
                    channel.tx_commit()
                else:
                    channel.tx_rollback()
            except gocept.amqprun.connection.CONNECTION_ERRORS as e:
                self._fail_batch(ops, e, committing)
                raise
            if failed is None:
                break
            log.debug('%r failed, the others are tried again: %s',
                      failed, error)
            failed.resolve(error)
            ops.remove(failed)
        for op in ops:
            op.resolve()
        log.debug('Committed %d op(s) in one AMQP transaction', len(ops))

    def _fail_batch(self, ops, error, committing=True):
        """Resolve the ops of a transaction the connection failed in.

        Before ``tx.commit`` was sent nothing of them can have been
        committed: sends are kept for the next connection, the others fail
        with the loss's error. After it the outcome is unknown
        (``CommitInDoubt``), unless the broker said no (``CommitFailed``).
        """
        loss = self._record_loss(error)
        if not committing:
            self._give_up_unexecuted(ops)
            return
        in_doubt = gocept.amqprun.interfaces.CommitInDoubt(
            'The connection was lost during the AMQP commit (%s); outcome '
            'unknown, the broker redelivers the message unless it '
            'committed' % describe(error))
        if loss.ack_timeout is not None:
            # The consumer channel was closed before our commit on it was
            # handled (else its commit-ok would have come first); a send
            # committed on the other channel meanwhile may have gone through.
            for op in ops:
                op.resolve(in_doubt if op.delivery is None
                           else loss.error_for(op.delivery))
            return
        if isinstance(error, amqp.exceptions.ChannelError):
            # The broker refused something in this transaction (e.g. a
            # publish to a missing exchange) and closed the channel; every
            # op of it counts as failed.
            failure = gocept.amqprun.interfaces.CommitFailed(
                'The broker refused the AMQP transaction: %s'
                % describe(error))
        else:
            log.warning('Connection lost while committing %d op(s): the '
                        'broker may or may not have committed them; what '
                        'it did not commit comes back redelivered',
                        len(ops))
            failure = in_doubt
        for op in ops:
            op.resolve(failure)

    def _record_loss(self, error):
        """Remember why the current connection was lost (first reason)."""
        loss = self._losses.get(self._generation)
        if loss is None:
            loss = gocept.amqprun.connection.Loss.of(error, time.monotonic())
            self._losses[self._generation] = loss
            for generation in list(self._losses):
                if generation < self._generation - 10:
                    del self._losses[generation]
        return loss

    def _stale_error(self, delivery):
        """The error for an op on a delivery of a lost connection."""
        loss = self._losses.get(delivery.generation)
        if loss is None:
            return gocept.amqprun.interfaces.ConnectionLost(
                'The channel of %r is gone; the broker redelivers it'
                % delivery)
        return loss.error_for(delivery)

    def _lose_connection(self, error=None):
        """Log the loss, drop what belongs to the dead connection."""
        if error is None:
            error = gocept.amqprun.interfaces.ConnectionLost(
                'The connection to the broker was lost')
        loss = self._record_loss(error)
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
        self._fail_pending(None, stale_only=True)

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

    def _fail_pending(self, error, stale_only=False):
        """Resolve pending ops with ``error`` (or their loss's error).

        With ``stale_only`` sends not yet carried out stay queued for the
        next connection: nothing of them reached the broker.
        """
        pending = []
        while True:
            try:
                pending.append(self._ops.popleft())
            except IndexError:
                break
        pending.extend(item[2] for item in self._delayed)
        self._delayed = []
        for op in pending:
            if stale_only and op.delivery is None:
                self._ops.append(op)
            elif error is None:
                op.resolve(self._stale_error(op.delivery))
            else:
                op.resolve(error)

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
