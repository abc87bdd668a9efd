"""Server, the I/O thread: the connection and the loop.

Runs on: the I/O thread (``start``); ``send``, ``submit``, ``stop`` and
``stop_consuming`` may be called from any thread (see ``IServer``). The
server owns the one AMQP connection; no other thread touches it. Its loop
waits for socket data or a wake-up, turns each delivery into a task for the
workers, has the commit queue (``commits``) carry out the ops workers
submitted and keeps heartbeats flowing. When the connection is lost it fails
the pending ops of the lost connection with ``ConnectionLost`` (sends not yet
carried out wait for the next connection), drops the deliveries no worker
took yet, reconnects, re-declares the exchanges and queues (``topology``)
and consumes again.

Several broker nodes: a connect attempt is one round over the nodes,
starting after the node that was lost (so a dead node is not the first one
tried again); only between failed rounds does the server back off (capped
exponential). While the broker blocks publishing (``connection.blocked``,
a resource alarm) ops that publish are held in the commit queue and the
loop goes on reading frames, so heartbeats and acks keep flowing and a stop
stays bounded.
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


#: Errors of a connect attempt that the next attempt may not see: the
#: network, the broker, a queue that is unavailable while a cluster heals.
RETRYABLE_CONNECT_ERRORS = gocept.amqprun.connection.CONNECTION_ERRORS + (
    gocept.amqprun.interfaces.QueueUnavailable,)

#: Errors of a connect attempt that retrying the same node cannot fix.
FATAL_CONNECT_ERRORS = (gocept.amqprun.interfaces.AccessRefused,
                        gocept.amqprun.interfaces.TLSError)


class Delivery:
    """Where a received message came from: connection generation and tag.

    A delivery tag only means something on the channel that delivered it;
    ``generation`` changes with every (re)connect, so a stale tag is never
    sent on a new channel. ``key`` names the message across redeliveries
    (see :func:`gocept.amqprun.message.redelivery_key`).
    """

    def __init__(self, generation, tag, received=None, key=None):
        self.generation = generation
        self.tag = tag
        self.key = key
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
    """Owns the AMQP connection; runs the I/O loop in ``start()``.

    ``workers`` is how many worker threads take its tasks (None: not
    known); a group commit waits only for deliveries they can take (see
    ``commits.Gathering``).
    """

    #: Seconds the loop sleeps at most between two looks at the connection.
    poll_interval = 1.0

    def __init__(self, parameters, setup_handlers=True, workers=None):
        self.parameters = parameters
        self.setup_handlers = setup_handlers
        #: Deliveries for the workers; bounded by the prefetch count.
        self.tasks = queue.Queue()
        #: Set by ``start()`` when it gave up (a FatalError), else None.
        self.error = None
        self.connection = None
        self.consuming = False
        #: None, or the broker's reason while it blocks publishing.
        self.blocked = None
        #: ``host:port`` of the connected node, or None.
        self.node = None
        #: ``time.monotonic()`` of the loop's latest turn (liveness).
        self.last_turn = None
        self.history = gocept.amqprun.connection.ConnectionHistory()
        self.commits = gocept.amqprun.commits.CommitQueue(
            self.history, parameters.commit_delay, workers)
        self.commit_observers = self.commits.observers
        super().__init__()
        self._should_stop = False
        self._stop_consuming = False
        self._channel = None
        self._send_channel = None
        #: The connection's socket, for ``_abort_blocked_io()``.
        self._socket = None
        self._scratch = None
        self._consumer_tags = []
        #: Index in ``parameters.nodes`` where the next round starts.
        self._first_node = 0
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

    @property
    def max_message_size(self):
        """The largest body ``send`` accepts (the parameters')."""
        return self.parameters.max_message_size

    @property
    def republishing(self):
        """How many refused messages wait to be published again."""
        return self.commits.republishing

    @property
    def held(self):
        """How many commits are held (blocked broker, refused messages)."""
        return self.commits.held

    def stop(self):
        """Make ``start()`` return: it closes the connection first.

        While the broker blocks publishing it drops the connection instead
        (see ``_abort_blocked_io()``): stopping stays bounded.
        """
        log.info('Stopping message reader.')
        self._should_stop = True
        self._wake()
        if self.blocked is not None:
            self._abort_blocked_io()

    def _abort_blocked_io(self):
        """End a broker call the I/O thread waits for in vain.

        RabbitMQ announces ``connection.blocked`` only once it has stopped
        reading the connection, i.e. after the publish of a commit: that
        commit's ``tx.commit`` waits for the unblock, however long.
        Shutting the socket down (safe from any thread; the plain socket's
        method, so that a TLS socket's state is left to the I/O thread)
        makes the wait fail like a lost connection. The broker never read
        the commit: its messages go back to the broker.
        """
        sock = self._socket
        if sock is None:
            return
        log.warning('Dropping the connection to %s, blocked by the broker '
                    '(%s): what it has not committed goes back to the '
                    'broker', self.node, self.blocked)
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # closed meanwhile: the I/O thread is not waiting on it

    def stop_consuming(self):
        """Cancel the consumers; deliveries already received stay queued."""
        self._stop_consuming = True
        self._wake()

    def submit(self, op):
        """Hand an ``IChannelOp`` to the I/O thread."""
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
        if not self.parameters.authenticates_broker:
            log.warning('TLS without verification (ssl_verify false): the '
                        'connection to %s is encrypted but not '
                        'authenticated; anyone on the network path can pose '
                        'as the broker', self.parameters.address)
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
            self._fail_unfinished()
            log.info('Committed %d op(s) in %d AMQP transaction(s).',
                     self.commits.committed_ops, self.commits.transactions)
            log.info('Message reader stopped.')

    def _fail_unfinished(self):
        """At the end: what was not carried out goes back to the broker."""
        unfinished = self.commits.fail_pending(
            gocept.amqprun.interfaces.ConnectionLost('The server stopped'))
        if unfinished:
            log.warning('%d commit(s) were not carried out before the '
                        'connection closed: nothing of them was published; '
                        'the messages they were to acknowledge go back to '
                        'the broker', unfinished)

    def _run(self):
        rounds = 0  # failed rounds in a row
        ever_connected = False
        while not self._should_stop:
            try:
                self._connect_some_node(fatal=not ever_connected)
            except RETRYABLE_CONNECT_ERRORS as e:
                rounds += 1
                if (not ever_connected
                        and rounds >= self.parameters.startup_attempts):
                    raise gocept.amqprun.interfaces.BrokerUnreachable(
                        'Cannot connect to the AMQP broker at %s: %s '
                        '(gave up after %d attempts)' % (
                            self.parameters.address, describe(e), rounds))
                self._back_off(rounds, e)
                continue
            if self._should_stop:
                break
            rounds = 0
            ever_connected = True
            self._running.set()
            try:
                self._serve()
            except gocept.amqprun.connection.CONNECTION_ERRORS as e:
                self._lose_connection(e)

    def _connect_some_node(self, fatal):
        """One round: connect to the first node that answers.

        The round starts at ``_first_node`` and goes round the list once.
        A refusal (credentials, TLS) is raised at once when ``fatal`` (at
        start-up); later it is logged and the next node is tried. Raises
        the last node's error when none answered.
        """
        nodes = self.parameters.nodes
        error = None
        for offset in range(len(nodes)):
            if self._should_stop:
                return
            index = (self._first_node + offset) % len(nodes)
            try:
                self._connect(nodes[index])
            except FATAL_CONNECT_ERRORS as e:
                self._disconnect(graceful=False)
                if fatal:
                    raise
                # Once we were in, a refusal may be a vhost that is still
                # starting after a broker restart, or one node's
                # certificate: the others may do.
                log.log(logging.CRITICAL if isinstance(
                    e, gocept.amqprun.interfaces.TLSError)
                    else logging.WARNING, '%s', e)
                error = e
            except RETRYABLE_CONNECT_ERRORS as e:
                self._disconnect(graceful=False)
                log.warning('Cannot connect to the AMQP broker at %s: %s',
                            nodes[index], describe(e))
                error = e
            else:
                # After a loss of this node, start with the next one.
                self._first_node = (index + 1) % len(nodes)
                return
        raise error

    def _back_off(self, rounds, error):
        delay = min(self.parameters.reconnect_delay * 2 ** (rounds - 1),
                    self.parameters.reconnect_max_delay)
        log.warning('No AMQP broker node of %s answered (%s); retrying in '
                    '%.1f s', self.parameters.address, describe(error),
                    delay)
        self._sleep(delay)

    def _sleep(self, seconds):
        """Sleep, but wake up early when stop() is called.

        Disconnected meanwhile: an op submitted for a delivery fails at
        once (its tag is dead) instead of waiting for the next connection
        until its waiter gives up; sends wait for the next connection.
        """
        deadline = time.monotonic() + seconds
        while not self._should_stop:
            self.last_turn = now = time.monotonic()
            self.commits.fail_pending(stale_only=True)
            remaining = deadline - now
            if remaining <= 0:
                return
            # Wake up every poll_interval: the loop still turns (liveness).
            select.select([self._wake_r], [], [],
                          min(remaining, self.poll_interval))
            self._drain_wake_pipe()

    def _connect(self, node):
        log.debug('Connecting to the AMQP broker at %s', node)
        self.connection = gocept.amqprun.connection.connect(
            self.parameters, node, on_blocked=self._on_blocked,
            on_unblocked=self._on_unblocked)
        self.node = node.address
        self._socket = self.connection.transport.sock
        self.history.connected()
        self._next_heartbeat_tick = 0
        log.info('AMQP connection to %s opened.', node)
        self._channel = gocept.amqprun.connection.open_channel(
            self.connection)
        self._send_channel = gocept.amqprun.connection.open_channel(
            self.connection)
        self._scratch = gocept.amqprun.connection.ScratchChannel(
            self.connection)
        if self.setup_handlers:
            self._declare_and_consume()

    def _declare_and_consume(self):
        handlers = list(zope.component.getUtilitiesFor(
            gocept.amqprun.interfaces.IHandler))
        exchanges = [exchange for _, exchange in zope.component
                     .getUtilitiesFor(gocept.amqprun.interfaces.IExchange)]
        channel = self._channel
        gocept.amqprun.topology.declare(channel, handlers, exchanges)
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
        message.delivery = Delivery(
            generation, info['delivery_tag'],
            key=gocept.amqprun.message.redelivery_key(message))
        log.debug("Received message %s via routing key '%s' for '%s'",
                  info['delivery_tag'], info['routing_key'], name)
        self.commits.delivered(message.delivery)
        self.tasks.put(Task(message, handler, name))

    def _serve(self):
        sock = self.connection.transport.sock
        while not self._should_stop:
            self.last_turn = time.monotonic()
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
        self.commits.republish_now()  # stopping: their last chance
        self._commit_due(gather=False)  # stopping: wait for nothing

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

    def _commit_due(self, gather=True):
        self.commits.commit_due(
            self._channel, self._send_channel, self._scratch,
            blocked=self.blocked is not None, gather=gather)

    def _on_blocked(self, reason=None):
        """py-amqp calls it from inside a frame read: only take note."""
        self.blocked = reason or 'no reason given'
        log.warning('publishing blocked by the broker: %s; commits wait '
                    '(node %s)', self.blocked, self.node)

    def _on_unblocked(self):
        """py-amqp calls it from inside a frame read: only take note; the
        next pass of the loop carries out the held commits."""
        log.info('publishing unblocked by the broker; %d held commit(s) '
                 'go ahead (node %s)', self.held, self.node)
        self.blocked = None

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
            log.warning('Lost the connection to %s: %s; %s', self.node,
                        describe(error),
                        'stopping' if self._should_stop else 'reconnecting')
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
        self._channel = self._send_channel = self._scratch = None
        self._consumer_tags = []
        # A blocked connection may not be read by the broker: close-ok
        # would never come.
        graceful = graceful and self.blocked is None
        self.node = self.blocked = self._socket = None
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
