"""Publishing numbered messages and counting the replies, independently.

Runs on: the test thread. Both helpers use connections of their own (plain
py-amqp, straight to the broker, never through a fault proxy), so what they
count does not depend on the daemon under test.
"""
import collections
import socket
import threading
import time
import uuid

import amqp


def message_id(body):
    """The message id :func:`publish` and :class:`Producer` give ``body``.
    """
    return '<%s@faults>' % body.decode()


#: Arguments of a reply queue that is full once it holds three messages
#: and then refuses what comes on top.
FULL = {'x-max-length': 3, 'x-overflow': 'reject-publish'}


def numbered(count, prefix=None):
    """``count`` distinct bodies ``b'<prefix>:<n>'`` (prefix: unique run)."""
    prefix = prefix or uuid.uuid4().hex[:8]
    return [('%s:%d' % (prefix, number)).encode() for number in range(count)]


def connect(broker, virtual_host):
    """A py-amqp connection to ``broker`` (a ``testing.Broker``)."""
    connection = amqp.Connection(
        host='%s:%s' % (broker.hostname, broker.port),
        userid=broker.username, password=broker.password,
        virtual_host=virtual_host)
    connection.connect()
    return connection


def close_quietly(connection):
    """Close ``connection``; it may be dead already (a broker restart)."""
    try:
        connection.close()
    except Exception:
        connection.collect()


def declare_queue(broker, virtual_host, queue, routing_key, arguments=None):
    """Declare and bind a handler's queue as the daemon will, so that
    messages published before the daemon starts wait for it."""
    connection = connect(broker, virtual_host)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, auto_delete=False,
                              arguments=arguments)
        channel.queue_bind(queue, 'amq.topic', routing_key)
    finally:
        connection.close()


def publish(broker, virtual_host, bodies, routing_key, headers=None):
    """Publish persistent messages to ``amq.topic`` on a fresh connection.

    Closing the connection waits for the broker's close-ok, which it sends
    after routing every message published before.
    """
    connection = connect(broker, virtual_host)
    try:
        channel = connection.channel()
        for body in bodies:
            channel.basic_publish(
                amqp.Message(body, delivery_mode=2,
                             message_id=message_id(body),
                             application_headers=dict(headers or {})),
                exchange='amq.topic', routing_key=routing_key)
    finally:
        connection.close()


class Producer(threading.Thread):
    """Publishes ``bodies`` in a thread, each confirmed by the broker.

    ``nodes`` are tried in turn (anything with host, port and user, e.g.
    cluster nodes): when the connection to one fails, the producer moves
    to the next and publishes the unconfirmed body again. That body is
    *in doubt* (the broker may have taken it before the failure), so a
    second copy of it without the redelivered flag is no fault of the
    daemon: :attr:`in_doubt` names them. ``interval`` seconds pass
    between two messages (a trickle).
    """

    def __init__(self, nodes, virtual_host, bodies, routing_key,
                 interval=0):
        super().__init__(name='faults-producer', daemon=True)
        self.nodes = list(nodes)
        self.virtual_host = virtual_host
        self.bodies = list(bodies)
        self.routing_key = routing_key
        self.interval = interval
        #: How many bodies the broker confirmed so far.
        self.confirmed = 0
        #: Bodies published again after a failure.
        self.in_doubt = set()
        #: The connection failures, as text.
        self.failures = []
        self._stop_event = threading.Event()

    def _done(self):
        return (self.confirmed >= len(self.bodies)
                or self._stop_event.is_set())

    def run(self):
        index = 0
        while not self._done():
            try:
                with connect(self.nodes[index],
                             self.virtual_host) as connection:
                    self._publish(connection.channel())
            except Exception as e:
                self.failures.append('%s: %r' % (
                    self.nodes[index].port, e))
                self.in_doubt.update(
                    self.bodies[self.confirmed:self.confirmed + 1])
                index = (index + 1) % len(self.nodes)
                time.sleep(0.1)

    def _publish(self, channel):
        """Publish on ``channel`` until done; each waits for its confirm
        (``basic_publish`` does not, even after ``confirm_select``)."""
        while not self._done():
            body = self.bodies[self.confirmed]
            channel.basic_publish_confirm(
                amqp.Message(body, delivery_mode=2,
                             message_id=message_id(body)),
                exchange='amq.topic', routing_key=self.routing_key,
                confirm_timeout=30)
            self.confirmed += 1
            time.sleep(self.interval)

    def stop(self):
        """Stop publishing; join the thread."""
        self._stop_event.set()
        self.join(30)
        assert not self.is_alive(), 'the producer did not stop'

    def finish(self, timeout=60):
        """Wait until every body is confirmed; join the thread."""
        self.join(timeout)
        assert self.confirmed == len(self.bodies), (
            'only %d of %d published' % (self.confirmed, len(self.bodies)))


