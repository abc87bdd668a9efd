"""Tests for gocept.amqprun.main: configuration loading and boot, no broker.

``run()`` is driven as far as it gets without a connection (bad files,
bad ZCML); ``configure()`` and ``serve()`` are exercised on their own, the
latter with a fake server and pool. Every test gets a fresh registry and
its logging and signal handlers restored.
"""
import logging
import signal
import sys
import threading
import types

import pytest
import zope.component

import gocept.amqprun.config
import gocept.amqprun.interfaces
import gocept.amqprun.main
import gocept.amqprun.process
from gocept.amqprun.interfaces import ConfigurationError
from gocept.amqprun.interfaces import IConfigFinished
from gocept.amqprun.interfaces import IHandler
from gocept.amqprun.interfaces import IProcessStarted
from gocept.amqprun.interfaces import IProcessStopping
from gocept.amqprun.interfaces import ISender
from gocept.amqprun.interfaces import ISettings
from gocept.amqprun.interfaces import IWorkersStopped
from gocept.amqprun.server import Server
from gocept.amqprun.tests.unit import handlers
from gocept.amqprun.tests.unit.fakes import close_server


HERE = 'gocept.amqprun.tests.unit.handlers'

ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="gocept.amqprun" />
  %s
</configure>
"""

CONFIG = """\
<eventlog>
  level {level}
  <logfile>
    path {log}
    format %(levelname)s %(name)s %(message)s
  </logfile>
</eventlog>
{loggers}
<amqp-server>
  hostname localhost
{amqp}
</amqp-server>
<worker>
  amount {amount}
  component-configuration {zcml}
{worker}
</worker>
{settings}
"""


@pytest.fixture(autouse=True)
def fresh_registry(registry):
    del handlers.seen_settings[:]
    yield
    del handlers.seen_settings[:]


@pytest.fixture(autouse=True)
def restore_logging():
    """Undo what ``<eventlog>`` and ``<logger>`` sections did."""
    def snapshot():
        loggers = [logging.getLogger()] + [
            logger for logger in logging.Logger.manager.loggerDict.values()
            if isinstance(logger, logging.Logger)]
        return {logger: (logger.level, list(logger.handlers))
                for logger in loggers}
    before = snapshot()
    yield
    for logger in snapshot():
        old_level, old_handlers = before.get(logger, (logging.NOTSET, []))
        for handler in logger.handlers[:]:
            if handler not in old_handlers:
                logger.removeHandler(handler)
                handler.close()
        logger.setLevel(old_level)


@pytest.fixture(autouse=True)
def restore_signals():
    """serve() installs signal handlers; give pytest its own back."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    before = {signum: signal.getsignal(signum) for signum in signals}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def reset_main_state():
    """Forget stop requests and the exit status of earlier tests."""
    gocept.amqprun.process.reset()
    yield
    gocept.amqprun.process.reset()
    gocept.amqprun.process.server = None


@pytest.fixture
def config(tmp_path):
    """Factory: write ZCML (registrations) and a config file; return its
    path. The event log goes to ``tmp_path / 'server.log'``."""
    def write(registrations='', amount=2, settings='', amqp='', worker='',
              loggers='', level='INFO'):
        zcml = tmp_path / 'site.zcml'
        zcml.write_text(ZCML % registrations)
        path = tmp_path / 'amqprun.conf'
        path.write_text(CONFIG.format(
            level=level, log=tmp_path / 'server.log', loggers=loggers,
            amqp=amqp, amount=amount, zcml=zcml, worker=worker,
            settings=settings), encoding='utf-8')
        return str(path)
    return write


@pytest.fixture
def configured(config):
    """Factory: load a config file and ``configure()`` it; the server's
    wake-up pipe is closed afterwards."""
    servers = []

    def configure(**kw):
        conf = gocept.amqprun.config.load(config(**kw))
        gocept.amqprun.main.configure_logging(conf)
        pool, server = gocept.amqprun.main.configure(conf)
        servers.append(server)
        return conf, pool, server
    yield configure
    for server in servers:
        close_server(server)


def log_lines(tmp_path):
    return (tmp_path / 'server.log').read_text().splitlines()


def utility(component, name):
    return '<utility component="%s.%s" name="%s" />' % (HERE, component, name)


# -- run(): configuration problems --------------------------------------------

