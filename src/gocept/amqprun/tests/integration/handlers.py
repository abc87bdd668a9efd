"""Handlers the integration tests register through ZCML."""
import threading
import time

import transaction
import zope.component

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message


#: (routing key, body) of every message a handler here was called with.
received = []
#: Per body: how many attempts still fail (see ``fail_then_reply``).
failures_left = {}
_lock = threading.Lock()


def reset():
    """Forget what was received."""
    del received[:]
    failures_left.clear()


def _record(message):
    with _lock:
        received.append((message.routing_key, message.body))


def reply(body, routing_key='test.response', **header):
    """A message to send back."""
    return gocept.amqprun.message.Message(
        header=header, body=body, routing_key=routing_key)


@gocept.amqprun.handler.declare('test.queue', 'test.routing')
def echo(message):
    _record(message)
    return [reply(b'echo: ' + message.body)]


@gocept.amqprun.handler.declare(
    'test.queue.multi', ['test.multi.1', 'test.multi.2'],
    arguments={'x-message-ttl': 60000, 'x-max-priority': 5})
def multi(message):
    _record(message)
    return [reply(message.body)]


@gocept.amqprun.handler.declare('test.queue.fail', 'test.fail')
def fail_then_reply(message):
    """Fails as often as ``failures_left[body]`` says, then replies."""
    _record(message)
    with _lock:
        left = failures_left.get(message.body, 0)
        failures_left[message.body] = left - 1
    if left > 0:
        raise RuntimeError('provoked failure for %r' % message.body)
    return [reply(message.body)]


@gocept.amqprun.handler.declare('test.queue.sleep', 'test.sleep')
def sleep(message):
    """Sleeps as many seconds as the body says, then replies."""
    _record(message)
    time.sleep(float(message.body))
    return [reply(message.body)]


class FailingVote:
    """A data manager whose vote fails."""

    transaction_manager = None

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def tpc_vote(self, txn):
        raise RuntimeError('provoked vote failure')

    def sortKey(self):
        return 'failing-vote'


@gocept.amqprun.handler.declare('test.queue.vote', 'test.vote')
def failing_vote(message):
    """Joins a data manager that votes no on the first attempt."""
    _record(message)
    if not message.redelivered:
        transaction.get().join(FailingVote())
    return [reply(message.body)]


@gocept.amqprun.handler.declare('test.queue.savepoint', 'test.savepoint')
def savepoint(message):
    _record(message)
    result = [reply(message.body)]
    transaction.savepoint().rollback()
    return result


@gocept.amqprun.handler.declare('test.queue.sender', 'test.sender')
def send_via_isender(message):
    """Sends one message through ISender and returns one."""
    _record(message)
    sender = zope.component.getUtility(gocept.amqprun.interfaces.ISender)
    sender.send(reply(b'via sender', routing_key='test.response.sender'))
    return [reply(b'returned')]


@gocept.amqprun.handler.declare('test.queue.settings', 'test.settings')
def settings(message):
    """Replies with the setting named by the body."""
    _record(message)
    value = settings.settings.get(message.body.decode())
    return [reply(value)]


@gocept.amqprun.handler.declare('test.queue.clash', 'test.clash')
def classic_on_a_quorum_queue(message):
    """Declares a classic queue; the tests make it exist as a quorum queue.
    """
    return []  # pragma: no cover (never consumes: the declare is refused)


@gocept.amqprun.handler.declare('test.queue.die', 'test.die')
def die(message):
    """Ends its worker thread (SystemExit is no handler error)."""
    _record(message)
    raise SystemExit('provoked end of the worker thread')
