"""Tests for gocept.amqprun.status: the amqprun-status script without a
daemon (asking a real one is in tests/integration/test_metrics.py)."""
import pytest

from gocept.amqprun.status import format_line
from gocept.amqprun.status import readiness_url
from gocept.amqprun.status import run


CONFIG = """\
<eventlog>
  <logfile>
    path STDOUT
  </logfile>
</eventlog>
<amqp-server>
  hostname localhost
</amqp-server>
<worker>
  amount 1
  component-configuration {zcml}
</worker>
{metrics}
"""


@pytest.fixture
def config(tmp_path):
    """Factory: a config file with ``address`` in <metrics> (or none)."""
    zcml = tmp_path / 'site.zcml'
    zcml.write_text('<configure xmlns="http://namespaces.zope.org/zope"/>')

    def write(address=None):
        path = tmp_path / 'amqprun.conf'
        path.write_text(CONFIG.format(zcml=zcml, metrics='' if address is None
                                      else '<metrics>\n  address %s\n'
                                      '</metrics>' % address))
        return str(path)
    return write


@pytest.mark.parametrize('address, url', [
    ('127.0.0.1:9187', 'http://127.0.0.1:9187/readyz'),
    ('0.0.0.0:9187', 'http://127.0.0.1:9187/readyz'),
    ('[::]:9187', 'http://[::1]:9187/readyz'),
    ('[::1]:9187', 'http://[::1]:9187/readyz'),
])
def test_asks_the_readiness_of_the_configured_address(config, address, url):
    assert readiness_url(config(address)) == url


@pytest.mark.parametrize('address, problem', [
    (None, 'has no <metrics> section'),
    ('127.0.0.1:0', 'has port 0'),
])
def test_cannot_ask_without_a_fixed_address(config, capsys, address,
                                            problem):
    assert run([config(address)]) == 2
    assert problem in capsys.readouterr().err


def test_invalid_config_file_cannot_be_asked(tmp_path, capsys):
    assert run([str(tmp_path / 'missing.conf')]) == 2
    error = capsys.readouterr().err
    assert error.startswith('amqprun-status: ') and error.count('\n') == 1


def test_line_shows_state_node_counts_and_backlog():
    assert format_line({
        'status': 'ready', 'reason': None, 'node': 'rabbit:5672',
        'handled': 10, 'failed': 2, 'backlog': 3}) == (
            'ready: node rabbit:5672, handled 10, failed 2, backlog 3')


def test_line_of_an_unready_daemon_says_why():
    assert format_line({
        'status': 'reconnecting', 'reason': 'Lost the connection',
        'node': None, 'handled': 0, 'failed': 0, 'backlog': 0}) == (
            'reconnecting (Lost the connection): node -, handled 0, '
            'failed 0, backlog 0')
