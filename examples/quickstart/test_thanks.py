"""Tests for the quick start handler, written with gocept.amqprun.testing.

Run them with ``pytest examples/quickstart`` (the ``testing`` extra
installs the plugin that provides the ``amqp_*`` fixtures; without it, put
``pytest_plugins = ['gocept.amqprun.testing.pytest']`` into your top-level
``conftest.py``). They use the broker named by ``AMQP_HOSTNAME`` & co.,
or start a private RabbitMQ node on 127.0.0.1.
"""
import os

import gocept.amqprun.message

import thanks


HERE = os.path.dirname(os.path.abspath(__file__))


def site_zcml():
    """The quick start's own site.zcml."""
    with open(os.path.join(HERE, 'site.zcml')) as f:
        return f.read()


def test_handler_thanks_for_each_message():
    # A handler is a plain function: call it without any broker.
    message = gocept.amqprun.message.Message(
        {}, b'Hello', routing_key='test.routing')
    [reply] = thanks.log_message_body(message)
    assert reply.routing_key == 'test.thank.messages'
    assert reply.body == b'Thank you for your message.'
    assert reply.header.content_type == 'text/plain'


def test_daemon_replies_to_a_message(amqp_main, amqp_client):
    amqp_main(site_zcml())
    amqp_client.expect_message_on('test.thank.messages')
    message_id = amqp_client.send_message(b'Hello', 'test.routing')
    reply = amqp_client.wait_for_message()
    assert reply.body == 'Thank you for your message.'
    assert reply.properties['content_type'] == 'text/plain'
    assert reply.properties['correlation_id'] == message_id
    assert reply.properties['application_headers']['references'] == (
        message_id)


def test_the_message_is_logged(amqp_main, amqp_client):
    main = amqp_main(site_zcml())
    amqp_client.send_message(b'Log me', 'test.routing')
    main.wait_for_processing()
    assert "thanks b'Log me'" in main.log
