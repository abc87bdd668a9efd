"""Tests for gocept.amqprun.parameters: broker nodes, Parameters, TLS
settings."""
import io
import random
import ssl

import pytest
import ZConfig

import gocept.amqprun.config
from gocept.amqprun.interfaces import ConfigurationError
from gocept.amqprun.parameters import DEFAULT_PORT
from gocept.amqprun.parameters import Node
from gocept.amqprun.parameters import Parameters
from gocept.amqprun.parameters import parse_nodes


# -- nodes --------------------------------------------------------------------

def addresses(nodes):
    return [node.address for node in nodes]


@pytest.mark.parametrize('hostname', [
    'rabbit1 rabbit2:5673 rabbit3', 'rabbit1,rabbit2:5673, rabbit3',
    ' rabbit1\n rabbit2:5673\trabbit3 ',
    ['rabbit1', 'rabbit2:5673', 'rabbit3']])
def test_parse_nodes_takes_spaces_commas_and_lists(hostname):
    assert addresses(parse_nodes(hostname, 5672)) == [
        'rabbit1:5672', 'rabbit2:5673', 'rabbit3:5672']


def test_parse_nodes_understands_ipv6_in_brackets():
    nodes = parse_nodes('[::1]:5673 [fe80::1]', 5672)
    assert [(node.host, node.port) for node in nodes] == [
        ('::1', 5673), ('fe80::1', 5672)]
    assert addresses(nodes) == ['[::1]:5673', '[fe80::1]:5672']


@pytest.mark.parametrize('hostname, problem', [
    ('', 'names no broker node'), (' , ', 'names no broker node'),
    ('rabbit:fivek', "invalid port in broker node 'rabbit:fivek'")])
def test_parse_nodes_refuses_what_names_no_node(hostname, problem):
    with pytest.raises(ValueError, match=problem):
        parse_nodes(hostname, 5672)


def test_nodes_compare_by_host_and_port():
    assert Node('a', 1) == Node('a', '1')
    assert Node('a', 1) != Node('a', 2)
    assert Node('a', 1) != 'a:1'
    assert len({Node('a', 1), Node('a', 1)}) == 1
    assert repr(Node('a', 1)) == '<Node a:1>'
    assert str(Node('a', 1)) == 'a:1'


# -- Parameters ---------------------------------------------------------------

def test_parameters_defaults():
    parameters = Parameters()
    assert parameters.hostname == 'localhost'
    assert parameters.port == DEFAULT_PORT == 5672
    assert parameters.username is None
    assert parameters.password is None
    assert parameters.virtual_host == '/'
    assert parameters.heartbeat_interval == 0
    assert parameters.connect_timeout == 10.0
    assert parameters.prefetch_count == 10
    assert parameters.ssl is False
    assert parameters.startup_attempts == 5
    assert parameters.reconnect_delay == 1.0
    assert parameters.reconnect_max_delay == 30.0
    assert parameters.max_message_size == 134217728


def test_parameters_max_message_size_none_means_no_limit():
    assert Parameters(max_message_size=None).max_message_size == 0


def test_parameters_bail_on_unknown_keyword_argument():
    with pytest.raises(TypeError, match='virtualhost'):
        Parameters(virtualhost='/foo')


def test_parameters_convert_port_string_to_int():
    assert Parameters(port='1234').port == 1234


def test_parameters_empty_port_and_virtual_host_get_defaults():
    parameters = Parameters(port=None, virtual_host='')
    assert parameters.port == 5672
    assert parameters.virtual_host == '/'


def test_parameters_with_several_nodes():
    parameters = Parameters(hostname='rabbit1 rabbit2:5673', port=5674)
    assert addresses(parameters.nodes) == ['rabbit1:5674', 'rabbit2:5673']
    assert parameters.address == 'rabbit1:5674, rabbit2:5673'
    assert parameters.hostname == 'rabbit1:5674,rabbit2:5673'
    assert parameters.port == 5674


def test_parameters_with_one_node_and_its_port_keep_the_1x_meaning():
    parameters = Parameters(hostname='broker:1234')
    assert (parameters.hostname, parameters.port) == ('broker', 1234)
    assert parameters.address == 'broker:1234'


def test_parameters_shuffle_hosts_once(monkeypatch):
    monkeypatch.setattr(random, 'shuffle', list.reverse)
    parameters = Parameters(hostname='a b c', shuffle_hosts=True)
    assert addresses(parameters.nodes) == ['c:5672', 'b:5672', 'a:5672']
    assert parameters.shuffle_hosts is True
    assert addresses(Parameters(hostname='a b c').nodes) == [
        'a:5672', 'b:5672', 'c:5672']


