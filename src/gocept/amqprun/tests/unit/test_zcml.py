"""Tests for gocept.amqprun.zcml: the amqp:writefiles, readfiles and
exchange directives.
"""
import os

import pytest
import zope.component
import zope.component.zcml
import zope.configuration.config
import zope.configuration.exceptions
import zope.configuration.xmlconfig
import zope.schema

import gocept.amqprun.interfaces
import gocept.amqprun.readfiles
import gocept.amqprun.writefiles
from gocept.amqprun.zcml import IExchangeDirective
from gocept.amqprun.zcml import IReadFilesDirective
from gocept.amqprun.zcml import IWriteFilesDirective
from gocept.amqprun.zcml import InvalidQueueArguments
from gocept.amqprun.zcml import QueueArguments
from gocept.amqprun.zcml import exchange_directive
from gocept.amqprun.zcml import queue_argument_value
from gocept.amqprun.zcml import readfiles_directive
from gocept.amqprun.zcml import writefiles_directive


class FakeContext:
    """Records the actions a directive handler asks for."""

    info = 'site.zcml, line 3'

    def __init__(self):
        self.actions = []

    def action(self, discriminator, callable=None, args=(), kw=None,
               **rest):
        self.actions.append(dict(discriminator=discriminator,
                                 callable=callable, args=args, kw=kw))


def configure(tmp_path, body):
    """Load a site ZCML with ``body`` from a file in ``tmp_path``."""
    path = tmp_path / 'site.zcml'
    path.write_text(
        '<configure xmlns="http://namespaces.zope.org/zope"\n'
        '           xmlns:amqp="http://namespaces.gocept.com/amqp">\n'
        '  <include package="gocept.amqprun" file="meta.zcml" />\n'
        '%s\n</configure>\n' % body)
    zope.configuration.xmlconfig.file(str(path))


def handlers():
    return dict(zope.component.getUtilitiesFor(
        gocept.amqprun.interfaces.IHandler))


def exchanges():
    return dict(zope.component.getUtilitiesFor(
        gocept.amqprun.interfaces.IExchange))


# -- schemas -----------------------------------------------------------------

@pytest.mark.parametrize('schema', [
    IWriteFilesDirective, IReadFilesDirective, IExchangeDirective])
def test_every_field_has_title_and_description(schema):
    for name, field in zope.schema.getFields(schema).items():
        assert field.title, name
        assert field.description, name


@pytest.mark.parametrize('text, value', [
    ('1000', 1000), ('-5', -5), ('+7', 7), ('quorum', 'quorum'),
    ('true', True), ('false', False), ('True', 'True'), ('"1000"', '1000'),
    ('"a b"', 'a b'), ('1.5', '1.5'), ('""', ''),
])
def test_queue_argument_values_get_their_types(text, value):
    result = queue_argument_value(text)
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize('text, expected', [
    ('x-ha-policy = all', {'x-ha-policy': 'all'}),
    ('\n  x-ha-policy = all\n  ', {'x-ha-policy': 'all'}),
    # what the XML parser leaves of line breaks in an attribute
    ('  x-queue-type = quorum   x-message-ttl = 1000  ',
     {'x-queue-type': 'quorum', 'x-message-ttl': 1000}),
    ('x-queue-type=quorum\nx-message-ttl=1000',
     {'x-queue-type': 'quorum', 'x-message-ttl': 1000}),
    ('x-dead-letter-routing-key: "dead letters"',
     {'x-dead-letter-routing-key': 'dead letters'}),
    ('x-single-active-consumer = true', {'x-single-active-consumer': True}),
    ('', {}),
])
def test_queue_arguments_are_read_from_key_value_pairs(text, expected):
    assert QueueArguments().fromUnicode(text) == expected


@pytest.mark.parametrize('text, problem', [
    ('x-ha-policy', 'expected "key = value"'),
    ('= all', 'expected "key = value"'),
    ('a = 1 b', 'expected "key = value"'),
    ('a = "open', 'expected "key = value"'),
    ('a = 1 a = 2', "duplicate key 'a'"),
])
def test_unreadable_queue_arguments_are_a_validation_error(text, problem):
    with pytest.raises(InvalidQueueArguments, match=problem):
        QueueArguments().fromUnicode(text)


# -- handlers against a recording context ------------------------------------

