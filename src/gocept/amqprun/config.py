"""ZConfig: loading the configuration file and the section datatypes.

Runs on: the main thread, at start-up.
"""
import os.path

import ZConfig

import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.parameters


SCHEMA = os.path.join(os.path.dirname(__file__), 'schema.xml')


def non_negative_integer(value):
    """Datatype: an integer >= 0."""
    return _checked(int(value), lambda v: v >= 0, 'must not be negative')


def positive_integer(value):
    """Datatype: an integer > 0."""
    return _checked(int(value), lambda v: v > 0, 'must be positive')


def non_negative_float(value):
    """Datatype: a number >= 0."""
    return _checked(float(value), lambda v: v >= 0, 'must not be negative')


def broker_nodes(value):
    """Datatype: one or more ``host[:port]`` entries (spaces or commas);
    the text is kept, :class:`gocept.amqprun.connection.Parameters` parses
    it."""
    gocept.amqprun.parameters.parse_nodes(value, 5672)
    return value


def positive_float(value):
    """Datatype: a number > 0."""
    return _checked(float(value), lambda v: v > 0, 'must be positive')


def listen_address(value):
    """Datatype: ``host:port`` (``[v6-host]:port``; a bare port means
    127.0.0.1) -> ``(host, port)``; port 0 means a free one."""
    host, colon, port = value.strip().rpartition(':')
    if not colon:
        host = '127.0.0.1'
    host = host.strip('[]')
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError('%r is not host:port (port 0-65535)' % value)
    if not host:
        raise ValueError('%r names no host (0.0.0.0 listens on every '
                         'interface)' % value)
    return host, int(port)


def _checked(value, condition, problem):
    if not condition(value):
        raise ValueError('%s %s' % (value, problem))
    return value


def load(path):
    """Load the configuration file at ``path``.

    Raises :class:`gocept.amqprun.interfaces.ConfigurationError` with one
    line naming the file, the line and the problem.
    """
    schema = ZConfig.loadSchema(SCHEMA)
    try:
        config, _ = ZConfig.loadConfig(schema, path)
    except ZConfig.ConfigurationError as e:
        raise gocept.amqprun.interfaces.ConfigurationError(
            'Invalid configuration file %s: %s' % (path, one_line(e))) from e
    return config


def one_line(error):
    """The text of ``error`` folded into one line."""
    return ' '.join(str(error).split())
