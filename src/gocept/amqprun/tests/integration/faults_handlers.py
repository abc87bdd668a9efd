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