def test_invalid_config_file_exits_2_with_one_line_on_stderr(
        config, capsys):
    path = config(amqp='port notaport')
    assert gocept.amqprun.main.run(path) == 2
    out, err = capsys.readouterr()
    assert out == ''
    [line] = err.splitlines()
    assert line.startswith('server: Invalid configuration file %s: ' % path)
    assert 'notaport' in line
    assert 'line ' in line


def test_missing_config_file_exits_2_with_one_line_on_stderr(
        tmp_path, capsys):
    path = str(tmp_path / 'missing.conf')
    assert gocept.amqprun.main.run(path) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith('server: ')
    assert path in line
    assert 'No such file' in line


def test_unusable_log_file_exits_2_with_one_line_on_stderr(
        config, tmp_path, capsys):
    path = config()
    with open(path) as f:
        text = f.read()
    with open(path, 'w') as f:  # the log file path names a directory
        f.write(text.replace(str(tmp_path / 'server.log'), str(tmp_path)))
    assert gocept.amqprun.main.run(path) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith('server: ')
    assert str(tmp_path) in line


def test_invalid_zcml_exits_1_with_one_critical_log_line(config, tmp_path):
    path = config(utility('nonesuch', 'broken'))
    assert gocept.amqprun.main.run(path) == 1
    lines = log_lines(tmp_path)
    critical = [line for line in lines if line.startswith('CRITICAL')]
    assert len(critical) == 1
    assert 'Invalid ZCML file %s' % (tmp_path / 'site.zcml') in critical[0]
    assert 'nonesuch' in critical[0]
    assert gocept.amqprun.process.server is None


def test_two_handlers_on_one_queue_exit_1_with_one_critical_log_line(
        config, tmp_path):
    path = config(utility('same_queue_1', 'one') +
                  utility('same_queue_2', 'two'))
    assert gocept.amqprun.main.run(path) == 1
    critical = [line for line in log_lines(tmp_path)
                if line.startswith('CRITICAL')]
    assert len(critical) == 1
    assert "'test.same'" in critical[0]
    assert "'one'" in critical[0] and "'two'" in critical[0]


def test_main_exits_with_the_status_of_run(config):
    with pytest.raises(SystemExit) as info:
        gocept.amqprun.main.main(config(amqp='port notaport'))
    assert info.value.code == 2


def test_main_without_argument_uses_the_command_line(config, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['server', config(amqp='port x')])
    with pytest.raises(SystemExit) as info:
        gocept.amqprun.main.main()
    assert info.value.code == 2


def test_parse_arguments_takes_the_config_file():
    assert gocept.amqprun.main.parse_arguments(
        ['amqprun.conf']).config_file == 'amqprun.conf'


def test_parse_arguments_requires_the_config_file(capsys):
    with pytest.raises(SystemExit):
        gocept.amqprun.main.parse_arguments([])
    assert 'config_file' in capsys.readouterr().err


# -- configure(): settings, ZCML, ISender, ConfigFinished ---------------------

def test_basic_configuration_loads_zcml(configured):
    conf, pool, server = configured(registrations=utility('basic', 'basic'))
    registered = list(zope.component.getUtilitiesFor(IHandler))
    assert registered == [('basic', handlers.basic)]
    assert isinstance(server, Server)
    assert pool.server is server
    assert pool.amount == 2


def test_configuration_loads_logging(configured):
    configured(level='CRITICAL', loggers="""
<logger>
  name foo
  level INFO
</logger>
<logger>
  name foo.bar
  level DEBUG
</logger>
""")
    assert logging.getLogger().level == logging.CRITICAL
    assert logging.getLogger('foo').level == logging.INFO
    assert logging.getLogger('foo.bar').level == logging.DEBUG


SETTINGS = """\
<settings>
  test.setting.1 foo
  test.setting.2 bar
  test.SETTING.__default__ qux
  test.setting.unicode Ümläuten
</settings>
"""


def test_settings_are_available_through_utility(configured):
    configured(settings=SETTINGS)
    settings = zope.component.getUtility(ISettings)
    assert settings.get('test.setting.1') == 'foo'
    assert settings.get('test.setting.2') == 'bar'


def test_settings_are_text_including_non_ascii(configured):
    configured(settings=SETTINGS)
    settings = zope.component.getUtility(ISettings)
    assert all(isinstance(key, str) and isinstance(value, str)
               for key, value in settings.items())
    assert settings['test.setting.unicode'] == 'Ümläuten'


