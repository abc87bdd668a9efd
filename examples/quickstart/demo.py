"""Run the README's example daemon end to end.

Uses the broker named by AMQP_HOSTNAME/AMQP_PORT/AMQP_USERNAME/
AMQP_PASSWORD/AMQP_VIRTUALHOST, or starts a private loopback RabbitMQ node
when none is named. Starts ``server app.conf``, sends one message to
``test.routing``, prints the reply that arrives on ``test.thank.messages``,
then stops the daemon with SIGTERM (as ``zdaemon stop`` does).
"""
import os
import signal
import string
import subprocess
import sys
import tempfile
import time

import amqp

import gocept.amqprun.testing.broker


HERE = os.path.dirname(os.path.abspath(__file__))


def broker_from_environment():
    """Return (node or None, connection settings)."""
    if os.environ.get('AMQP_HOSTNAME'):
        return None, dict(
            hostname=os.environ['AMQP_HOSTNAME'],
            port=int(os.environ.get('AMQP_PORT', 5672)),
            username=os.environ.get('AMQP_USERNAME', 'guest'),
            password=os.environ.get('AMQP_PASSWORD', 'guest'),
            virtual_host=os.environ.get('AMQP_VIRTUALHOST', '/'))
    print('Starting a private RabbitMQ node on 127.0.0.1 ...', flush=True)
    node = gocept.amqprun.testing.broker.RabbitMQNode()
    node.start()
    return node, dict(hostname=node.hostname, port=node.port,
                      username=node.username, password=node.password,
                      virtual_host='/')


def write_config(directory, broker):
    """Fill in app.conf.in; return the path of the result."""
    with open(os.path.join(HERE, 'app.conf.in')) as f:
        template = string.Template(f.read())
    path = os.path.join(directory, 'app.conf')
    with open(path, 'w') as f:
        f.write(template.substitute(broker, here=HERE))
    return path


def open_client(broker):
    """A plain py-amqp client on the other side of the daemon."""
    connection = amqp.Connection(
        host='%s:%s' % (broker['hostname'], broker['port']),
        userid=broker['username'], password=broker['password'],
        virtual_host=broker['virtual_host'])
    connection.connect()
    channel = connection.channel()
    queue, _, _ = channel.queue_declare(exclusive=True)
    channel.queue_bind(queue, 'amq.topic', 'test.thank.messages')
    return connection, channel, queue


def wait_for_reply(channel, queue, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = channel.basic_get(queue, no_ack=True)
        if reply is not None:
            return reply
        time.sleep(0.1)
    raise SystemExit('No reply on test.thank.messages within %d s' % timeout)


def main():
    node, broker = broker_from_environment()
    daemon = None
    try:
        with tempfile.TemporaryDirectory() as directory:
            config = write_config(directory, broker)
            connection, channel, queue = open_client(broker)
            print('$ server %s' % config, flush=True)
            env = dict(os.environ, PYTHONPATH=HERE)
            daemon = subprocess.Popen(['server', config], env=env)
            time.sleep(0.5)
            channel.basic_publish(
                amqp.Message('Hello from the quick start!',
                             message_id='<demo-1@quickstart>',
                             application_headers={'references': '<a@b>'}),
                exchange='amq.topic', routing_key='test.routing')
            reply = wait_for_reply(channel, queue)
            print('\nReply on test.thank.messages:', flush=True)
            print('  body:           %r' % reply.body)
            print('  message_id:     %s' % reply.properties['message_id'])
            print('  correlation_id: %s' % reply.properties['correlation_id'])
            print('  references:     %r' % reply.properties[
                'application_headers']['references'])
            print(flush=True)
            connection.close()
            daemon.send_signal(signal.SIGTERM)
            status = daemon.wait(60)
            print('server exited with status %s' % status)
            return status
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        if node is not None:
            node.stop()


if __name__ == '__main__':
    sys.exit(main())
