"""Handlers the fault-injection tests register through ZCML.

Runs on: the daemon's worker threads (in the test process or in a
``server`` subprocess). Every handler replies to :data:`REPLY_KEY` with the
body it received and an application header ``redelivered`` telling whether
the broker flagged the delivery, so that a test can count what arrived.
"""
import threading
import time

import gocept.amqprun.handler
import gocept.amqprun.message


REPLY_KEY = 'faults.reply'

#: (body, redelivered, time.monotonic()) of each call in this process.
calls = []
_lock = threading.Lock()


def reset():
    """Forget the recorded calls."""
    with _lock:
        del calls[:]


def calls_for(body):
    """The recorded calls for ``body``: [(redelivered, time), ...]."""
    with _lock:
        return [(redelivered, at) for called_body, redelivered, at in calls
                if called_body == body]


def _record(message):
    with _lock:
        calls.append((message.body, message.redelivered, time.monotonic()))


def reply_to(message):
    """The reply the tests count: same body, ``redelivered`` header."""
    return gocept.amqprun.message.Message(
        {'redelivered': bool(message.redelivered)}, message.body,
        routing_key=REPLY_KEY)


@gocept.amqprun.handler.declare('faults.numbers', 'faults.number')
def numbers(message):
    """Replies after sleeping the seconds of the ``faults.sleep`` setting.
    """
    _record(message)
    settings = numbers.settings
    seconds = float(settings.get('faults.sleep', 0)) if settings else 0
    if seconds:
        time.sleep(seconds)
    return [reply_to(message)]


#: The arguments of a quorum queue (replicated over the cluster's nodes).
QUORUM = {'x-queue-type': 'quorum'}


@gocept.amqprun.handler.declare('faults.quorum', 'faults.quorum',
                                arguments=QUORUM)
def quorum(message):
    """Replies at once; its queue is a quorum queue (the cluster tests)."""
    _record(message)
    return [reply_to(message)]


@gocept.amqprun.handler.declare('faults.poison', 'faults.poison')
def poison(message):
    """Fails for bodies ending with ``:poison``, replies to the others."""
    _record(message)
    if message.body.endswith(b':poison'):
        raise RuntimeError('poison message %r' % message.body)
    return [reply_to(message)]


@gocept.amqprun.handler.declare('faults.slow', 'faults.slow')
def slow(message):
    """On its first delivery sleeps the seconds of the ``sleep`` header."""
    _record(message)
    if not message.redelivered:
        time.sleep(float((message.header.headers or {}).get('sleep', 0)))
    return [reply_to(message)]


@gocept.amqprun.handler.declare('faults.unsendable', 'faults.unsendable')
def unsendable(message):
    """Replies; for bodies ending with ``:unsendable`` the reply carries a
    header value AMQP has no type for (a set), so it cannot be published.
    """
    _record(message)
    reply = reply_to(message)
    if message.body.endswith(b':unsendable'):
        reply.header.headers['bad'] = {1, 2}
    return [reply]


#: The exchange the ``:missing-exchange`` reply of :func:`refused` goes to.
MISSING_EXCHANGE = 'faults.no-such-exchange'


@gocept.amqprun.handler.declare('faults.refused', 'faults.refused')
def refused(message):
    """Replies; the broker refuses the reply of three kinds of body.

    ``:missing-exchange``: it goes to an exchange that does not exist.
    ``:too-large``: its body has 2 KiB (the tests set ``max_message_size``
    to 1 KiB). ``:user-id``: its ``user_id`` is not the connection's user,
    which RabbitMQ refuses by closing the channel.
    """
    _record(message)
    reply = reply_to(message)
    if message.body.endswith(b':missing-exchange'):
        reply.exchange = MISSING_EXCHANGE
    elif message.body.endswith(b':too-large'):
        reply.body = b'x' * 2048
    elif message.body.endswith(b':user-id'):
        reply.header.user_id = 'somebody-else'
    return [reply]
