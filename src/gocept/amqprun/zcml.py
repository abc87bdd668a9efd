"""The directives of the ``http://namespaces.gocept.com/amqp`` namespace.

Runs on: the main thread, while the ZCML is loaded. The schemas below are
the directive reference (``meta.zcml`` registers them). Handlers check
their arguments and only record actions; the actions run once the whole
configuration is read: ``<amqp:writefiles>`` registers a handler utility,
``<amqp:readfiles>`` prepares the Maildir and hooks a reader to the
process events, ``<amqp:exchange>`` registers an ``IExchange`` utility the
server declares.
"""
import re

import zope.component.zcml
import zope.configuration.exceptions
import zope.configuration.fields
import zope.interface
import zope.schema
import zope.schema.interfaces

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.readfiles
import gocept.amqprun.topology
import gocept.amqprun.writefiles


#: The prefix of the utility names ``<amqp:writefiles>`` registers.
WRITEFILES_HANDLER_PREFIX = 'gocept.amqprun.amqpwrite.'

# One ``key = value`` pair and the white space after it.
_ARGUMENT = re.compile(
    r'(?P<key>[^\s=:"]+)\s*[=:]\s*(?P<value>"[^"]*"|[^\s"]+)(?:\s+|$)')
_INTEGER = re.compile(r'[+-]?[0-9]+')
_BOOLEANS = {'true': True, 'false': False}


class InvalidQueueArguments(zope.schema.ValidationError):
    """Queue arguments must be ``key = value`` pairs"""


def queue_argument_value(text):
    """Return the value of one ``key = value`` pair with its type.

    Integers become ``int`` (``x-message-ttl = 1000``), ``true`` and
    ``false`` become ``bool``; text in double quotes stays text without
    the quotes (``"1000"``); anything else is text.
    """
    if _INTEGER.fullmatch(text):
        return int(text)
    if text in _BOOLEANS:
        return _BOOLEANS[text]
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


@zope.interface.implementer(zope.schema.interfaces.IFromUnicode)
class QueueArguments(zope.schema.Dict):
    """A dict written as ``key = value`` pairs (upstream's
    RepresentableDict, which also accepted ``key: value``).

    The XML parser turns the line breaks of an attribute into spaces, so
    pairs are separated by white space, one per line reads best; a value
    containing white space goes in double quotes. Values get their types
    by :func:`queue_argument_value`.
    """

    def __init__(self, **kw):
        super().__init__(key_type=zope.schema.TextLine(min_length=1), **kw)

    def fromUnicode(self, text):
        """Parse ``text``; raise InvalidQueueArguments if it cannot."""
        result = {}
        position = 0
        text = text.strip()
        while position < len(text):
            match = _ARGUMENT.match(text, position)
            if match is None:
                raise InvalidQueueArguments(
                    'expected "key = value" at %r' % text[position:]
                ).with_field_and_value(self, text)
            key = match.group('key')
            if key in result:
                raise InvalidQueueArguments(
                    'duplicate key %r' % key).with_field_and_value(self, text)
            result[key] = queue_argument_value(match.group('value'))
            position = match.end()
        self.validate(result)
        return result


class IWriteFilesDirective(zope.interface.Interface):
    """``<amqp:writefiles>``: store every message of a queue as files."""

    routing_key = zope.configuration.fields.Tokens(
        title='Routing keys',
        description='One or more routing keys, separated by spaces, the '
                    'queue is bound with (a ``fanout`` or ``headers`` '
                    'exchange ignores them: write any, e.g. ``#``).',
        value_type=zope.schema.TextLine(min_length=1),
        min_length=1,
        required=True)

    queue_name = zope.schema.TextLine(
        title='Queue name',
        description='The durable queue to declare and consume. The handler '
                    'is registered as the IHandler utility '
                    '``gocept.amqprun.amqpwrite.<queue_name>``.',
        min_length=1,
        required=True)

    directory = zope.configuration.fields.Path(
        title='Directory',
        description='Where the files are written (relative paths are '
                    'relative to the ZCML file). It is created when '
                    'missing, its parent must exist.',
        required=True)

    pattern = zope.schema.TextLine(
        title='File name pattern',
        description='The body file\'s path below the directory, a '
                    '``string.Template`` with the variables ``date`` '
                    '(``%Y-%m-%d`` of the message timestamp), ``msgid``, '
                    '``routing_key``, ``unique`` and ``xfilename`` (the '
                    '``X-Filename`` header). ``{name}`` is accepted for '
                    '``${name}``. Slashes create directories. Empty or '
                    'missing: ``${routing_key}-${unique}``. The header file '
                    'sits beside the body file (``foo.xml``: '
                    '``foo.header.xml``).',
        required=False,
        default=None)

    arguments = QueueArguments(
        title='Queue arguments',
        description='``key = value`` pairs (one per line) passed as '
                    'arguments to ``queue.declare``, e.g. ``x-queue-type = '
                    'quorum``. Integers become numbers (``x-message-ttl = '
                    '1000``), ``true``/``false`` booleans; a value in double '
                    'quotes stays text (and may contain spaces).',
        required=False)

    exchange = zope.schema.TextLine(
        title='Exchange',
        description='The exchange the queue is bound to. It must exist on '
                    'the broker or be declared with ``<amqp:exchange>``.',
        min_length=1,
        default=gocept.amqprun.topology.DEFAULT_EXCHANGE,
        required=False)

    binding_arguments = QueueArguments(
        title='Binding arguments',
        description='``key = value`` pairs (one per line, typed as for '
                    '``arguments``) passed as arguments to ``queue.bind``; '
                    'a ``headers`` exchange matches on them, e.g. '
                    '``x-match = all`` and ``format = pdf``.',
        required=False)


