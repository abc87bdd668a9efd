"""The other side of the daemon: a plain AMQP client, and polling.

Runs on: the test's thread. Each :class:`Client` and :class:`QueueProbe`
owns a py-amqp connection of its own, used only by the thread that made it
(py-amqp is not thread-safe); they never share the daemon's connection.

:class:`Client` publishes test messages (to ``amq.topic`` unless told
otherwise) and receives what is sent to the routing keys (and exchanges)
the test expects; :class:`QueueProbe` asks the
broker how many messages queues hold. :func:`wait_for` and
:func:`wait_until_settled` poll a condition with a deadline instead of
sleeping for a guessed time.
"""
import email.utils
import time
import uuid

import amqp

import gocept.amqprun.connection
from gocept.amqprun.topology import DEFAULT_EXCHANGE


def wait_for(condition, timeout=10, interval=0.02, message=None):
    """Poll ``condition()`` until it is true; return its value.

    Raises AssertionError with ``message`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                message or 'Condition not met within %s s' % timeout)
        time.sleep(interval)


def wait_until_settled(is_busy, timeout, settle=0.1, interval=0.02,
                       message='Message was not processed.'):
    """Wait until ``is_busy()`` stayed false for ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while True:
        now = time.monotonic()
        if is_busy():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= settle:
            return
        if now > deadline:
            raise AssertionError(message)
        time.sleep(interval)


class Client:
    """An independent py-amqp client to send and receive test messages."""

    def __init__(self, broker, virtual_host):
        self.connection = amqp.Connection(
            host='%s:%s' % (broker.hostname, broker.port),
            userid=broker.username, password=broker.password,
            virtual_host=virtual_host)
        self.connection.connect()
        self.channel = self.connection.channel()
        self.receive_queue, _, _ = self.channel.queue_declare(
            exclusive=True)
        self._queues = []

    def close(self):
        """Delete the queues made with :meth:`queue_name`; disconnect."""
        for name in self._queues:
            try:
                self.channel.queue_delete(name)
            except Exception:  # pragma: no cover (best-effort cleanup)
                break
        self.connection.close()

    def queue_name(self, suffix):
        """A unique queue name, deleted on close."""
        name = 'test.%s.%s' % (uuid.uuid4().hex[:8], suffix)
        self._queues.append(name)
        return name

    def send_message(self, body, routing_key='', headers=None, *,
                     exchange=DEFAULT_EXCHANGE, **properties):
        """Publish a message to ``exchange``; return its message id."""
        properties.setdefault('message_id',
                              email.utils.make_msgid('gocept.amqprun.test'))
        properties.setdefault('timestamp', int(time.time()))
        properties.setdefault('delivery_mode', 2)
        self.channel.basic_publish(
            amqp.Message(body, application_headers=headers or {},
                         **properties),
            exchange=exchange, routing_key=routing_key)
        return properties['message_id']

    def expect_message_on(self, routing_key, exchange=DEFAULT_EXCHANGE,
                          binding_arguments=None):
        """Receive messages sent to ``routing_key`` on ``exchange`` from
        now on.

        ``binding_arguments`` are those of the binding (a ``headers``
        exchange matches on them). The exchange must exist.
        """
        self.channel.queue_bind(self.receive_queue, exchange, routing_key,
                                arguments=binding_arguments)

    expect_response_on = expect_message_on

    def wait_for_message(self, timeout=10):
        """Return the next received message; RuntimeError on timeout.

        The message is py-amqp's: ``body`` (bytes, or text when the sender
        set ``content_encoding``), ``properties`` (``message_id``,
        ``correlation_id``, ``application_headers``, ...), ``headers``
        (the application headers) and ``delivery_info`` (``routing_key``,
        ``exchange``).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.channel.basic_get(self.receive_queue, no_ack=True)
            if message is not None:
                return message
            time.sleep(0.02)
        raise RuntimeError('No message received')

    wait_for_response = wait_for_message

    def wait_for_messages(self, count, timeout=30):
        """Return ``count`` received messages; RuntimeError on timeout."""
        deadline = time.monotonic() + timeout
        messages = []
        while len(messages) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError('Received %d of %d messages' % (
                    len(messages), count))
            messages.append(self.wait_for_message(remaining))
        return messages

    def assert_no_message(self, wait=0.5):
        """Fail when a message arrives within ``wait`` seconds."""
        time.sleep(wait)
        message = self.channel.basic_get(self.receive_queue, no_ack=True)
        assert message is None, 'Unexpected message: %r' % message.body

    def queue_length(self, queue):
        """The number of ready messages in ``queue``."""
        _, count, _ = self.channel.queue_declare(queue, passive=True)
        return count


class QueueProbe:
    """A connection that asks the broker how many messages queues hold."""

    def __init__(self, parameters):
        # The first node of ``parameters``, with their TLS settings.
        self.connection = gocept.amqprun.connection.connect(parameters)
        self.channel = self.connection.channel()

    def ready_counts(self, queues):
        """Return {queue: ready messages} as the broker sees it now.

        A queue that does not exist counts 0. Messages a consumer received
        but has not acknowledged yet are not counted (AMQP does not tell).
        """
        counts = {}
        for queue in queues:
            try:
                _, counts[queue], _ = self.channel.queue_declare(
                    queue, passive=True)
            except amqp.exceptions.NotFound:
                counts[queue] = 0
                self.channel = self.connection.channel()  # NOT_FOUND closed
        return counts

    def close(self):
        """Disconnect."""
        self.connection.close()
