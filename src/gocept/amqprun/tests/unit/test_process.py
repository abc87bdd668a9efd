"""Tests for gocept.amqprun.process: stop requests and observation events.
"""
import logging

import gocept.amqprun.process
from gocept.amqprun.interfaces import FileSent
from gocept.amqprun.interfaces import IFileSent


def test_notify_tells_the_subscribers(events):
    sent = events(IFileSent)
    event = FileSent('/dir', 'name')
    gocept.amqprun.process.notify(event)
    assert sent == [event]


def test_notify_logs_a_failing_subscriber_and_goes_on(registry, caplog):
    def broken(event):
        raise RuntimeError('broken')
    registry.registerHandler(broken, (IFileSent,))
    with caplog.at_level(logging.ERROR, 'gocept.amqprun.process'):
        gocept.amqprun.process.notify(FileSent('/dir', 'name'))
    assert caplog.messages == [
        'A subscriber failed for <FileSent name of /dir>']
    assert 'RuntimeError: broken' in caplog.text


def test_request_stop_keeps_the_highest_exit_status():
    gocept.amqprun.process.reset()
    try:
        gocept.amqprun.process.request_stop(1)
        gocept.amqprun.process.request_stop(0)
        assert gocept.amqprun.process.wait_for_stop_request(0)
        assert gocept.amqprun.process.exit_status() == 1
    finally:
        gocept.amqprun.process.reset()
