"""Tests for gocept.amqprun.config: the schema, its datatypes and load().

Each datatype is exercised with a configuration string.
"""
import pytest

import gocept.amqprun.config
from gocept.amqprun.interfaces import ConfigurationError
from gocept.amqprun.interfaces import FatalError


TEMPLATE = """\
<eventlog>
  <logfile>
    path {log}
  </logfile>
</eventlog>
<amqp-server>
  hostname localhost
{amqp}
</amqp-server>
<worker>
  amount 2
  component-configuration {zcml}
{worker}
</worker>
{extra}
"""


@pytest.fixture
def write(tmp_path):
    """Factory: write a configuration file; return its path.

    ``replace`` is an (old, new) pair applied to the text.
    """
    zcml = tmp_path / 'site.zcml'
    zcml.write_text('<configure xmlns="http://namespaces.zope.org/zope"/>')

    def write(amqp='', worker='', extra='', replace=('', '')):
        path = tmp_path / 'amqprun.conf'
        text = TEMPLATE.format(
            log=tmp_path / 'log', zcml=zcml, amqp=amqp, worker=worker,
            extra=extra)
        path.write_text(text.replace(*replace), encoding='utf-8')
        return str(path)
    return write


def load_error(path):
    with pytest.raises(ConfigurationError) as info:
        gocept.amqprun.config.load(path)
    return str(info.value)


def test_load_gives_sections_with_defaults(write, tmp_path):
    conf = gocept.amqprun.config.load(write())
    server = conf.amqp_server
    assert server.hostname == 'localhost'
    assert server.port is None  # 5672, or 5671 with ssl: see Parameters
    assert server.shuffle_hosts is False
    assert server.username is None
    assert server.password is None
    assert server.virtual_host == '/'
    assert server.heartbeat_interval == 0
    assert server.connect_timeout == 10.0
    assert server.prefetch_count is None
    assert server.ssl is False
    assert server.ssl_ca_file is None
    assert server.ssl_cert_file is None
    assert server.ssl_key_file is None
    assert server.ssl_verify is True
    assert server.ssl_server_hostname is None
    assert server.startup_attempts == 5
    assert server.reconnect_delay == 1.0
    assert server.reconnect_max_delay == 30.0
    assert server.max_message_size == 128 * 1024 * 1024
    worker = conf.worker
    assert worker.amount == 2
    assert worker.component_configuration == str(tmp_path / 'site.zcml')
    assert worker.shutdown_timeout == 30.0
    assert worker.retry_delay == 1.0
    assert worker.max_attempts == 0
    assert worker.transient_retries == 3
    assert worker.dead_letter_routing_key is None
    assert worker.dead_letter_exchange == 'amq.topic'
    assert conf.settings is None
    assert conf.metrics is None
    assert conf.loggers == []


def test_load_reads_every_key(write):
    conf = gocept.amqprun.config.load(write(amqp="""
        port 1234
        username user
        password secret
        virtual_host vhost
        heartbeat_interval 30
        connect_timeout 2.5
        prefetch_count 4
        ssl true
        startup_attempts 2
        reconnect_delay 0.5
        reconnect_max_delay 8
        max_message_size 16MB
    """, worker="""
        shutdown-timeout 5
        retry-delay 0.25
        max-attempts 3
        transient-retries 5
        dead-letter-routing-key dead
        dead-letter-exchange dlx
    """))
    server, worker = conf.amqp_server, conf.worker
    assert (server.port, server.username, server.password) == (
        1234, 'user', 'secret')
    assert server.virtual_host == 'vhost'
    assert server.heartbeat_interval == 30
    assert server.connect_timeout == 2.5
    assert server.prefetch_count == 4
    assert server.ssl is True
    assert server.startup_attempts == 2
    assert (server.reconnect_delay, server.reconnect_max_delay) == (0.5, 8)
    assert server.max_message_size == 16 * 1024 * 1024
    assert worker.shutdown_timeout == 5
    assert worker.retry_delay == 0.25
    assert worker.max_attempts == 3
    assert worker.transient_retries == 5
    assert worker.dead_letter_routing_key == 'dead'
    assert worker.dead_letter_exchange == 'dlx'


def test_settings_keep_key_case_and_are_text(write):
    conf = gocept.amqprun.config.load(write(extra="""
<settings>
  test.setting.1 foo
  test.SETTING.__default__ qux
  test.setting.unicode Ümläuten
</settings>
"""))
    assert dict(conf.settings) == {
        'test.setting.1': 'foo',
        'test.SETTING.__default__': 'qux',
        'test.setting.unicode': 'Ümläuten'}


def test_logger_sections_are_collected(write):
    conf = gocept.amqprun.config.load(write(extra="""
<logger>
  name foo
  level INFO
</logger>
"""))
    [logger] = conf.loggers
    assert logger.name == 'foo'


@pytest.mark.parametrize('amqp, problem', [
    ('heartbeat_interval -1', 'must not be negative'),
    ('prefetch_count 0', 'must be positive'),
    ('startup_attempts 0', 'must be positive'),
])
def test_amqp_server_datatype_checks_ranges(write, amqp, problem):
    assert problem in load_error(write(amqp=amqp))