def test_settings_keep_upper_case_keys(configured):
    configured(settings=SETTINGS)
    settings = zope.component.getUtility(ISettings)
    assert settings.get('test.SETTING.__default__') == 'qux'
    assert 'test.setting.__default__' not in settings


def test_settings_utility_is_empty_without_settings_section(configured):
    configured()
    assert dict(zope.component.getUtility(ISettings)) == {}


def test_settings_are_registered_before_zcml_loads(configured):
    configured(
        settings=SETTINGS,
        registrations='<utility factory="%s.settings_probe" '
                      'provides="zope.interface.Interface" name="probe" />'
                      % HERE)
    assert len(handlers.seen_settings) == 1
    assert handlers.seen_settings[0].get('test.setting.1') == 'foo'


def test_configure_registers_the_server_as_ISender(configured):
    conf, pool, server = configured()
    assert zope.component.getUtility(ISender) is server


def test_config_finished_fires_with_ISender_registered(configured):
    senders = []

    @zope.component.adapter(IConfigFinished)
    def on_config_finished(event):
        senders.append(zope.component.queryUtility(ISender))
    zope.component.provideHandler(on_config_finished)
    conf, pool, server = configured()
    assert senders == [server]


def test_prefetch_count_defaults_to_the_worker_amount(configured):
    conf, pool, server = configured(amount=3)
    assert server.parameters.prefetch_count == 3


def test_configured_prefetch_count_wins(configured):
    conf, pool, server = configured(amount=3, amqp='prefetch_count 7')
    assert server.parameters.prefetch_count == 7


def test_send_only_configuration_sets_no_handlers_up(configured):
    conf, pool, server = configured(amount=0)
    assert server.setup_handlers is False
    assert server.parameters.prefetch_count == 1
    assert pool.amount == 0


def test_worker_section_sets_the_retry_policy(configured):
    conf, pool, server = configured(worker="""
        retry-delay 0.5
        max-attempts 3
        dead-letter-routing-key dead
        dead-letter-exchange dlx
    """)
    assert pool.policy.delay == 0.5
    assert pool.policy.max_attempts == 3
    assert pool.policy.dead_letter_routing_key == 'dead'
    assert pool.policy.dead_letter_exchange == 'dlx'


def test_worker_section_sets_the_transient_retries(configured):
    conf, pool, server = configured()
    assert pool.transient_retries == 3
    conf, pool, server = configured(worker='transient-retries 0')
    assert pool.transient_retries == 0


def test_amqp_server_section_sets_the_parameters(configured):
    conf, pool, server = configured(amqp="""
        port 1234
        username user
        virtual_host vhost
    """)
    parameters = server.parameters
    assert parameters.address == 'localhost:1234'
    assert parameters.username == 'user'
    assert parameters.virtual_host == 'vhost'


# -- serve(): the boot sequence after configure -------------------------------

class FakeLoop:
    """A server whose start() runs until stop(), or fails at once."""

    blocked = None

    def __init__(self, log, error=None):
        self.log = log
        self.error = None
        self._fail_with = error
        self._running = threading.Event()
        self._settled = threading.Event()
        self._stopped = threading.Event()

    @property
    def running(self):
        return self._running.is_set()

    def start(self):
        self.log.append('server.start')
        if self._fail_with is not None:
            self.error = self._fail_with
            self._settled.set()
            return
        self._running.set()
        self._settled.set()
        self._stopped.wait(10)
        self._running.clear()

    def wait_until_running(self, timeout=None):
        self.log.append('server.wait_until_running')
        self._settled.wait(timeout)
        return self.running

    def stop_consuming(self):
        self.log.append('server.stop_consuming')

    def stop(self):
        self.log.append('server.stop')
        self._stopped.set()


class FakePool:

    amount = 2

    def __init__(self, log):
        self.log = log

    def start(self):
        self.log.append('pool.start')

    def stop(self, timeout):
        self.log.append('pool.stop(%s)' % timeout)
        return []

    def summary(self):
        return 'handled 0'


def fake_conf():
    return types.SimpleNamespace(
        worker=types.SimpleNamespace(shutdown_timeout=5))


def subscribe(log, interface, action=None):
    @zope.component.adapter(interface)
    def subscriber(event):
        log.append(interface.__name__)
        if action is not None:
            action()
    zope.component.provideHandler(subscriber)