def test_parameters_default_port_with_tls_is_5671():
    assert Parameters(ssl=True).port == 5671
    assert Parameters(ssl=True, port=5673).port == 5673
    assert Parameters(hostname='a b:5670', ssl=True).nodes[0].port == 5671


def test_parameters_without_tls_have_no_context():
    parameters = Parameters()
    assert parameters.tls_context is None
    assert parameters.authenticates_broker
    assert repr(parameters).startswith('<Parameters amqp://')


def test_parameters_with_tls_verify_chain_and_host_name():
    parameters = Parameters(ssl=True)
    context = parameters.tls_context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert parameters.authenticates_broker
    assert repr(parameters).startswith('<Parameters amqps://')
    assert parameters.server_hostname(parameters.nodes[0]) == 'localhost'


def test_parameters_with_tls_without_verification():
    parameters = Parameters(ssl=True, ssl_verify=False)
    assert parameters.tls_context.verify_mode == ssl.CERT_NONE
    assert parameters.tls_context.check_hostname is False
    assert not parameters.authenticates_broker


def test_parameters_take_a_ready_ssl_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    parameters = Parameters(ssl=context, ssl_server_hostname='rabbit')
    assert parameters.tls_context is context
    assert parameters.port == 5671
    assert parameters.server_hostname(parameters.nodes[0]) == 'rabbit'


@pytest.mark.parametrize('keyword', ['ssl_ca_file', 'ssl_cert_file'])
def test_parameters_with_an_unusable_tls_file_are_a_configuration_error(
        tmp_path, keyword):
    path = tmp_path / 'not-a-certificate.pem'
    path.write_text('garbage')
    with pytest.raises(ConfigurationError) as info:
        Parameters(ssl=True, **{keyword: str(path)})
    assert str(path) in str(info.value)
    assert '\n' not in str(info.value)


def test_parameters_convert_numbers():
    parameters = Parameters(
        heartbeat_interval='30', connect_timeout='2.5', prefetch_count='4',
        startup_attempts='2', reconnect_delay='0.5',
        reconnect_max_delay='8')
    assert parameters.heartbeat_interval == 30
    assert parameters.connect_timeout == 2.5
    assert parameters.prefetch_count == 4
    assert parameters.startup_attempts == 2
    assert parameters.reconnect_delay == 0.5
    assert parameters.reconnect_max_delay == 8.0


def test_parameters_none_heartbeat_is_zero():
    assert Parameters(heartbeat_interval=None).heartbeat_interval == 0


def test_parameters_address_and_repr():
    parameters = Parameters(hostname='broker', port=1234, username='user',
                            virtual_host='/vhost')
    assert parameters.address == 'broker:1234'
    assert repr(parameters) == '<Parameters amqp://user@broker:1234/vhost>'
    assert repr(Parameters()) == '<Parameters amqp://guest@localhost:5672/%2F>'


def load_section(text):
    """The ``<amqp-server>`` section of a configuration with ``text``."""
    schema = ZConfig.loadSchema(gocept.amqprun.config.SCHEMA)
    config, _ = ZConfig.loadConfigFile(schema, io.StringIO("""\
<eventlog>
</eventlog>
<amqp-server>
%s
</amqp-server>
<worker>
  amount 1
  component-configuration %s
</worker>
""" % (text, gocept.amqprun.config.SCHEMA)))
    return config.amqp_server


def test_parameters_from_section_take_the_configured_values():
    section = load_section("""
        hostname broker
        port 1234
        username user
        password secret
        virtual_host vhost
        heartbeat_interval 30
        prefetch_count 7
        startup_attempts 2
    """)
    parameters = Parameters.from_section(section)
    assert parameters.hostname == 'broker'
    assert parameters.port == 1234
    assert parameters.username == 'user'
    assert parameters.password == 'secret'
    assert parameters.virtual_host == 'vhost'
    assert parameters.heartbeat_interval == 30
    assert parameters.prefetch_count == 7
    assert parameters.startup_attempts == 2


def test_parameters_from_section_use_defaults_for_unset_keys():
    parameters = Parameters.from_section(load_section('hostname broker'))
    assert parameters.port == 5672
    assert parameters.username is None
    assert parameters.virtual_host == '/'
    assert parameters.prefetch_count == 10


def test_parameters_from_section_with_overrides():
    parameters = Parameters.from_section(
        load_section('hostname broker'), prefetch_count=3)
    assert parameters.prefetch_count == 3
