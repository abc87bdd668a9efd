"""Handler and declare(): the objects users register as utilities.

Runs on: a worker thread (calls); built at import time of the user's module.
"""
import logging
import sys
import traceback

import transaction
import zope.component
import zope.interface

import gocept.amqprun.interfaces
import gocept.amqprun.message
from gocept.amqprun.topology import DEFAULT_EXCHANGE


log = logging.getLogger(__name__)


def _settings():
    return zope.component.queryUtility(gocept.amqprun.interfaces.ISettings)


@zope.interface.implementer(gocept.amqprun.interfaces.IHandler)
class Handler:
    """Binds ``handler_function`` to one queue, bound to ``exchange`` with
    its routing key(s)."""

    def __init__(self, queue_name, routing_key, handler_function,
                 arguments=None, principal=None, retry_policy=None,
                 exchange=DEFAULT_EXCHANGE, binding_arguments=None):
        if not callable(handler_function):
            raise TypeError('handler_function not callable')
        self.queue_name = queue_name
        self.routing_key = routing_key
        self.handler_function = handler_function
        self.arguments = arguments
        self.exchange = exchange
        self.binding_arguments = binding_arguments
        self.principal = principal
        self.retry_policy = retry_policy

    def __repr__(self):
        return '<Handler %s for %r on %r via %r>' % (
            getattr(self.handler_function, '__name__', self.handler_function),
            self.routing_key, self.queue_name, self.exchange)

    @property
    def settings(self):
        """The ISettings utility, or None."""
        return _settings()

    def __call__(self, message):
        """Return the function's messages (``[]`` for None)."""
        return self.handler_function(message) or []


def declare(queue_name, routing_key, arguments=None, principal=None,
            retry_policy=None, exchange=DEFAULT_EXCHANGE,
            binding_arguments=None):
    """Decorator: turn a function into a :class:`Handler` for the queue."""
    def decorator(handler_function):
        return Handler(queue_name, routing_key, handler_function,
                       arguments=arguments, principal=principal,
                       retry_policy=retry_policy, exchange=exchange,
                       binding_arguments=binding_arguments)
    return decorator


#: The 0.2 name of :func:`declare`.
handle = declare


@zope.interface.implementer(gocept.amqprun.interfaces.IHandler,
                            gocept.amqprun.interfaces.IResponse)
class ErrorHandlingHandler:
    """Base class for handlers that report their errors as messages.

    Subclasses set ``queue_name``, ``routing_key`` and ``error_routing_key``
    (and maybe ``exchange`` and ``binding_arguments``, as for
    :class:`Handler`) and implement ``run()``, calling ``send(content,
    routing_key)`` for results. When ``run()`` raises (anything but
    ``error_reraise`` or a transient error, which the worker retries), the
    handler's side effects are aborted, the received message is
    acknowledged and one error message
    (``"<ExcClass>: <text>\\n<traceback>"``), correlated with it, goes to
    ``error_routing_key`` instead.

    Register an instance (the prototype); each message gets a new instance.
    """

    queue_name = NotImplemented
    routing_key = NotImplemented
    arguments = None
    exchange = DEFAULT_EXCHANGE
    binding_arguments = None
    principal = None
    retry_policy = None
    error_routing_key = NotImplemented
    #: Exception class (or tuple) that is re-raised unchanged.
    error_reraise = None
    #: The error ``run()`` raised and that was reported, else None.
    error = None

    def __init__(self, message=None):
        self.message = message
        self.responses = []

    @property
    def settings(self):
        """The ISettings utility, or None."""
        return _settings()

    def __call__(self, message):
        """Handle ``message`` with a new instance; return that instance."""
        response = type(self)(message)
        response.handle()
        return response

    def handle(self):
        """Run, turning unexpected errors into an error message."""
        try:
            self._decode_message()
            self.run()
        except self.error_reraise or ():
            raise
        except Exception as e:
            if transaction.get().isRetryableError(e):
                raise  # a conflict: the worker tries again at once
            self.error = e
            transaction.abort()
            self.message.acknowledge()
            log.warning("Processing message %s caused an error. Sending '%s'",
                        self.message.delivery_tag, self.error_routing_key,
                        exc_info=True)
            self.responses = [self._create_error_message()]
        return self.responses

    def _decode_message(self):
        """Hook: prepare ``self.message`` before ``run()``."""

    def run(self):
        """Do the work. Subclasses implement this."""
        raise NotImplementedError()

    def send(self, content, routing_key):
        """Queue a result message with body ``content``."""
        self.responses.append(self._create_message(content, routing_key))

    def _create_message(self, content, routing_key):
        return gocept.amqprun.message.Message(
            {}, content, routing_key=routing_key)

    def _create_error_message(self):
        exc_type, exc_value, exc_tb = sys.exc_info()
        summary = '%s: %s' % (exc_type.__name__, exc_value)
        detail = ''.join(
            traceback.format_exception(exc_type, exc_value, exc_tb))
        body = ('%s\n%s' % (summary, detail)).replace('\x00', '')
        message = self._create_message(body, self.error_routing_key)
        message.reference(self.message)
        return message

    def exception(self):
        """The commit failed: report the current exception instead."""
        return [self._create_error_message()]
