"""The summary of message outcomes logged at shutdown.

Runs on: the worker threads (counting, as an ``IMessageHandled``
subscriber) and the main thread (the line at exit). An example of an
observer that plugs into the outcome event without the core knowing it.
"""
import collections
import threading

import zope.component

import gocept.amqprun.interfaces


class MessageTally:
    """Counts the outcomes of handled messages; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = collections.Counter()

    def on_message_handled(self, event):
        """``IMessageHandled`` subscriber: count the event's outcome."""
        with self._lock:
            self.counts[event.outcome] += 1

    def subscribe(self):
        """Register the subscriber in the global registry."""
        zope.component.provideHandler(
            self.on_message_handled,
            (gocept.amqprun.interfaces.IMessageHandled,))

    def unsubscribe(self):
        """Remove the subscriber again."""
        zope.component.getGlobalSiteManager().unregisterHandler(
            self.on_message_handled,
            (gocept.amqprun.interfaces.IMessageHandled,))

    def summary(self):
        """One line: how many messages ended in which outcome."""
        with self._lock:
            counts = dict(self.counts)
        failed = sum(counts.get(outcome, 0) for outcome in
                     gocept.amqprun.interfaces.FAILED_OUTCOMES)
        return ('handled %d, failed %d (retried %d, dead-lettered %d, '
                'returned %d), error-handled %d, in-doubt %d' % (
                    counts.get(gocept.amqprun.interfaces.HANDLED, 0), failed,
                    counts.get(gocept.amqprun.interfaces.RETRIED, 0),
                    counts.get(gocept.amqprun.interfaces.DEAD_LETTERED, 0),
                    counts.get(gocept.amqprun.interfaces.RETURNED, 0),
                    counts.get(gocept.amqprun.interfaces.ERROR_HANDLED, 0),
                    counts.get(gocept.amqprun.interfaces.IN_DOUBT, 0)))
