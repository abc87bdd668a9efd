"""The daemon under zdaemon, as the README runs it: start, status, stop.

zdaemon, the ``server`` script and the handlers run as real processes;
``zdaemon stop`` sends SIGTERM, which must shut the daemon down
gracefully.
"""
import os
import re
import signal
import subprocess
import textwrap

import pytest

import gocept.amqprun.testing
from gocept.amqprun.testing import wait_for


ZDAEMON = gocept.amqprun.testing.script('zdaemon')
SERVER = gocept.amqprun.testing.script('server')

ZCML = gocept.amqprun.testing.site_zcml(
    'gocept.amqprun.tests.integration.handlers.echo',
    'gocept.amqprun.tests.integration.handlers.sleep')


def read(path):
    if not os.path.exists(path):
        return ''
    with open(path, encoding='utf-8', errors='replace') as f:
        return f.read()


def process_state(pid):
    """The state letter of a process (``Z`` for a zombie), None if gone."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except FileNotFoundError:
        return None


def parent_pid(pid):
    with open('/proc/%d/stat' % pid) as f:
        return int(f.read().rsplit(')', 1)[1].split()[1])


def is_running(pid):
    return process_state(pid) not in (None, 'Z')


class ZDaemon:
    """Runs ``zdaemon <options> <action>`` and remembers the pids it saw."""

    def __init__(self, options, directory):
        self.options = options
        self.directory = directory
        self.pids = set()

    def __call__(self, action):
        result = subprocess.run(
            [ZDAEMON] + self.options + [action], cwd=self.directory,
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=120)
        for pid in re.findall(r'pid=(\d+)', result.stdout):
            self.pids.add(int(pid))
        return result

    def program_pid(self):
        """The pid of the program (from ``status``) or None."""
        match = re.search(r'program running; pid=(\d+)',
                          self('status').stdout)
        return int(match.group(1)) if match else None

    def clean_up(self):
        """Stop what may still run after a failed test, by pid."""
        if self('status').returncode == 0:
            self('stop')
        for pid in self.pids:
            if is_running(pid):  # pragma: no cover (only after a failure)
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def zdaemon_files(tmp_path, amqp_config):
    """Config (logging to a file), socket and transcript paths."""
    log = tmp_path / 'server.log'
    config = amqp_config(ZCML, log_path=str(log), log_level='DEBUG')
    return dict(config=config, log=str(log),
                socket=str(tmp_path / 'zdsock'),
                transcript=str(tmp_path / 'transcript.log'))


@pytest.fixture
def zdaemon_with_options(zdaemon_files, tmp_path):
    """``zdaemon -p "server app.conf" -s SOCKET -t TRANSCRIPT``."""
    files = zdaemon_files
    zdaemon = ZDaemon(
        ['-p', '%s %s' % (SERVER, files['config']), '-s', files['socket'],
         '-t', files['transcript']], str(tmp_path))
    yield zdaemon
    zdaemon.clean_up()


@pytest.fixture
def zdaemon_with_config_file(zdaemon_files, tmp_path):
    """``zdaemon -C zdaemon.conf`` with a ``<runner>`` section."""
    files = zdaemon_files
    zdaemon_conf = tmp_path / 'zdaemon.conf'
    zdaemon_conf.write_text(textwrap.dedent('''\
        <runner>
          program %s %s
          socket-name %s
          transcript %s
          daemon on
        </runner>
        ''' % (SERVER, files['config'], files['socket'],
               files['transcript'])))
    zdaemon = ZDaemon(['-C', str(zdaemon_conf)], str(tmp_path))
    yield zdaemon
    zdaemon.clean_up()


def test_start_status_stop_shuts_down_gracefully(
        zdaemon_with_options, zdaemon_files, amqp_client):
    zdaemon, log = zdaemon_with_options, zdaemon_files['log']
    started = zdaemon('start')
    assert started.returncode == 0, started.stdout + started.stderr
    assert 'daemon process started' in started.stdout
    pid = zdaemon.program_pid()
    assert pid is not None and is_running(pid)
    manager = parent_pid(pid)
    zdaemon.pids.add(manager)
    wait_for(lambda: 'Process started' in read(log), 30,
             message='No start-up in the log:\n' + read(log))

    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'hello', 'test.routing')
    assert amqp_client.wait_for_message().body == b'echo: hello'

    # a handler still running when zdaemon stops the daemon may finish
    amqp_client.send_message(b'1.5', 'test.sleep')
    wait_for(lambda: "with 'sleep'" in read(log), 10,
             message='The handler did not start:\n' + read(log))
    stopped = zdaemon('stop')
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert 'daemon process stopped' in stopped.stdout
    assert amqp_client.wait_for_message().body == b'1.5'

    text = read(log)
    assert 'Received signal 15, terminating.' in text
    assert 'Messages: handled 2, failed 0' in text
    assert text.rstrip().endswith('Exiting')
    status = zdaemon('status')
    assert status.returncode == 3
    assert 'daemon manager not running' in status.stdout
    wait_for(lambda: not is_running(pid) and not is_running(manager), 10,
             message='Processes left running')
    assert amqp_client.queue_length('test.queue.sleep') == 0


def test_a_zdaemon_config_file_works_as_well(
        zdaemon_with_config_file, zdaemon_files, amqp_client):
    zdaemon, log = zdaemon_with_config_file, zdaemon_files['log']
    assert zdaemon('start').returncode == 0
    pid = zdaemon.program_pid()
    manager = parent_pid(pid)
    zdaemon.pids.add(manager)
    wait_for(lambda: 'Process started' in read(log), 30,
             message='No start-up in the log:\n' + read(log))
    amqp_client.expect_message_on('test.response')
    amqp_client.send_message(b'configured', 'test.routing')
    assert amqp_client.wait_for_message().body == b'echo: configured'
    assert zdaemon('stop').returncode == 0
    assert 'Received signal 15, terminating.' in read(log)
    assert 'Exiting' in read(log)
    wait_for(lambda: not is_running(pid) and not is_running(manager), 10,
             message='Processes left running')


def test_server_help_describes_the_command_line():
    result = subprocess.run([SERVER, '--help'], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith('usage: server [-h] config_file')
    assert 'ZConfig configuration file' in result.stdout
