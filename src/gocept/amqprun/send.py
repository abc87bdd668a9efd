"""The ``amqprun-send`` console script: publish one message from the shell.

Runs on: the main thread, plus the I/O thread of a send-only
:class:`gocept.amqprun.server.Server` (so that, as everywhere, only
``connection.py`` and ``server.py`` talk to the AMQP client library).

``amqprun-send CONFIG ROUTING_KEY`` reads the body from standard input (or
``--file``), connects to the broker named in the ``<amqp-server>`` section
of the daemon's configuration file and publishes the message to
``amq.topic`` (or ``--exchange``) through :meth:`Server.send` and a
transaction commit, i.e. with the same defaults as any message the daemon
sends (message id, persistent delivery, timestamp). It prints the message
id. A bad command line or configuration file exits with status 2, a broker
that cannot be reached or refuses the message with status 1; either way
with one line on standard error.
"""
import argparse
import logging
import sys
import threading
import time

import transaction

import gocept.amqprun.config
import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.server


log = logging.getLogger(__name__)

PROGRAM = 'amqprun-send'


class SendFailed(gocept.amqprun.interfaces.AMQPRunError):
    """The message could not be published (the text says why)."""


def header_item(text):
    """argparse type of ``--header``: ``KEY=VALUE`` -> (key, value)."""
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            'expected KEY=VALUE, got %r' % text)
    return key, value


def parse_arguments(argv):
    """Parse the command line of ``amqprun-send``."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description='Publish one message to the AMQP broker named in a '
                    'gocept.amqprun configuration file (the file the '
                    '`server` script runs with). The body is read from '
                    'standard input unless --file is given; the message id '
                    'is printed.')
    parser.add_argument('config_file', metavar='CONFIG',
                        help='the ZConfig configuration file of the daemon')
    parser.add_argument('routing_key', metavar='ROUTING_KEY',
                        help='routing key to publish with')
    parser.add_argument('-f', '--file', metavar='FILE',
                        help='read the body from FILE instead of stdin')
    parser.add_argument('-H', '--header', metavar='KEY=VALUE',
                        type=header_item, action='append', default=[],
                        help='an application header (repeatable; values '
                             'are text)')
    parser.add_argument('-t', '--content-type', metavar='TYPE',
                        help='the content_type property, e.g. text/plain')
    parser.add_argument('-e', '--exchange', default='amq.topic',
                        help='exchange to publish to (default: %(default)s)')
    parser.add_argument('--timeout', type=float, default=30,
                        metavar='SECONDS',
                        help='give up connecting after this long '
                             '(default: %(default)s)')
    parser.add_argument('--attempts', type=int, default=1, metavar='N',
                        help='connection attempts before giving up '
                             '(default: %(default)s)')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='log the connection on standard error')
    return parser.parse_args(argv)


def read_body(path):
    """The body: the bytes of ``path``, or of standard input for None."""
    if path is None:
        return sys.stdin.buffer.read()
    with open(path, 'rb') as f:
        return f.read()


def build_message(arguments, body):
    """The :class:`gocept.amqprun.message.Message` to publish."""
    header = {'headers': dict(arguments.header)}
    if arguments.content_type:
        header['content_type'] = arguments.content_type
    return gocept.amqprun.message.Message(
        header, body, routing_key=arguments.routing_key,
        exchange=arguments.exchange)


def send(parameters, message, timeout):
    """Publish ``message`` with a send-only Server run in a thread.

    Raises :class:`SendFailed` when no connection comes up within
    ``timeout`` seconds (or the server gives up earlier) or when the
    broker does not commit the publish.
    """
    server = gocept.amqprun.server.Server(parameters, setup_handlers=False)
    thread = threading.Thread(target=server.start, name='amqprun-io',
                              daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.wait_until_running(0.05):
            if not thread.is_alive():
                raise SendFailed(str(server.error or 'the connection to %s '
                                     'failed' % parameters.address))
            if time.monotonic() > deadline:
                raise SendFailed('No connection to the AMQP broker at %s '
                                 'within %s s' % (parameters.address,
                                                  timeout))
        try:
            server.send(message)  # PublishRefused for a body too large
            transaction.commit()
        except Exception as e:
            transaction.abort()
            raise SendFailed('The broker at %s did not take the message: %s'
                             % (parameters.address,
                                gocept.amqprun.connection.describe(e))) from e
    finally:
        server.stop()
        thread.join(timeout)


def configure_logging(verbose):
    """Log to stderr with --verbose; otherwise stay quiet (errors are
    reported as one line by :func:`main`)."""
    root = logging.getLogger()
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            '%(asctime)s %(levelname)s %(name)s %(message)s'))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    else:
        root.addHandler(logging.NullHandler())


def fail(text, status):
    """Write one line to stderr; return ``status``."""
    sys.stderr.write('%s: %s\n' % (PROGRAM, ' '.join(str(text).split())))
    return status


def run(argv):
    """Send as ``argv`` says; return the exit status."""
    arguments = parse_arguments(argv)
    configure_logging(arguments.verbose)
    try:
        conf = gocept.amqprun.config.load(arguments.config_file)
    except gocept.amqprun.interfaces.ConfigurationError as e:
        return fail(e, 2)
    try:
        body = read_body(arguments.file)
    except OSError as e:
        return fail('Cannot read %s: %s' % (arguments.file, e.strerror), 2)
    if arguments.attempts < 1:
        return fail('--attempts must be at least 1', 2)
    parameters = gocept.amqprun.connection.Parameters.from_section(
        conf.amqp_server, startup_attempts=arguments.attempts)
    message = build_message(arguments, body)
    try:
        send(parameters, message, arguments.timeout)
    except SendFailed as e:
        return fail(e, 1)
    print(message.header.message_id)
    return 0


def main(argv=None):
    """Console script entry point."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':  # pragma: no cover (runs in a subprocess)
    main()
