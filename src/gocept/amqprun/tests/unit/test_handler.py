"""Tests for gocept.amqprun.handler: Handler, declare, ErrorHandlingHandler.
"""
import pytest
import transaction
import ZODB.POSException
import zope.component
import zope.interface.verify

import gocept.amqprun.settings
from gocept.amqprun.handler import ErrorHandlingHandler
from gocept.amqprun.handler import Handler
from gocept.amqprun.handler import declare
from gocept.amqprun.handler import handle
from gocept.amqprun.interfaces import IHandler
from gocept.amqprun.interfaces import IResponse
from gocept.amqprun.interfaces import ISettings
from gocept.amqprun.tests.unit.fakes import FakeSession
from gocept.amqprun.tests.unit.fakes import RecordingDataManager
from gocept.amqprun.tests.unit.fakes import outgoing_message
from gocept.amqprun.tests.unit.fakes import received_message
from gocept.amqprun.retry import RetryPolicy


def function(message):
    return None


# -- Handler and declare ----------------------------------------------------

def test_handler_provides_IHandler_and_keeps_queue_and_routing_key():
    handler = Handler('queue', 'routing', function)
    assert zope.interface.verify.verifyObject(IHandler, handler)
    assert handler.queue_name == 'queue'
    assert handler.routing_key == 'routing'
    assert handler.handler_function is function
    assert handler.arguments is None
    assert handler.principal is None
    assert handler.exchange == 'amq.topic'
    assert handler.binding_arguments is None


def test_calling_handler_returns_the_functions_messages_as_is():
    messages = [outgoing_message()]
    handler = Handler('queue', 'routing', lambda message: messages)
    assert handler(received_message()) is messages


def test_calling_handler_passes_the_message_to_the_function():
    received = []
    handler = Handler('queue', 'routing', received.append)
    message = received_message()
    handler(message)
    assert received == [message]


def test_calling_handler_whose_function_returns_none_gives_empty_list():
    assert Handler('queue', 'routing', function)(received_message()) == []


def test_invalid_handler_function_raises_TypeError():
    with pytest.raises(TypeError, match='handler_function not callable'):
        Handler('queue', 'routing', 'not callable')


def test_decorator_creates_handler():
    @declare('queue', 'routing')
    def decorated(message):
        return None
    assert zope.interface.verify.verifyObject(IHandler, decorated)
    assert isinstance(decorated, Handler)
    assert decorated.queue_name == 'queue'
    assert decorated.routing_key == 'routing'
    assert decorated.handler_function.__name__ == 'decorated'


def test_handle_is_alias_for_declare():
    assert handle is declare


def test_decorator_supports_arguments():
    decorated = declare('queue', 'routing', arguments={'x-ha-policy': 'all',
                                                       'x-message-ttl': 10})(
        function)
    assert decorated.arguments == {'x-ha-policy': 'all', 'x-message-ttl': 10}


def test_decorator_supports_principal():
    decorated = declare('queue', 'routing', principal='zope.user')(function)
    assert decorated.principal == 'zope.user'


def test_decorator_supports_an_exchange_and_binding_arguments():
    decorated = declare('queue', '', exchange='documents',
                        binding_arguments={'x-match': 'all',
                                           'format': 'pdf'})(function)
    assert decorated.exchange == 'documents'
    assert decorated.binding_arguments == {'x-match': 'all', 'format': 'pdf'}


def test_decorator_supports_a_list_of_routing_keys():
    decorated = declare('queue', ['a', 'b'])(function)
    assert decorated.routing_key == ['a', 'b']


def test_handler_settings_is_none_without_settings_utility(registry):
    assert Handler('queue', 'routing', function).settings is None


def test_handler_settings_is_the_settings_utility(registry):
    settings = gocept.amqprun.settings.Settings({'a': 'b'})
    zope.component.provideUtility(settings, ISettings)
    assert Handler('queue', 'routing', function).settings is settings


def test_handler_repr_names_function_routing_key_queue_and_exchange():
    assert repr(Handler('queue', 'routing', function)) == (
        "<Handler function for 'routing' on 'queue' via 'amq.topic'>")


# -- ErrorHandlingHandler ---------------------------------------------------

class Recorder(ErrorHandlingHandler):
    """Records that run() ran, then calls the method ``work`` if set."""

    queue_name = 'queue'
    routing_key = 'routing'
    error_routing_key = 'error'
    runs = None
    work = None

    def run(self):
        type(self).runs.append(self.message)
        if self.work is not None:
            self.work()


@pytest.fixture
def recorder():
    Recorder.runs = []
    Recorder.work = None
    yield Recorder()
    Recorder.runs = None
    Recorder.work = None


@pytest.fixture
def message():
    message = received_message(
        message_id='orig message id', headers={'references': 'a\nb'})
    message._session = FakeSession()
    return message


def fail_with(error):
    def work(handler):
        raise error
    return work


def test_error_handling_handler_conforms_to_IHandler_and_IResponse():
    handler = ErrorHandlingHandler()
    assert zope.interface.verify.verifyObject(IHandler, handler)
    assert zope.interface.verify.verifyObject(IResponse, handler)