def writefiles_directive(_context, routing_key, queue_name, directory,
                         pattern=None, arguments=None,
                         exchange=gocept.amqprun.topology.DEFAULT_EXCHANGE,
                         binding_arguments=None):
    """Record the registration of a :class:`~gocept.amqprun.writefiles.
    FileWriter` handler; a bad pattern is a configuration error."""
    try:
        writer = gocept.amqprun.writefiles.FileWriter(directory, pattern)
    except ValueError as e:
        raise zope.configuration.exceptions.ConfigurationError(str(e)) from e
    handler = gocept.amqprun.handler.Handler(
        queue_name, list(routing_key), writer, arguments=arguments or None,
        exchange=exchange, binding_arguments=binding_arguments or None)
    name = WRITEFILES_HANDLER_PREFIX + queue_name
    interface = gocept.amqprun.interfaces.IHandler
    # The discriminator of <utility>: a clash with another registration
    # of the same name is a configuration conflict.
    _context.action(
        discriminator=('utility', interface, name),
        callable=zope.component.zcml.handler,
        args=('registerUtility', handler, interface, name, _context.info))


class IReadFilesDirective(zope.interface.Interface):
    """``<amqp:readfiles>``: send the files dropped into a Maildir."""

    directory = zope.configuration.fields.Path(
        title='Maildir',
        description='The Maildir to read; ``tmp``, ``new`` and ``cur`` are '
                    'created. Write each file to ``tmp/`` and rename it '
                    'into ``new/``; once sent it is moved to ``cur/``.',
        required=True)

    routing_key = zope.schema.TextLine(
        title='Routing key',
        description='The routing key the files are sent with, their name '
                    'in the ``X-Filename`` header.',
        min_length=1,
        required=True)

    exchange = zope.schema.TextLine(
        title='Exchange',
        description='The exchange the files are sent to. It must exist on '
                    'the broker or be declared with ``<amqp:exchange>``.',
        min_length=1,
        default=gocept.amqprun.topology.DEFAULT_EXCHANGE,
        required=False)

    poll_interval = zope.schema.Float(
        title='Poll interval',
        description='Seconds between two scans of ``new/``.',
        min=0.01,
        default=1.0,
        required=False)


def readfiles_directive(_context, directory, routing_key, poll_interval=1.0,
                        exchange=gocept.amqprun.topology.DEFAULT_EXCHANGE):
    """Record the creation of a :class:`~gocept.amqprun.readfiles.
    MaildirReader` for ``directory``; one reader per Maildir."""
    _context.action(
        discriminator=('gocept.amqprun:readfiles', directory),
        callable=gocept.amqprun.readfiles.register_reader,
        args=(directory, routing_key, poll_interval, exchange))


class IExchangeDirective(zope.interface.Interface):
    """``<amqp:exchange>``: declare an exchange whenever the server
    connects, before the handler queues are bound."""

    name = zope.schema.TextLine(
        title='Name',
        description='The exchange\'s name; it must not start with '
                    '``amq.`` (those are the broker\'s own, bind to them '
                    'without declaring them). Declare each name once: a '
                    'second ``<amqp:exchange>`` for it is a conflict.',
        min_length=1,
        required=True)

    type = zope.schema.TextLine(
        title='Type',
        description='``direct``, ``topic``, ``fanout`` or ``headers``, or '
                    'the ``x-`` type of a broker plugin (e.g. '
                    '``x-consistent-hash``; the plugin must be enabled).',
        min_length=1,
        required=True)

    durable = zope.configuration.fields.Bool(
        title='Durable',
        description='Whether the exchange survives a broker restart.',
        default=True,
        required=False)

    auto_delete = zope.configuration.fields.Bool(
        title='Auto-delete',
        description='Whether the broker deletes the exchange when its last '
                    'binding is removed.',
        default=False,
        required=False)

    arguments = QueueArguments(
        title='Exchange arguments',
        description='``key = value`` pairs (one per line, typed as for '
                    'the queue ``arguments`` of ``<amqp:writefiles>``) '
                    'passed as arguments to ``exchange.declare``, e.g. '
                    '``alternate-exchange = unrouted``.',
        required=False)


def exchange_directive(_context, name, type, durable=True, auto_delete=False,
                       arguments=None):
    """Record the registration of an :class:`~gocept.amqprun.topology.
    Exchange` utility; a reserved name or an unknown type is a
    configuration error."""
    try:
        exchange = gocept.amqprun.topology.Exchange(
            name, type, durable=durable, auto_delete=auto_delete,
            arguments=arguments or None)
    except ValueError as e:
        raise zope.configuration.exceptions.ConfigurationError(str(e)) from e
    interface = gocept.amqprun.interfaces.IExchange
    # The discriminator of <utility>: one declaration per exchange name.
    _context.action(
        discriminator=('utility', interface, name),
        callable=zope.component.zcml.handler,
        args=('registerUtility', exchange, interface, name, _context.info))