def test_serve_boots_then_shuts_down_in_order():
    log = []
    subscribe(log, IProcessStarted,
              lambda: gocept.amqprun.process.request_stop(0, 'test'))
    subscribe(log, IProcessStopping)
    status = gocept.amqprun.main.serve(
        fake_conf(), FakePool(log), FakeLoop(log))
    assert status == 0
    assert log.index('pool.start') < log.index('server.start')
    assert log.index('server.wait_until_running') < log.index(
        'IProcessStarted')
    assert log[log.index('IProcessStarted'):] == [
        'IProcessStarted', 'IProcessStopping', 'server.stop_consuming',
        'pool.stop(5)', 'server.stop']


def test_workers_stopped_comes_after_the_last_handler_before_the_close():
    log = []
    subscribe(log, IProcessStarted,
              lambda: gocept.amqprun.process.request_stop(0, 'test'))
    subscribe(log, IProcessStopping)
    subscribe(log, IWorkersStopped)
    gocept.amqprun.main.serve(fake_conf(), FakePool(log), FakeLoop(log))
    assert log[log.index('IProcessStopping'):] == [
        'IProcessStopping', 'server.stop_consuming', 'pool.stop(5)',
        'IWorkersStopped', 'server.stop']


def test_workers_stopped_counts_the_handlers_still_running(caplog):
    events = []
    zope.component.provideHandler(events.append, (IWorkersStopped,))
    pool = FakePool([])
    pool.stop = lambda timeout: ['worker-1', 'worker-2']
    subscribe([], IProcessStarted,
              lambda: gocept.amqprun.process.request_stop(0, 'test'))
    with caplog.at_level(logging.WARNING, 'gocept.amqprun.main'):
        gocept.amqprun.main.serve(fake_conf(), pool, FakeLoop([]))
    [event] = events
    assert event.unfinished == 2
    assert '2 handler(s) did not finish within 5 s' in caplog.text


def test_serve_exits_1_when_the_server_gives_up(caplog):
    log = []
    subscribe(log, IProcessStarted)
    subscribe(log, IProcessStopping)
    status = gocept.amqprun.main.serve(
        fake_conf(), FakePool(log),
        FakeLoop(log, error=gocept.amqprun.interfaces.BrokerUnreachable(
            'gave up')))
    assert status == 1
    assert 'IProcessStarted' not in log
    assert 'IProcessStopping' in log
    assert log[-1] == 'server.stop'


def test_serve_exits_with_the_requested_status():
    log = []
    subscribe(log, IProcessStarted,
              lambda: gocept.amqprun.process.request_stop(1, 'error'))
    assert gocept.amqprun.main.serve(
        fake_conf(), FakePool(log), FakeLoop(log)) == 1


def test_request_stop_keeps_the_highest_exit_status():
    gocept.amqprun.process.request_stop(1)
    gocept.amqprun.process.request_stop(0)
    assert gocept.amqprun.process.exit_status() == 1
    assert gocept.amqprun.process.wait_for_stop_request(0)


@pytest.mark.parametrize('signum, status', [
    (signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGUSR1, 1)])
def test_signals_request_a_stop(signum, status, caplog):
    gocept.amqprun.main.install_signal_handlers()
    with caplog.at_level(logging.INFO, 'gocept.amqprun.process'):
        signal.getsignal(signum)(signum, None)
    assert gocept.amqprun.process.wait_for_stop_request(0)
    assert gocept.amqprun.process.exit_status() == status
    assert 'Received signal %s, terminating' % signum in caplog.text


def test_signal_handlers_are_left_alone_outside_the_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(
        target=gocept.amqprun.main.install_signal_handlers)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before


def test_metrics_without_the_extra_is_a_configuration_error_naming_it(
        monkeypatch):
    monkeypatch.setitem(sys.modules, 'prometheus_client', None)
    monkeypatch.delitem(sys.modules, 'gocept.amqprun.metrics',
                        raising=False)
    conf = types.SimpleNamespace(metrics=types.SimpleNamespace(
        address=('127.0.0.1', 0), liveness_timeout=30))
    with pytest.raises(ConfigurationError) as info:
        gocept.amqprun.main.start_metrics(conf, None, None)
    assert str(info.value).startswith(
        'The <metrics> section needs the metrics extra: pip install '
        'gocept.amqprun[metrics]')


def test_no_metrics_section_serves_nothing():
    conf = types.SimpleNamespace(metrics=None)
    assert gocept.amqprun.main.start_metrics(conf, None, None) is None