def test_writefiles_directive_records_a_handler_utility(tmp_path):
    context = FakeContext()
    writefiles_directive(
        context, ['test.foo', 'test.bar'], 'test.queue', str(tmp_path),
        pattern='{routing_key}/{unique}',
        arguments={'x-message-ttl': 1000})
    assert not os.listdir(tmp_path)  # no I/O while parsing
    (action,) = context.actions
    name = 'gocept.amqprun.amqpwrite.test.queue'
    assert action['discriminator'] == (
        'utility', gocept.amqprun.interfaces.IHandler, name)
    assert action['callable'] is zope.component.zcml.handler
    method, handler, interface, utility_name, info = action['args']
    assert method == 'registerUtility'
    assert interface is gocept.amqprun.interfaces.IHandler
    assert utility_name == name
    assert info == FakeContext.info
    assert handler.queue_name == 'test.queue'
    assert handler.routing_key == ['test.foo', 'test.bar']
    assert handler.arguments == {'x-message-ttl': 1000}
    writer = handler.handler_function
    assert isinstance(writer, gocept.amqprun.writefiles.FileWriter)
    assert writer.directory == str(tmp_path)
    assert writer.pattern == '${routing_key}/${unique}'


def test_writefiles_directive_defaults(tmp_path):
    context = FakeContext()
    writefiles_directive(context, ['test.data'], 'test.queue', str(tmp_path))
    handler = context.actions[0]['args'][1]
    assert handler.arguments is None
    assert handler.exchange == 'amq.topic'
    assert handler.binding_arguments is None
    assert handler.handler_function.pattern == '${routing_key}-${unique}'


def test_writefiles_directive_binds_to_its_exchange_with_its_arguments(
        tmp_path):
    context = FakeContext()
    writefiles_directive(context, ['#'], 'test.queue', str(tmp_path),
                         exchange='documents',
                         binding_arguments={'x-match': 'all'})
    handler = context.actions[0]['args'][1]
    assert handler.exchange == 'documents'
    assert handler.binding_arguments == {'x-match': 'all'}


def test_writefiles_directive_refuses_a_pattern_leaving_the_directory(
        tmp_path):
    with pytest.raises(zope.configuration.exceptions.ConfigurationError,
                       match='must be relative'):
        writefiles_directive(FakeContext(), ['test.data'], 'test.queue',
                             str(tmp_path), pattern='/etc/{unique}')


def test_readfiles_directive_records_the_reader_creation(tmp_path):
    context = FakeContext()
    directory = str(tmp_path / 'maildir')
    readfiles_directive(context, directory, 'test.data', poll_interval=0.5)
    assert not os.path.exists(directory)  # no I/O while parsing
    assert context.actions == [dict(
        discriminator=('gocept.amqprun:readfiles', directory),
        callable=gocept.amqprun.readfiles.register_reader,
        args=(directory, 'test.data', 0.5, 'amq.topic'), kw=None)]


def test_exchange_directive_records_an_exchange_utility():
    context = FakeContext()
    exchange_directive(context, 'orders', 'direct', durable=False,
                       auto_delete=True, arguments={'alternate-exchange': 'x'})
    (action,) = context.actions
    interface = gocept.amqprun.interfaces.IExchange
    assert action['discriminator'] == ('utility', interface, 'orders')
    assert action['callable'] is zope.component.zcml.handler
    method, exchange, registered_as, name, info = action['args']
    assert (method, registered_as, name, info) == (
        'registerUtility', interface, 'orders', FakeContext.info)
    assert (exchange.name, exchange.type, exchange.durable,
            exchange.auto_delete, exchange.arguments) == (
        'orders', 'direct', False, True, {'alternate-exchange': 'x'})


@pytest.mark.parametrize('name, type, problem', [
    ('orders', 'fan-out', "unknown type 'fan-out'"),
    ('amq.direct', 'direct', "names starting with 'amq.' belong to"),
])
def test_exchange_directive_refuses_what_cannot_be_declared(
        name, type, problem):
    context = FakeContext()
    with pytest.raises(zope.configuration.exceptions.ConfigurationError,
                       match=problem):
        exchange_directive(context, name, type)
    assert context.actions == []


# -- real snippets -----------------------------------------------------------

def test_writefiles_snippet_registers_the_handler(tmp_path, clean_registry):
    configure(tmp_path, '''
      <amqp:writefiles
        routing_key="test.foo test.bar"
        queue_name="test.queue"
        directory="output"
        pattern="{routing_key}/{date}/{msgid}-{unique}.xml"
        arguments="
        x-ha-policy = all
        x-message-ttl = 1000
        "
        />''')
    handler = handlers()['gocept.amqprun.amqpwrite.test.queue']
    assert handler.routing_key == ['test.foo', 'test.bar']
    assert handler.queue_name == 'test.queue'
    assert handler.arguments == {'x-ha-policy': 'all', 'x-message-ttl': 1000}
    writer = handler.handler_function
    assert writer.directory == str(tmp_path / 'output')
    assert writer.pattern == '${routing_key}/${date}/${msgid}-${unique}.xml'


