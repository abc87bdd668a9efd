"""RetryPolicy and attempt counting: what happens to a failed message.

Runs on: the worker threads (a policy is a value; ``FailureCounter`` is
thread-safe). Handler authors import :class:`RetryPolicy` to give one
handler a policy of its own (``declare(..., retry_policy=...)``); the
``<worker>`` section configures the server-wide one.
"""
import threading

import zope.interface

import gocept.amqprun.interfaces
import gocept.amqprun.message


@zope.interface.implementer(gocept.amqprun.interfaces.IRetryPolicy)
class RetryPolicy:
    """What happens to a message whose handler failed.

    It goes back to the broker after ``delay`` seconds; once it failed
    ``max_attempts`` times (0: never give up) it is acked and a copy goes to
    ``dead_letter_routing_key`` on ``dead_letter_exchange`` with the error
    and the attempt count in its headers. Without a dead-letter routing key
    it is retried forever, so nothing is lost by default.
    """

    def __init__(self, delay=1.0, max_attempts=0,
                 dead_letter_routing_key=None,
                 dead_letter_exchange='amq.topic'):
        self.delay = float(delay)
        self.max_attempts = int(max_attempts)
        self.dead_letter_routing_key = dead_letter_routing_key
        self.dead_letter_exchange = dead_letter_exchange

    def gives_up(self, attempts):
        """True when a message that failed ``attempts`` times is dead."""
        return bool(self.max_attempts and self.dead_letter_routing_key
                    and attempts >= self.max_attempts)

    def dead_letter(self, message, error, attempts):
        """Return the copy of ``message`` for the dead-letter destination."""
        headers = dict(message.header.headers or {})
        headers.update({
            'x-amqprun-error': error,
            'x-amqprun-attempts': attempts,
            'x-amqprun-routing-key': message.routing_key or '',
            'x-amqprun-exchange': message.exchange or '',
        })
        properties = {name: getattr(message.header, name) for name in
                      gocept.amqprun.message.PROPERTY_NAMES}
        return gocept.amqprun.message.Message(
            gocept.amqprun.message.Header(headers=headers, **properties),
            message.body, routing_key=self.dead_letter_routing_key,
            exchange=self.dead_letter_exchange)


class FailureCounter:
    """Counts the failed attempts per message (by message id), thread-safe.

    Counts live in this process only; a restarted daemon starts from zero
    (quorum queues' ``x-delivery-count`` header is taken into account).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}
        self._errors = {}

    def record(self, message, error=None):
        """Count one more failure; return the number of failures so far.

        ``error`` (text) is remembered as the message's last error.
        """
        with self._lock:
            key = gocept.amqprun.message.redelivery_key(message)
            count = self._counts[key] = self._counts.get(key, 0) + 1
            if error is not None:
                self._errors[key] = error
        return self._with_delivery_count(message, count)

    def count(self, message):
        """The number of failures recorded so far (0 for none)."""
        with self._lock:
            count = self._counts.get(
                gocept.amqprun.message.redelivery_key(message), 0)
        return self._with_delivery_count(message, count, failed_now=False)

    def last_error(self, message):
        """The text of the message's last recorded error, or None."""
        with self._lock:
            return self._errors.get(
                gocept.amqprun.message.redelivery_key(message))

    @staticmethod
    def _with_delivery_count(message, count, failed_now=True):
        delivery_count = (message.header.headers or {}).get(
            'x-delivery-count')  # quorum queues count for us
        if isinstance(delivery_count, int):
            # Deliveries before this one (+ this one, if it just failed).
            count = max(count, delivery_count + int(failed_now))
        return count

    def forget(self, message):
        """The message is done with: drop its count."""
        with self._lock:
            key = gocept.amqprun.message.redelivery_key(message)
            self._counts.pop(key, None)
            self._errors.pop(key, None)
