"""Tests for gocept.amqprun.session: what one transaction does on the broker.

The session is driven through the thread-local transaction manager with a
FakeServer whose ``submit`` carries the Commit op out at once.
"""
import pytest
import transaction
import zope.interface.verify

from gocept.amqprun.channelops import Commit
from gocept.amqprun.interfaces import CommitFailed
from gocept.amqprun.interfaces import ISession
from gocept.amqprun.interfaces import PublishRefused
from gocept.amqprun.message import Header
from gocept.amqprun.message import Message
from gocept.amqprun.session import Session
from gocept.amqprun.tests.unit.fakes import FakeServer
from gocept.amqprun.tests.unit.fakes import outgoing_message
from gocept.amqprun.tests.unit.fakes import received_message


@pytest.fixture
def server():
    return FakeServer()


def published(server):
    """The messages the fake server published, in order."""
    return [call[1] for call in server.channel.calls if call[0] == 'publish']


def test_session_provides_ISession(server):
    assert zope.interface.verify.verifyObject(ISession, Session(server))


def test_session_registers_itself_with_the_received_message(server):
    message = received_message()
    session = Session(server, message)
    assert session.received_message is message
    assert message._session is session


def test_send_queues_messages(server):
    session = Session(server)
    first, second = outgoing_message(b'1'), outgoing_message(b'2')
    session.send(first)
    session.send(second)
    assert session.messages == [first, second]


def test_send_refuses_a_body_above_max_message_size_at_once(server):
    server.max_message_size = 4
    session = Session(server)
    with pytest.raises(PublishRefused, match='5 bytes, above max_message_'
                                             'size 4'):
        session.send(outgoing_message(b'12345'))
    session.send(outgoing_message(b'1234'))
    assert [m.body for m in session.messages] == [b'1234']


def test_send_joins_transaction_on_first_send(server):
    session = Session(server)
    transaction.commit()
    assert server.ops == []
    message = outgoing_message()
    session.send(message)
    transaction.commit()
    [op] = server.ops
    assert isinstance(op, Commit)
    assert op.messages == [message]
    assert published(server) == [message]


def test_send_joins_only_once(server):
    session = Session(server)
    session.send(outgoing_message(b'1'))
    session.send(outgoing_message(b'2'))
    transaction.commit()
    [op] = server.ops
    assert [message.body for message in op.messages] == [b'1', b'2']
    assert server.channel.names == ['publish', 'publish', 'tx_commit']


def test_message_is_not_sent_on_abort(server):
    session = Session(server)
    session.send(outgoing_message())
    transaction.abort()
    assert session.messages == []
    transaction.commit()
    assert server.ops == []


def test_message_can_be_sent_after_abort(server):
    session = Session(server)
    session.send(outgoing_message(b'message 1'))
    transaction.abort()
    session.send(outgoing_message(b'message 2'))
    transaction.commit()
    assert [message.body for message in published(server)] == [
        b'message 2']


def test_message_can_be_sent_after_commit(server):
    session = Session(server)
    session.send(outgoing_message(b'message 1'))
    transaction.commit()
    session.send(outgoing_message(b'message 2'))
    transaction.commit()
    assert [message.body for message in published(server)] == [
        b'message 1', b'message 2']
    assert len(server.ops) == 2


def test_send_session_commit_op_has_no_delivery(server):
    session = Session(server)
    session.send(outgoing_message())
    op = session.commit_op()
    assert op.delivery is None


def test_acknowledge_commits_the_ack_with_the_messages(server):
    message = received_message(tag=7)
    session = Session(server)
    session.acknowledge(message)
    session.send(outgoing_message())
    transaction.commit()
    assert server.channel.names == ['basic_ack', 'publish', 'tx_commit']
    assert server.channel.calls[0] == ('basic_ack', 7)
    assert session.settled


def test_acknowledge_alone_joins_the_transaction(server):
    message = received_message(tag=7)
    session = Session(server)
    session.acknowledge(message)
    transaction.commit()
    assert server.channel.names == ['basic_ack', 'tx_commit']
    assert session.settled


def test_received_message_is_not_acked_unless_the_session_joined(server):
    session = Session(server, received_message())
    transaction.commit()
    assert server.ops == []
    assert not session.settled


def test_commit_op_acks_received_message_on_its_delivery(server):
    message = received_message(tag=3, generation=2)
    session = Session(server, message)
    op = session.commit_op()
    assert op.delivery is message.delivery
    assert op.messages == []


def test_messages_are_sent_with_correlation_id(server):
    session = Session(server, received_message(message_id='message id'))
    session.send(outgoing_message())
    [message] = session.commit_op().messages
    assert message.header.correlation_id == 'message id'


def test_existing_correlation_id_is_not_overwritten(server):
    session = Session(server, received_message(message_id='message id'))
    session.send(outgoing_message(correlation_id='mine'))
    [message] = session.commit_op().messages
    assert message.header.correlation_id == 'mine'


def test_messages_are_sent_with_references_header(server):
    session = Session(server, received_message(message_id='message id'))
    session.send(outgoing_message())
    [message] = session.commit_op().messages
    assert message.header.headers['references'] == 'message id'


def test_references_header_contains_parents_references(server):
    session = Session(server, received_message(
        message_id='message id', headers={'references': 'parent id'}))
    session.send(outgoing_message())
    [message] = session.commit_op().messages
    assert message.header.headers['references'] == 'parent id\nmessage id'


def test_no_references_when_parent_has_no_references_header(server):
    session = Session(server, received_message(
        message_id='message id', headers={'X-Foo': 'bar'}))
    session.send(outgoing_message())
    [message] = session.commit_op().messages
    assert message.header.headers['references'] == 'message id'


def test_existing_references_header_is_not_overwritten(server):
    session = Session(server, received_message(message_id='message id'))
    session.send(outgoing_message(references='custom'))
    [message] = session.commit_op().messages
    assert message.header.headers['references'] == 'custom'


def test_no_references_are_created_when_parent_lacks_message_id(server):
    session = Session(server, received_message(message_id=None))
    session.send(Message(Header(), b'', routing_key='r'))
    [message] = session.commit_op().messages
    assert message.header.correlation_id is None
    assert 'references' not in (message.header.headers or {})


def test_reset_forgets_messages_and_unsettled_received_message(server):
    session = Session(server, received_message())
    session.send(outgoing_message())
    session.reset()
    assert session.messages == []
    assert session.received_message is None


def test_reset_keeps_settled_received_message(server):
    message = received_message()
    session = Session(server, message)
    session.committed()
    session.reset()
    assert session.settled
    assert session.received_message is message


def test_committed_without_received_message_settles_nothing(server):
    session = Session(server)
    session.committed()
    assert not session.settled


def test_failed_commit_leaves_message_unsettled_and_forgets_it():
    server = FakeServer(outcomes=[CommitFailed('no')])
    session = Session(server, received_message())
    session.send(outgoing_message())
    with pytest.raises(CommitFailed):
        transaction.commit()
    assert not session.settled
    assert session.received_message is None
    assert session.messages == []
    assert server.channel.calls == []


def test_session_repr(server):
    assert repr(Session(server)) == '<Session send>'
    assert repr(Session(server, received_message(tag=4))) == '<Session 4>'