class Replies:
    """Consumes from a queue bound to ``routing_key``; counts bodies.

    ``queue`` None: an exclusive queue living as long as this client. A
    name: a durable queue (it survives a broker restart; delete it with
    :meth:`delete`), declared with ``arguments`` (a quorum queue survives
    the loss of a cluster node).
    """

    def __init__(self, broker, virtual_host, routing_key, queue=None,
                 arguments=None):
        self.connection = connect(broker, virtual_host)
        self.channel = self.connection.channel()
        if queue is None:
            queue, _, _ = self.channel.queue_declare(exclusive=True)
        else:
            self.channel.queue_declare(queue, durable=True,
                                       auto_delete=False,
                                       arguments=arguments)
        self.queue = queue
        self.channel.queue_bind(queue, 'amq.topic', routing_key)
        #: body -> [redelivered flag of each copy]
        self.copies = collections.defaultdict(list)
        #: every message received, in order
        self.messages = []
        self.channel.basic_consume(queue, callback=self._on_message,
                                   no_ack=True)

    def _on_message(self, message):
        self.messages.append(message)
        headers = message.properties.get('application_headers') or {}
        self.copies[message.body].append(bool(headers.get('redelivered')))

    def close(self):
        close_quietly(self.connection)

    def delete(self):
        """Delete a durable queue and close."""
        self.channel.queue_delete(self.queue)
        self.close()

    def drain(self, seconds):
        """Receive for ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                self.connection.drain_events(timeout=min(remaining, 0.2))
            except socket.timeout:
                pass

    def wait_until(self, condition, timeout, message):
        """Receive until ``condition()``; AssertionError after timeout.

        ``message`` (text, or a function returning it) explains a failure.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                text = message() if callable(message) else message
                raise AssertionError('%s (after %s s)' % (text, timeout))
            self.drain(0.1)

    def wait_for_count(self, count, timeout=30):
        """Wait until ``count`` distinct bodies arrived."""
        self.wait_until(lambda: len(self.copies) >= count, timeout,
                        lambda: 'Only %d of %d replies arrived'
                        % (len(self.copies), count))

    def wait_for(self, bodies, timeout=60):
        """Wait until every one of ``bodies`` arrived."""
        wanted = set(bodies)
        self.wait_until(
            lambda: wanted <= self.copies.keys(), timeout,
            lambda: self._missing_text(wanted))

    def missing(self, bodies):
        """Those of ``bodies`` that have not arrived, in number order.

        (Shorter first: numbered bodies of one run sort by their number.)
        """
        return sorted(set(bodies) - self.copies.keys(),
                      key=lambda body: (len(body), body))

    def _missing_text(self, wanted):
        missing = self.missing(wanted)
        return '%d of %d missing, e.g. %r' % (
            len(missing), len(wanted), missing[:5])

    def check(self, bodies, in_doubt=()):
        """Every body arrived; extra copies only flagged redelivered.

        A body ``in_doubt`` (the producer published it twice) may arrive
        twice without the flag.

        Returns (duplicates, flagged): the number of extra copies and of
        copies with the redelivered flag, for the test to report.
        """
        wanted = set(bodies)
        assert wanted <= self.copies.keys(), self._missing_text(wanted)
        duplicates = flagged = 0
        for body in wanted:
            flags = self.copies[body]
            duplicates += len(flags) - 1
            flagged += sum(flags)
            assert flags.count(False) <= (2 if body in in_doubt else 1), (
                '%r arrived %d times without the redelivered flag'
                % (body, flags.count(False)))
        return duplicates, flagged
