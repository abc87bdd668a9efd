"""AMQPDataManager: joins the transaction, commits on the broker in vote.

Runs on: a worker thread. Two-phase commit mapped onto AMQP:

``abort``
    Forget the session's messages; nothing reaches the broker.
``tpc_begin``, ``commit``
    Build the ``Commit`` op (ack + publishes); nothing on the wire yet.
``tpc_vote``
    Submit the op to the I/O thread and wait: it acks, publishes and
    ``tx.commit``\\ s. A broker error here is a "no" vote. ``sortKey`` sorts
    last, so every other resource (databases, files) has voted yes first.
    Once the broker committed, the received message is settled. A commit
    of a received message whose outcome is unknown (``CommitInDoubt``) is
    a "yes" vote with a WARNING: the other resources keep their writes,
    and the broker redelivers the message unless it committed. A send
    outside a handler notifies ``ISendFinished`` with its outcome.
``tpc_finish``
    Forget the op. Never raises.
``tpc_abort``
    Forget the session's messages. Never raises. (The worker gives an
    unsettled received message back to the broker.)
"""
import logging

import transaction.interfaces
import zope.interface

import gocept.amqprun.interfaces
import gocept.amqprun.process


log = logging.getLogger(__name__)

#: How long a worker waits for the I/O thread to carry out its commit.
COMMIT_TIMEOUT = 60

_IN_DOUBT = object()


def commit_in_doubt(txn):
    """True when ``txn``'s AMQP commit ended with an unknown outcome.

    For resources that vote before the broker. After the commit of a
    received message it is true in their ``tpc_finish`` (the transaction
    commits; the broker may hand the message out again). After a pure
    send it is true in their ``tpc_abort`` (the vote failed, but the
    broker may have published: keep what you wrote).
    """
    try:
        return txn.data(_IN_DOUBT)
    except KeyError:
        return False


@zope.interface.implementer(transaction.interfaces.IDataManagerSavepoint)
class NoOpSavepoint:
    """Savepoints are accepted; rolling back keeps the queued messages."""

    def rollback(self):
        """Nothing to undo on the broker side."""


@zope.interface.implementer(transaction.interfaces.ISavepointDataManager)
class AMQPDataManager:
    """Commits one session's ack and publishes in one AMQP transaction."""

    transaction_manager = None

    def __init__(self, session):
        self.session = session
        self._op = None

    def __repr__(self):
        return '<AMQPDataManager for %r>' % self.session

    def abort(self, txn):
        """Forget the queued messages (idempotent, any state)."""
        self._op = None
        self.session.reset()

    def tpc_begin(self, txn):
        """Nothing to do before the commit."""

    def commit(self, txn):
        """Freeze what will be sent."""
        self._op = self.session.commit_op()

    def tpc_vote(self, txn):
        """Have the I/O thread ack, publish and ``tx.commit``; wait."""
        if self._op.delivery is None and not self._op.messages:
            return
        self.session.server.submit(self._op)
        try:
            self._op.wait(COMMIT_TIMEOUT)
        except gocept.amqprun.interfaces.CommitInDoubt as e:
            txn.set_data(_IN_DOUBT, True)
            if self._op.delivery is None:
                self._send_finished(e)
                raise  # a pure send: nothing would come back
            self._keep_writes(e)
            return
        except Exception as e:
            self._send_finished(e)
            raise
        self._send_finished()
        # Settled now: the broker has the ack, whatever happens to the
        # other resources' tpc_finish (which runs before ours).
        self.session.committed()

    def _send_finished(self, error=None):
        """Tell observers how a send outside a handler ended."""
        if self._op.delivery is None:
            gocept.amqprun.process.notify(
                gocept.amqprun.interfaces.SendFinished(
                    len(self._op.messages), error))

    def _keep_writes(self, error):
        """Vote yes although the broker's outcome is unknown.

        Failing the vote would roll back the databases although the broker
        may have acked the message: a lost write that no handler could
        repair. Voting yes makes the worst case a redelivery.
        """
        message = self.session.received_message
        self.session.in_doubt = True
        log.warning('Message %s (%s): %s; its transaction commits anyway '
                    '(databases keep their writes) and the broker '
                    'redelivers it flagged redelivered unless it committed',
                    message.header.message_id, message.routing_key, error)

    def tpc_finish(self, txn):
        """Forget the committed op."""
        self._op = None
        self.session.reset()

    def tpc_abort(self, txn):
        """Forget the queued messages; never raises."""
        self._op = None
        self.session.reset()

    def sortKey(self):
        """Sort after every other resource, so the broker commits last."""
        return '~~gocept.amqprun'

    def savepoint(self):
        """Support savepoints as a no-op (messages are sent at commit)."""
        return NoOpSavepoint()