@pytest.mark.parametrize('worker, problem', [
    ('max-attempts -1', 'must not be negative'),
    ('retry-delay -1', 'must not be negative'),
])
def test_worker_datatype_checks_ranges(write, worker, problem):
    assert problem in load_error(write(worker=worker))


def metrics(*lines):
    return '<metrics>\n%s\n</metrics>' % '\n'.join(lines)


@pytest.mark.parametrize('address, expected', [
    ('127.0.0.1:9187', ('127.0.0.1', 9187)),
    ('0.0.0.0:0', ('0.0.0.0', 0)),
    ('[::1]:9187', ('::1', 9187)),
    ('9187', ('127.0.0.1', 9187)),
    ('localhost:65535', ('localhost', 65535)),
])
def test_metrics_address_is_host_and_port(write, address, expected):
    conf = gocept.amqprun.config.load(
        write(extra=metrics('address %s' % address)))
    assert conf.metrics.address == expected
    assert conf.metrics.liveness_timeout == 30.0


@pytest.mark.parametrize('address', [
    'localhost', 'localhost:65536', ':9187', 'host:-1', 'host:port'])
def test_metrics_address_must_be_host_and_port(write, address):
    message = load_error(write(extra=metrics('address %s' % address)))
    assert repr(address) in message and 'line 16' in message


def test_metrics_section_needs_an_address(write):
    assert 'address' in load_error(write(extra=metrics()))


def test_metrics_liveness_timeout_must_be_positive(write):
    message = load_error(write(extra=metrics(
        'address 127.0.0.1:0', 'liveness-timeout 0')))
    assert 'must be positive' in message


def test_worker_amount_must_not_be_negative(write):
    path = write(replace=('amount 2', 'amount -1'))
    assert 'must not be negative' in load_error(path)


def test_worker_amount_zero_is_send_only(write):
    path = write(replace=('amount 2', 'amount 0'))
    assert gocept.amqprun.config.load(path).worker.amount == 0


def test_invalid_file_error_names_file_line_and_problem(write):
    path = write(amqp='port notaport')
    message = load_error(path)
    assert message.startswith('Invalid configuration file %s: ' % path)
    assert 'notaport' in message
    assert 'line 8' in message
    assert '\n' not in message


def test_out_of_range_value_error_names_its_line(write):
    message = load_error(write(worker='max-attempts -1'))
    assert 'line 13' in message
    assert 'line -1' not in message


def test_missing_required_key_is_named(write):
    path = write(replace=('hostname localhost', ''))
    assert 'hostname' in load_error(path)


def test_missing_component_configuration_file_is_named(write, tmp_path):
    path = write(replace=(
        str(tmp_path / 'site.zcml'), str(tmp_path / 'missing.zcml')))
    assert 'missing.zcml' in load_error(path)


def test_unknown_section_is_an_error(write):
    message = load_error(write(extra='<nonesuch>\n</nonesuch>'))
    assert 'nonesuch' in message


def test_missing_configuration_file_is_a_configuration_error(tmp_path):
    path = str(tmp_path / 'missing.conf')
    message = load_error(path)
    assert path in message
    assert '\n' not in message


def test_configuration_error_is_fatal():
    assert issubclass(ConfigurationError, FatalError)


def test_one_line_folds_whitespace():
    assert gocept.amqprun.config.one_line(
        ValueError('a\n  b\tc ')) == 'a b c'


def test_hostname_takes_several_nodes_and_keeps_the_text(write):
    path = write(replace=('hostname localhost',
                          'hostname rabbit1 rabbit2:5673,rabbit3'))
    conf = gocept.amqprun.config.load(path)
    assert conf.amqp_server.hostname == 'rabbit1 rabbit2:5673,rabbit3'


def test_hostname_with_a_bad_port_is_named_with_its_line(write):
    path = write(replace=('hostname localhost', 'hostname rabbit1:fivek'))
    message = load_error(path)
    assert "'rabbit1:fivek'" in message
    assert 'line 7' in message


def test_tls_files_must_exist(write, tmp_path):
    message = load_error(write(amqp='ssl_ca_file %s' % (tmp_path / 'ca')))
    assert str(tmp_path / 'ca') in message


def test_tls_keys_are_read(write, tmp_path):
    ca = tmp_path / 'ca.pem'
    ca.write_text('')
    conf = gocept.amqprun.config.load(write(amqp="""
  ssl true
  ssl_ca_file %s
  ssl_cert_file %s
  ssl_key_file %s
  ssl_verify false
  ssl_server_hostname rabbit.example.com
  shuffle_hosts true
""" % (ca, ca, ca)))
    server = conf.amqp_server
    assert server.ssl is True
    assert server.ssl_ca_file == server.ssl_cert_file == str(ca)
    assert server.ssl_key_file == str(ca)
    assert server.ssl_verify is False
    assert server.ssl_server_hostname == 'rabbit.example.com'
    assert server.shuffle_hosts is True
