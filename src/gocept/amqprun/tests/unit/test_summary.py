"""Tests for gocept.amqprun.summary: the outcome tally."""
import zope.event

from gocept.amqprun.interfaces import MessageHandled
from gocept.amqprun.summary import MessageTally
from gocept.amqprun.tests.unit.fakes import received_message


def handled(outcome):
    return MessageHandled(received_message(), 'test', outcome)


def test_tally_summarises_every_outcome():
    tally = MessageTally()
    assert tally.summary() == (
        'handled 0, failed 0 (retried 0, dead-lettered 0, returned 0), '
        'error-handled 0, in-doubt 0')
    for outcome in ['handled', 'handled', 'retried', 'dead-lettered',
                    'returned', 'error-handled', 'in-doubt']:
        tally.on_message_handled(handled(outcome))
    assert tally.summary() == (
        'handled 2, failed 3 (retried 1, dead-lettered 1, returned 1), '
        'error-handled 1, in-doubt 1')


def test_tally_counts_events_while_subscribed(registry):
    tally = MessageTally()
    tally.subscribe()
    zope.event.notify(handled('handled'))
    tally.unsubscribe()
    zope.event.notify(handled('handled'))
    assert tally.counts == {'handled': 1}
