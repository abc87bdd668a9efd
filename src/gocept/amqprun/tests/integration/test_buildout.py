"""The buildouts really build: the development buildout (``buildout.cfg``)
and the deployment example (``examples/deployment/buildout.cfg``).

Each test copies the checkout to a temporary directory and runs
``buildout -N`` there with the zc.buildout of this Python; recipes that are
not installed yet (zc.recipe.egg, collective.recipe.template,
zc.zdaemonrecipe) are fetched from the package index.
"""
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile

import pytest

import gocept.amqprun.testing
from gocept.amqprun.testing import wait_for


CHECKOUT = os.path.abspath(os.path.join(
    os.path.dirname(__file__), '..', '..', '..', '..', '..'))
BUILDOUT = gocept.amqprun.testing.script('buildout')
COPIED = ['setup.py', 'README.rst', 'CHANGES.rst', 'tox.ini', 'buildout.cfg',
          'src', 'examples']


@pytest.fixture(scope='module')
def eggs_directory(tmp_path_factory):
    """One eggs directory for the buildouts of this module."""
    return str(tmp_path_factory.mktemp('eggs'))


@pytest.fixture
def checkout():
    """A copy of the checkout, without build products.

    In a short directory: zdaemon's socket ends up in it, and a Unix socket
    path may not be longer than about 100 bytes.
    """
    directory = tempfile.mkdtemp(prefix='amqprun-bo-', dir='/tmp')
    target = pathlib.Path(directory) / 'checkout'
    target.mkdir()
    ignore = shutil.ignore_patterns(
        '__pycache__', '*.egg-info', '.pytest_cache', 'bin', 'parts',
        'eggs', 'develop-eggs', '.installed.cfg')
    for name in COPIED:
        source = os.path.join(CHECKOUT, name)
        if os.path.isdir(source):
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy(source, target / name)
    yield target
    shutil.rmtree(directory, ignore_errors=True)


def run(command, directory, **kw):
    """Run a command in ``directory``; fail with its output unless 0."""
    result = subprocess.run(
        command, cwd=str(directory), capture_output=True, text=True,
        timeout=kw.pop('timeout', 600), **kw)
    assert result.returncode == 0, '%s failed (%s):\n%s%s' % (
        ' '.join(command), result.returncode, result.stdout, result.stderr)
    return result


def buildout(directory, eggs_directory, *assignments):
    return run([BUILDOUT, '-N', 'buildout:eggs-directory=%s' % eggs_directory]
               + list(assignments), directory)


def is_running(pid):
    """Whether the process exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def test_development_buildout_makes_server_test_and_zdaemon(
        checkout, eggs_directory, amqp_broker, amqp_vhost):
    buildout(checkout, eggs_directory)
    bin = checkout / 'bin'
    result = run([str(bin / 'server'), '--help'], checkout)
    assert result.stdout.startswith('usage: server')
    result = run([str(bin / 'amqprun-send'), '--help'], checkout)
    assert result.stdout.startswith('usage: amqprun-send')
    result = run([str(bin / 'zdaemon'), '--help'], checkout)
    assert 'zdctl' in result.stdout
    # bin/test is pytest on this checkout: unit and integration tests
    env = dict(os.environ, AMQP_HOSTNAME=amqp_broker.hostname,
               AMQP_PORT=str(amqp_broker.port),
               AMQP_USERNAME=amqp_broker.username,
               AMQP_PASSWORD=amqp_broker.password,
               AMQP_VIRTUALHOST=amqp_vhost)
    result = run([str(bin / 'test'), '-q', '-p', 'no:cacheprovider',
                  'src/gocept/amqprun/tests/integration/test_security.py'],
                 '/', env=env)
    assert re.search(r'\d+ passed', result.stdout)
    assert str(checkout / 'src') in (bin / 'test').read_text()


def test_deployment_example_runs_the_quick_start_under_zdaemon(
        checkout, eggs_directory, amqp_broker, amqp_vhost, amqp_client):
    deployment = checkout / 'examples' / 'deployment'
    buildout(deployment, eggs_directory,
             'amqp:hostname=%s' % amqp_broker.hostname,
             'amqp:port=%s' % amqp_broker.port,
             'amqp:username=%s' % amqp_broker.username,
             'amqp:password=%s' % amqp_broker.password,
             'amqp:virtual-host=%s' % amqp_vhost)
    bin = deployment / 'bin'
    transcript = deployment / 'parts' / 'server' / 'transcript.log'
    assert (deployment / 'etc' / 'queue.conf').exists()
    assert (deployment / 'etc' / 'queue.zcml').exists()
    pids = []
    try:
        run([str(bin / 'server'), 'start'], deployment)
        status = run([str(bin / 'server'), 'status'], deployment).stdout
        pids.append(int(re.search(r'pid=(\d+)', status).group(1)))
        wait_for(lambda: transcript.exists()
                 and 'Process started' in transcript.read_text(), 30,
                 message='The daemon did not start')
        amqp_client.expect_message_on('test.thank.messages')
        sent = run([str(bin / 'amqprun-send'), 'etc/queue.conf',
                    'test.routing'], deployment, input='Hello')
        reply = amqp_client.wait_for_message()
        assert reply.body == 'Thank you for your message.'
        assert reply.properties['correlation_id'] == sent.stdout.strip()
        run([str(bin / 'server'), 'stop'], deployment)
        log = transcript.read_text()
        assert "thanks b'Hello'" in log
        assert 'Received signal 15, terminating.' in log
        assert 'Exiting' in log
        wait_for(lambda: not is_running(pids[0]), 10,
                 message='The daemon is still running')
    finally:
        subprocess.run([str(bin / 'server'), 'stop'], cwd=str(deployment),
                       capture_output=True, timeout=120)
        for pid in pids:
            if is_running(pid):  # pragma: no cover (only after a failure)
                os.kill(pid, signal.SIGKILL)
