"""Session: what one transaction will do on the broker.

Runs on: a worker thread (or any thread that sends). A handler's messages
are collected here; nothing on this side touches a channel. At commit the
data manager turns the session into one ``Commit`` op for the I/O thread.
"""
import logging

import transaction
import zope.interface

import gocept.amqprun.channelops
import gocept.amqprun.datamanager
import gocept.amqprun.interfaces
import gocept.amqprun.message


log = logging.getLogger(__name__)


@zope.interface.implementer(gocept.amqprun.interfaces.ISession)
class Session:
    """Messages to publish plus, for a handled message, the ack to send."""

    def __init__(self, server, received_message=None):
        self.server = server
        self.received_message = received_message
        self.messages = []
        #: True once the ack of the received message was committed.
        self.settled = False
        #: True when the handler reported its error as a message instead
        #: (IResponse, ErrorHandlingHandler).
        self.error_handled = False
        #: True when the AMQP commit's outcome is unknown (CommitInDoubt)
        #: and the transaction committed anyway.
        self.in_doubt = False
        self._joined = False
        if received_message is not None:
            received_message._session = self

    def __repr__(self):
        return '<Session %s>' % (
            self.received_message.delivery_tag
            if self.received_message is not None else 'send')

    def send(self, message):
        """Queue ``message`` for the commit of the current transaction.

        A body above the server's ``max_message_size`` raises
        ``PublishRefused`` at once; nothing is queued then.
        """
        gocept.amqprun.message.check_size(
            message, self.server.max_message_size)
        self.join_transaction()
        self.messages.append(message)

    def join_transaction(self):
        """Join the current transaction, once until the next reset."""
        if self._joined:
            return
        transaction.get().join(
            gocept.amqprun.datamanager.AMQPDataManager(self))
        self._joined = True

    def acknowledge(self, message):
        """Ack ``message`` with the commit of the current transaction."""
        self.received_message = message
        self.join_transaction()

    def reset(self):
        """Forget everything queued; the next send joins again."""
        self.messages = []
        self._joined = False
        if not self.settled:
            self._forget_received_message()

    def _forget_received_message(self):
        # After an abort the ack must be asked for again (IResponse,
        # ErrorHandlingHandler); the worker returns unsettled messages.
        self.received_message = None

    def commit_op(self):
        """Return the ``Commit`` op for what is queued; reference parents."""
        parent = self.received_message
        for message in self.messages:
            message.reference(parent)
            log.debug('Publishing message %s to %s in response to %s',
                      message.header.message_id, message.routing_key,
                      parent.header.message_id if parent else None)
        delivery = parent.delivery if parent is not None else None
        return gocept.amqprun.channelops.Commit(delivery, self.messages)

    def committed(self):
        """Record that the commit went through on the broker."""
        if self.received_message is not None:
            self.settled = True
