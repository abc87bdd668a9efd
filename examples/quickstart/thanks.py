"""The README's getting-started handler, verbatim."""
import logging
import gocept.amqprun.handler
import gocept.amqprun.message

log = logging.getLogger(__name__)


@gocept.amqprun.handler.declare('test.queue', 'test.routing')
def log_message_body(message):
    log.info(message.body)
    msg = gocept.amqprun.message.Message(
        header=dict(content_type='text/plain'),
        body=u'Thank you for your message.',
        routing_key='test.thank.messages')
    return [msg]
