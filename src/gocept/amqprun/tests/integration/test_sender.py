"""Sending with a Server run in a thread, as the README recipe does."""
import threading

import pytest
import transaction
import zope.interface.verify

import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.server


@pytest.fixture
def start_server(amqp_broker, amqp_vhost, clean_registry):
    """The README's ``start_server(**kw)`` recipe; stops what it started."""
    started = []

    def start_server(**kw):
        parameters = gocept.amqprun.connection.Parameters(**kw)
        server = gocept.amqprun.server.Server(parameters)
        server_thread = threading.Thread(target=server.start)
        server_thread.daemon = True
        server_thread.start()
        started.append((server, server_thread))
        return server

    yield lambda: start_server(
        hostname=amqp_broker.hostname, port=str(amqp_broker.port),
        username=amqp_broker.username, password=amqp_broker.password,
        virtual_host=amqp_vhost)
    for server, thread in started:
        server.stop()
        thread.join(10)
        assert not thread.is_alive()
        assert server.connection is None


def message(body, routing_key='test.sent'):
    return gocept.amqprun.message.Message({}, body, routing_key=routing_key)


def test_server_provides_iloop_and_isender(start_server):
    server = start_server()
    zope.interface.verify.verifyObject(
        gocept.amqprun.interfaces.ILoop, server)
    zope.interface.verify.verifyObject(
        gocept.amqprun.interfaces.ISender, server)


def test_message_is_published_on_commit_even_before_connecting(
        start_server, amqp_client):
    amqp_client.expect_message_on('test.sent')
    server = start_server()  # not waiting: the commit waits for it
    server.send(message('hello'))
    transaction.commit()
    received = amqp_client.wait_for_message()
    assert received.body == 'hello'
    assert received.properties['delivery_mode'] == 2


def test_message_is_not_published_before_commit(start_server, amqp_client):
    amqp_client.expect_message_on('test.sent')
    server = start_server()
    assert server.wait_until_running(10)
    server.send(message('hello'))
    amqp_client.assert_no_message(0.5)
    transaction.abort()


def test_abort_publishes_nothing_and_later_sends_work(
        start_server, amqp_client):
    amqp_client.expect_message_on('test.sent')
    server = start_server()
    assert server.wait_until_running(10)
    server.send(message('message 1'))
    transaction.abort()
    server.send(message('message 2'))
    transaction.commit()
    assert amqp_client.wait_for_message().body == 'message 2'
    amqp_client.assert_no_message(0.3)


def test_consecutive_commits_each_publish(start_server, amqp_client):
    amqp_client.expect_message_on('test.sent')
    server = start_server()
    for number in range(3):
        server.send(message('message %d' % number))
        transaction.commit()
    bodies = [m.body for m in amqp_client.wait_for_messages(3)]
    assert bodies == ['message 0', 'message 1', 'message 2']


def test_each_thread_sends_in_its_own_transaction(start_server, amqp_client):
    amqp_client.expect_message_on('test.sent')
    server = start_server()
    assert server.wait_until_running(10)

    def send(number):
        server.send(message('from thread %d' % number))
        if number % 2:
            transaction.abort()
        else:
            transaction.commit()

    threads = [threading.Thread(target=send, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bodies = sorted(m.body for m in amqp_client.wait_for_messages(3))
    assert bodies == ['from thread 0', 'from thread 2', 'from thread 4']
    amqp_client.assert_no_message(0.3)


def test_unicode_routing_key_header_and_body_can_be_sent(
        start_server, amqp_client):
    amqp_client.expect_message_on('test.ümlaut')
    server = start_server()
    server.send(gocept.amqprun.message.Message(
        {'x-note': 'Grüße'}, 'Grüße', routing_key='test.ümlaut'))
    transaction.commit()
    received = amqp_client.wait_for_message()
    assert received.body == 'Grüße'
    assert received.properties['application_headers']['x-note'] == 'Grüße'


def test_two_servers_in_one_process_do_not_disturb_each_other(
        start_server, amqp_client):
    amqp_client.expect_message_on('test.sent')
    first, second = start_server(), start_server()
    first.send(message('first'))
    second.send(message('second'))
    transaction.commit()
    bodies = sorted(m.body for m in amqp_client.wait_for_messages(2))
    assert bodies == ['first', 'second']
