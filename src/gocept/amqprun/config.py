"""ZConfig: loading the configuration file and the section datatypes.

Runs on: the main thread, at start-up.
"""
import os.path

import ZConfig

import gocept.amqprun.interfaces


SCHEMA = os.path.join(os.path.dirname(__file__), 'schema.xml')


def amqp_server(section):
    """Datatype of ``<amqp-server>``: check value ranges."""
    _require(section.heartbeat_interval >= 0, 'heartbeat_interval',
             'must not be negative')
    _require(section.prefetch_count is None or section.prefetch_count > 0,
             'prefetch_count', 'must be positive')
    _require(section.startup_attempts > 0, 'startup_attempts',
             'must be positive')
    return section


def worker(section):
    """Datatype of ``<worker>``: check value ranges."""
    _require(section.amount >= 0, 'amount', 'must not be negative')
    _require(section.max_attempts >= 0, 'max-attempts',
             'must not be negative')
    _require(section.retry_delay >= 0, 'retry-delay', 'must not be negative')
    return section


def _require(condition, key, problem):
    if not condition:
        raise ValueError('%s %s' % (key, problem))


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
    except OSError as e:
        raise gocept.amqprun.interfaces.ConfigurationError(
            'Cannot read configuration file %s: %s' % (
                path, e.strerror or e)) from e
    return config


def one_line(error):
    """The text of ``error`` folded into one line."""
    return ' '.join(str(error).split())