def test_error_handling_handler_defaults():
    assert ErrorHandlingHandler.queue_name is NotImplemented
    assert ErrorHandlingHandler.routing_key is NotImplemented
    assert ErrorHandlingHandler.error_routing_key is NotImplemented
    assert ErrorHandlingHandler.arguments is None
    assert ErrorHandlingHandler.principal is None
    assert ErrorHandlingHandler.exchange == 'amq.topic'
    assert ErrorHandlingHandler.binding_arguments is None
    assert ErrorHandlingHandler.error_reraise is None


def test_error_handling_handler_call_runs_a_new_instance(recorder, message):
    response = recorder(message)
    assert Recorder.runs == [message]
    assert type(response) is Recorder
    assert response is not recorder
    assert response.message is message
    assert recorder.message is None


def test_error_handling_handler_returns_what_run_sent(recorder, message):
    Recorder.work = lambda self: self.send('foo', 'success')
    response = recorder(message)
    assert zope.interface.verify.verifyObject(IResponse, response)
    [result] = response.responses
    assert result.body == b'foo'
    assert result.routing_key == 'success'
    assert message._session.acknowledged == []


def test_error_handling_handler_returns_error_response_on_exception(
        recorder, message):
    def work(self):
        self.send('foo', 'success')
        raise RuntimeError('asdf')
    Recorder.work = work
    response = recorder(message)
    assert len(response.responses) == 1
    [error] = response.responses
    assert error.routing_key == 'error'
    assert error.body.startswith(b'RuntimeError: asdf\nTraceback')
    assert b'in work' in error.body


def test_error_handling_handler_aborts_transaction_on_error(
        recorder, message):
    log = []

    def work(self):
        transaction.get().join(RecordingDataManager(log))
        raise RuntimeError('asdf')
    Recorder.work = work
    recorder(message)
    assert log == ['db.abort']


def test_error_handling_handler_keeps_transaction_when_run_succeeds(
        recorder, message):
    log = []
    Recorder.work = lambda self: transaction.get().join(
        RecordingDataManager(log))
    recorder(message)
    assert log == []
    transaction.commit()
    assert log[-1] == 'db.tpc_finish'


def test_error_handling_handler_acknowledges_message_once_on_error(
        recorder, message):
    Recorder.work = fail_with(RuntimeError('asdf'))
    recorder(message)
    assert message._session.acknowledged == [message]


def test_error_handling_handler_error_message_references_message(
        recorder, message):
    Recorder.work = fail_with(RuntimeError('asdf'))
    [error] = recorder(message).responses
    assert error.header.correlation_id == 'orig message id'
    assert error.header.headers['references'] == 'a\nb\norig message id'


def test_error_handling_handler_raises_exceptions_in_error_reraise(message):
    class Reraising(Recorder):
        error_reraise = ValueError
    Recorder.runs = []
    Recorder.work = fail_with(ValueError('reraise me'))
    try:
        with pytest.raises(ValueError, match='reraise me'):
            Reraising()(message)
    finally:
        Recorder.work = None
    assert message._session.acknowledged == []


def test_error_handling_handler_accepts_a_tuple_in_error_reraise(message):
    class Reraising(Recorder):
        error_reraise = (KeyError, ValueError)
    Recorder.runs = []
    Recorder.work = fail_with(KeyError('k'))
    try:
        with pytest.raises(KeyError):
            Reraising()(message)
    finally:
        Recorder.work = None


def test_error_handling_handler_strips_null_bytes_from_error_text(
        recorder, message):
    Recorder.work = fail_with(RuntimeError('as\x00df'))
    [error] = recorder(message).responses
    assert b'\x00' not in error.body
    assert error.body.startswith(b'RuntimeError: asdf\n')


def test_error_handling_handler_runs_decode_hook_before_run(message):
    calls = []

    class Decoding(Recorder):
        def _decode_message(self):
            calls.append('decode')

        def run(self):
            calls.append('run')
    Decoding()(message)
    assert calls == ['decode', 'run']


def test_error_handling_handler_base_run_is_not_implemented(message):
    class Plain(ErrorHandlingHandler):
        error_routing_key = 'error'
    [error] = Plain()(message).responses
    assert error.body.startswith(b'NotImplementedError: \nTraceback')


def test_error_handling_handler_exception_reports_current_exception(
        recorder, message):
    response = recorder(message)
    try:
        raise ValueError('commit failed')
    except ValueError:
        [error] = response.exception()
    assert error.routing_key == 'error'
    assert error.body.startswith(b'ValueError: commit failed\nTraceback')
    assert error.header.correlation_id == 'orig message id'


def test_error_handling_handler_settings(registry):
    assert Recorder().settings is None
    settings = gocept.amqprun.settings.Settings()
    zope.component.provideUtility(settings, ISettings)
    assert Recorder().settings is settings


def test_decorator_supports_a_retry_policy_of_the_handler():
    policy = RetryPolicy(delay=5)

    @declare('queue', 'routing', retry_policy=policy)
    def handler(message):
        pass
    assert handler.retry_policy is policy


def test_error_handling_handler_lets_a_transient_error_through(
        recorder, message):
    Recorder.work = fail_with(ZODB.POSException.ConflictError('conflict'))
    with pytest.raises(ZODB.POSException.ConflictError):
        recorder(message)
    assert message._session.acknowledged == []
