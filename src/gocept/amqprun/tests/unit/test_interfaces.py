"""Tests for gocept.amqprun.interfaces: the events and the exceptions."""
import pytest
import zope.interface.verify

from gocept.amqprun import interfaces


@pytest.mark.parametrize('event, interface', [
    (interfaces.ConfigFinished(), interfaces.IConfigFinished),
    (interfaces.ProcessStarted(), interfaces.IProcessStarted),
    (interfaces.ProcessStopping(), interfaces.IProcessStopping),
    (interfaces.MessageStored('message', 'path'), interfaces.IMessageStored),
    (interfaces.WorkersStopped(), interfaces.IWorkersStopped),
    (interfaces.MessageHandled('message', 'name', 'handled'),
     interfaces.IMessageHandled),
    (interfaces.SendFinished(1), interfaces.ISendFinished),
    (interfaces.FileWritten('/dir', 'path'), interfaces.IFileWritten),
    (interfaces.FileSent('/dir', 'name'), interfaces.IFileSent),
], ids=lambda value: type(value).__name__)
def test_events_provide_their_interfaces(event, interface):
    assert zope.interface.verify.verifyObject(interface, event)


def test_observation_events_say_what_they_are_about():
    assert repr(interfaces.SendFinished(2, RuntimeError())) == (
        '<SendFinished 2 message(s), failed>')
    assert repr(interfaces.FileWritten('/d', 'p')) == '<FileWritten p in /d>'
    assert repr(interfaces.FileSent('/d', 'n')) == '<FileSent n of /d>'


def test_message_stored_carries_message_and_path():
    event = interfaces.MessageStored('message', 'foo/bar')
    assert (event.message, event.path) == ('message', 'foo/bar')


@pytest.mark.parametrize('error', [
    interfaces.ConnectionLost, interfaces.CommitFailed])
def test_recoverable_errors(error):
    assert issubclass(error, interfaces.RecoverableError)
    assert not issubclass(error, interfaces.FatalError)


@pytest.mark.parametrize('error', [
    interfaces.ConfigurationError, interfaces.BrokerUnreachable,
    interfaces.AccessRefused, interfaces.DeclareRefused])
def test_fatal_errors(error):
    assert issubclass(error, interfaces.FatalError)
    assert not issubclass(error, interfaces.RecoverableError)


def test_all_errors_share_a_base_class():
    assert issubclass(interfaces.RecoverableError, interfaces.AMQPRunError)
    assert issubclass(interfaces.FatalError, interfaces.AMQPRunError)
