"""Publishing numbered messages and counting the replies, independently.

Runs on: the test thread. Both helpers use connections of their own (plain
py-amqp, straight to the broker, never through a fault proxy), so what they
count does not depend on the daemon under test.
"""
import collections
import socket
import time
import uuid

import amqp


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


def declare_queue(broker, virtual_host, queue, routing_key):
    """Declare and bind a handler's queue as the daemon will, so that
    messages published before the daemon starts wait for it."""
    connection = connect(broker, virtual_host)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, auto_delete=False)
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
                             message_id='<%s@faults>' % body.decode(),
                             application_headers=dict(headers or {})),
                exchange='amq.topic', routing_key=routing_key)
    finally:
        connection.close()


class Replies:
    """Consumes from a queue bound to ``routing_key``; counts bodies.

    ``queue`` None: an exclusive queue living as long as this client. A
    name: a durable queue (it survives a broker restart; delete it with
    :meth:`delete`).
    """

    def __init__(self, broker, virtual_host, routing_key, queue=None):
        self.connection = connect(broker, virtual_host)
        self.channel = self.connection.channel()
        if queue is None:
            queue, _, _ = self.channel.queue_declare(exclusive=True)
        else:
            self.channel.queue_declare(queue, durable=True,
                                       auto_delete=False)
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
            lambda: _missing(wanted, self.copies))

    def check(self, bodies):
        """Every body arrived; extra copies only flagged redelivered.

        Returns (duplicates, flagged): the number of extra copies and of
        copies with the redelivered flag, for the test to report.
        """
        wanted = set(bodies)
        assert wanted <= self.copies.keys(), _missing(wanted, self.copies)
        duplicates = flagged = 0
        for body in wanted:
            flags = self.copies[body]
            duplicates += len(flags) - 1
            flagged += sum(flags)
            assert flags.count(False) <= 1, (
                '%r arrived %d times without the redelivered flag'
                % (body, flags.count(False)))
        return duplicates, flagged


def _missing(wanted, copies):
    missing = wanted - copies.keys()
    return '%d of %d missing, e.g. %r' % (
        len(missing), len(wanted), sorted(missing)[:5])
