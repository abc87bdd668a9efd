"""The ``amqprun-status`` console script: is the running daemon ready?

Runs on: the main thread of its own process. Reads the ``<metrics>``
address of the daemon's configuration file, asks the daemon's ``/readyz``
and prints one line: state (with the reason when not ready), node,
messages handled and failed, backlog. Exits 0 when ready, 1 when not, 2
when it cannot ask (no ``<metrics>`` section, port 0, nothing listening,
no answer). Needs no extra: it speaks plain HTTP.
"""
import argparse
import json
import socket
import sys
import urllib.error
import urllib.request

import gocept.amqprun.config
import gocept.amqprun.interfaces


PROGRAM = 'amqprun-status'

READY, NOT_READY, CANNOT_ASK = 0, 1, 2

#: Where to ask a daemon that listens on every interface.
LOOPBACK = {'0.0.0.0': '127.0.0.1', '::': '::1'}


class CannotAsk(Exception):
    """The daemon could not be asked; the message says why."""


def parse_arguments(argv):
    """The command line."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description='Ask the gocept.amqprun daemon of a configuration file '
                    'whether it is ready (through its <metrics> address). '
                    'Exit status: 0 ready, 1 not ready, 2 cannot ask.')
    parser.add_argument('config_file', help='the daemon\'s configuration file')
    parser.add_argument('--timeout', type=float, default=5, metavar='SECONDS',
                        help='give up waiting for an answer after this long '
                             '(default: %(default)s)')
    return parser.parse_args(argv)


def readiness_url(config_file):
    """The ``/readyz`` URL of the daemon configured in ``config_file``.

    Raises :class:`CannotAsk` without a ``<metrics>`` section or with
    port 0, and ``ConfigurationError`` for an invalid file.
    """
    conf = gocept.amqprun.config.load(config_file)
    if conf.metrics is None:
        raise CannotAsk('%s has no <metrics> section: nothing to ask'
                        % config_file)
    host, port = conf.metrics.address
    if port == 0:
        raise CannotAsk('the <metrics> address of %s has port 0 (a free '
                        'port at each start): give it a fixed port'
                        % config_file)
    host = LOOPBACK.get(host, host)
    return 'http://%s:%s/readyz' % ('[%s]' % host if ':' in host else host,
                                    port)


def ask(url, timeout):
    """``(ready, document)`` from the daemon at ``url``.

    Raises :class:`CannotAsk` when nobody answers or the answer is no
    readiness document.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (urllib.error.URLError, OSError, socket.timeout) as e:
        raise CannotAsk('cannot ask %s: %s' % (
            url, getattr(e, 'reason', None) or e))
    try:
        document = json.loads(body.decode('utf-8'))
        document['status']
    except (ValueError, TypeError, KeyError):
        raise CannotAsk('%s answered %s without a readiness document'
                        % (url, status))
    if status not in (200, 503):
        raise CannotAsk('%s answered %s' % (url, status))
    return status == 200, document


def format_line(document):
    """The one line: ``ready: node ..., handled N, failed N, backlog N``.
    """
    state = document['status']
    if document.get('reason'):
        state = '%s (%s)' % (state, document['reason'])
    return '%s: node %s, handled %s, failed %s, backlog %s' % (
        state, document.get('node') or '-', document.get('handled', '?'),
        document.get('failed', '?'), document.get('backlog', '?'))


def fail(text):
    """Write one line to stderr; return :data:`CANNOT_ASK`."""
    sys.stderr.write('%s: %s\n' % (PROGRAM, ' '.join(str(text).split())))
    return CANNOT_ASK


def run(argv):
    """Ask as ``argv`` says; print the line; return the exit status."""
    arguments = parse_arguments(argv)
    try:
        ready, document = ask(readiness_url(arguments.config_file),
                              arguments.timeout)
    except (CannotAsk, gocept.amqprun.interfaces.ConfigurationError) as e:
        return fail(e)
    print(format_line(document))
    return READY if ready else NOT_READY


def main(argv=None):
    """Console script entry point."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':  # pragma: no cover (runs in a subprocess)
    main()