def test_writefiles_snippet_with_bad_arguments_names_the_attribute(
        tmp_path, clean_registry):
    with pytest.raises(zope.configuration.exceptions.ConfigurationError,
                       match='arguments') as info:
        configure(tmp_path, '''<amqp:writefiles routing_key="test.data"
            queue_name="test.queue" directory="out" arguments="nonsense" />''')
    assert 'expected "key = value" at \'nonsense\'' in str(info.value)


def test_two_writefiles_on_one_queue_conflict(tmp_path, clean_registry):
    with pytest.raises(zope.configuration.config.ConfigurationConflictError):
        configure(tmp_path, '''
          <amqp:writefiles routing_key="a" queue_name="q" directory="a" />
          <amqp:writefiles routing_key="b" queue_name="q" directory="b" />''')


def test_readfiles_snippet_prepares_the_maildir_and_hooks_the_events(
        tmp_path, clean_registry):
    configure(tmp_path, '''
      <amqp:readfiles
        directory="input"
        routing_key="test.data"
        />''')
    assert sorted(os.listdir(tmp_path / 'input')) == ['cur', 'new', 'tmp']
    registered = {
        registration.required[0]: registration.handler
        for registration in
        zope.component.getGlobalSiteManager().registeredHandlers()}
    started = registered[gocept.amqprun.interfaces.IProcessStarted]
    stopping = registered[gocept.amqprun.interfaces.IProcessStopping]
    reader = started.__self__
    assert stopping.__self__ is reader
    assert reader.maildir.path == str(tmp_path / 'input')
    assert reader.routing_key == 'test.data'
    assert reader.poll_interval == 1.0


def test_two_readfiles_on_one_maildir_conflict(tmp_path, clean_registry):
    with pytest.raises(zope.configuration.config.ConfigurationConflictError):
        configure(tmp_path, '''
          <amqp:readfiles directory="in" routing_key="a" />
          <amqp:readfiles directory="in" routing_key="b" />''')


def test_writefiles_snippet_binds_to_an_exchange_with_binding_arguments(
        tmp_path, clean_registry):
    configure(tmp_path, '''
      <amqp:writefiles
        routing_key="#"
        queue_name="test.queue"
        directory="output"
        exchange="documents"
        binding_arguments="
        x-match = any
        format = pdf
        pages = 2
        "
        />''')
    handler = handlers()['gocept.amqprun.amqpwrite.test.queue']
    assert handler.exchange == 'documents'
    assert handler.binding_arguments == {
        'x-match': 'any', 'format': 'pdf', 'pages': 2}


def test_readfiles_snippet_sends_to_its_exchange(tmp_path, clean_registry):
    configure(tmp_path, '''
      <amqp:readfiles directory="input" routing_key="" exchange="events" />
    '''.replace('routing_key=""', 'routing_key="any"'))
    registered = {
        registration.required[0]: registration.handler
        for registration in
        zope.component.getGlobalSiteManager().registeredHandlers()}
    reader = registered[gocept.amqprun.interfaces.IProcessStarted].__self__
    assert reader.exchange == 'events'


def test_exchange_snippet_registers_the_exchange(tmp_path, clean_registry):
    configure(tmp_path, '''
      <amqp:exchange
        name="orders"
        type="direct"
        durable="false"
        auto_delete="true"
        arguments="alternate-exchange = unrouted"
        />
      <amqp:exchange name="events" type="fanout" />''')
    orders = exchanges()['orders']
    assert (orders.type, orders.durable, orders.auto_delete,
            orders.arguments) == (
        'direct', False, True, {'alternate-exchange': 'unrouted'})
    events = exchanges()['events']
    assert (events.type, events.durable, events.auto_delete,
            events.arguments) == ('fanout', True, False, None)


def test_two_exchange_directives_for_one_name_conflict(
        tmp_path, clean_registry):
    with pytest.raises(zope.configuration.config.ConfigurationConflictError,
                       match='site.zcml'):
        configure(tmp_path, '''
          <amqp:exchange name="orders" type="direct" />
          <amqp:exchange name="orders" type="fanout" />''')


@pytest.mark.parametrize('attributes, problem', [
    ('name="orders" type="fan-out"', "unknown type 'fan-out'"),
    ('name="amq.orders" type="direct"', "'amq.orders' cannot be declared"),
    ('name="orders"', 'type'),
    ('name="orders" type="direct" durable="maybe"', 'durable'),
], ids=['unknown-type', 'reserved-name', 'no-type', 'bad-bool'])
def test_exchange_snippet_with_bad_input_is_an_error_at_load(
        tmp_path, clean_registry, attributes, problem):
    with pytest.raises(zope.configuration.exceptions.ConfigurationError,
                       match=problem) as info:
        configure(tmp_path, '<amqp:exchange %s />' % attributes)
    assert 'site.zcml' in str(info.value)
    assert exchanges() == {}
