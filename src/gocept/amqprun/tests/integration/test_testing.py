"""gocept.amqprun.testing used the way our users use it.

pytest fixtures directly; the unittest test cases through unittest's
loader, ``python -m unittest`` and zope.testrunner; the plugin through a
``conftest.py`` of a user's project.
"""
import io
import logging
import subprocess
import sys
import threading
import time
import unittest

import pytest

import gocept.amqprun.handler
import gocept.amqprun.process
import gocept.amqprun.message
import gocept.amqprun.testing


#: Bodies the handlers below were called with.
received = []


@pytest.fixture(autouse=True)
def forget_received():
    del received[:]
    yield
    del received[:]


@gocept.amqprun.handler.declare('test.testing.slow', 'test.testing.slow')
def slow(message):
    """Takes its time, then records the body; replies nothing."""
    time.sleep(0.5)
    received.append(message.body)


@gocept.amqprun.handler.declare('test.testing.thank', 'test.testing.thank')
def thank(message):
    """Records the body and says thank you."""
    received.append(message.body)
    return [gocept.amqprun.message.Message(
        {}, b'thanks for ' + message.body, routing_key='test.testing.thanks')]


ZCML = gocept.amqprun.testing.site_zcml(__name__ + '.slow',
                                        __name__ + '.thank')


def broker_environment(broker, virtual_host):
    """Environment for a test run that uses this run's broker and vhost."""
    return gocept.amqprun.testing.subprocess_environment(
        AMQP_HOSTNAME=broker.hostname, AMQP_PORT=str(broker.port),
        AMQP_USERNAME=broker.username, AMQP_PASSWORD=broker.password,
        AMQP_VIRTUALHOST=virtual_host)


# -- pytest fixtures ---------------------------------------------------------

def test_client_sends_headers_and_properties(amqp_client):
    amqp_client.expect_message_on('test.testing.#')
    message_id = amqp_client.send_message(
        b'body', 'test.testing.x', headers={'X-Filename': 'a.txt'},
        content_type='text/plain', correlation_id='<c@x>')
    message = amqp_client.wait_for_message()
    assert message.body == b'body'
    assert message.delivery_info['routing_key'] == 'test.testing.x'
    assert message.properties['message_id'] == message_id
    assert message.properties['content_type'] == 'text/plain'
    assert message.properties['correlation_id'] == '<c@x>'
    assert message.properties['delivery_mode'] == 2
    assert message.headers == {'X-Filename': 'a.txt'}


def test_client_sends_to_and_expects_on_any_exchange(amqp_client):
    amqp_client.channel.exchange_declare(
        'test.testing.headers', 'headers', auto_delete=True)
    amqp_client.expect_message_on(
        '', exchange='test.testing.headers',
        binding_arguments={'x-match': 'all', 'kind': 'a'})
    amqp_client.send_message(b'b', headers={'kind': 'b'},
                             exchange='test.testing.headers')
    amqp_client.send_message(b'a', headers={'kind': 'a'},
                             exchange='test.testing.headers')
    message = amqp_client.wait_for_message()  # b was published first
    assert message.body == b'a'
    assert message.delivery_info['exchange'] == 'test.testing.headers'


def test_wait_for_message_raises_when_nothing_arrives(amqp_client):
    amqp_client.expect_message_on('test.testing.nothing')
    with pytest.raises(RuntimeError, match='No message received'):
        amqp_client.wait_for_message(timeout=0.2)


def test_wait_for_processing_waits_for_a_slow_handler(
        amqp_main, amqp_client):
    main = amqp_main(ZCML)
    amqp_client.send_message(b'1', 'test.testing.slow')
    amqp_client.send_message(b'2', 'test.testing.slow')
    main.wait_for_processing()
    assert sorted(received) == [b'1', b'2']


def test_wait_for_processing_returns_at_once_when_idle(amqp_main):
    main = amqp_main(ZCML)
    started = time.monotonic()
    main.wait_for_processing()
    assert time.monotonic() - started < 2


def test_wait_for_processing_fails_when_a_handler_takes_too_long(
        amqp_main, amqp_client):
    main = amqp_main(ZCML)
    amqp_client.send_message(b'1', 'test.testing.slow')
    with pytest.raises(AssertionError, match='Message was not processed'):
        main.wait_for_processing(timeout=0.1)
    main.wait_for_processing()


def test_main_thread_runs_the_real_main_and_shows_its_log(
        amqp_main, amqp_client):
    main = amqp_main(ZCML, log_level='DEBUG')
    assert main.server is gocept.amqprun.process.server
    amqp_client.expect_message_on('test.testing.thanks')
    amqp_client.send_message(b'x', 'test.testing.thank')
    assert amqp_client.wait_for_message().body == b'thanks for x'
    main.wait_for_processing()
    assert 'Handled message' in main.log
    assert main.stop() == 0
    assert 'Exiting' in main.log
    assert gocept.amqprun.process.server is None


def test_main_thread_undoes_the_logging_configuration(amqp_main):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    main = amqp_main(ZCML, log_level='DEBUG')
    assert root.level == logging.DEBUG
    assert len(root.handlers) == len(handlers) + 1
    main.stop()
    assert root.handlers == handlers
    assert root.level == level


def test_main_thread_reports_an_exit_during_start_up(
        amqp_config, clean_registry, tmp_path):
    config = amqp_config('<configure><utility component="no.such.thing"/>'
                         '</configure>', name='broken')
    main = gocept.amqprun.testing.MainThread(
        config, log_path=str(tmp_path / 'broken.log'))
    with pytest.raises(RuntimeError) as error:
        main.start()
    assert 'main() exited with status 1 during start-up' in str(error.value)
    assert 'Invalid ZCML file' in str(error.value)
    assert gocept.amqprun.process.server is None


def test_server_process_runs_the_handlers_of_the_test_module(
        amqp_server_process, amqp_client):
    process = amqp_server_process(ZCML)
    amqp_client.expect_message_on('test.testing.thanks')
    amqp_client.send_message(b'y', 'test.testing.thank')
    assert amqp_client.wait_for_message().body == b'thanks for y'
    amqp_client.send_message(b'z', 'test.testing.slow')
    process.wait_for_processing()
    assert [line for line in process.output.splitlines()
            if 'Handled message' in line and "with 'slow'" in line]
    assert process.stop() == 0
    assert 'Received signal 15, terminating.' in process.output
    assert 'Exiting' in process.output


def test_site_zcml_registers_handlers_under_their_names():
    zcml = gocept.amqprun.testing.site_zcml('pkg.module.handler')
    assert '<include package="gocept.amqprun" />' in zcml
    assert '<utility component="pkg.module.handler" name="handler" />' in zcml


# -- unittest ----------------------------------------------------------------

class UserQueueTests(gocept.amqprun.testing.QueueTestCase):
    """What a user writes: send, expect, wait (run by unittest below)."""

    __test__ = False  # pytest: run only through unittest's loader

    def test_send_and_receive(self):
        self.expect_message_on('test.testing.unittest')
        self.send_message(b'hi', 'test.testing.unittest', headers={'a': 'b'})
        message = self.wait_for_message()
        self.assertEqual(b'hi', message.body)
        self.assertEqual({'a': 'b'}, message.headers)

    def test_send_and_receive_on_another_exchange(self):
        self.expect_message_on('', exchange='amq.fanout')
        self.send_message(b'all', 'ignored', exchange='amq.fanout')
        message = self.wait_for_message()
        self.assertEqual(b'all', message.body)
        self.assertEqual('amq.fanout', message.delivery_info['exchange'])

    def test_create_server_gives_an_unstarted_server(self):
        server = self.create_server(setup_handlers=False)
        self.assertFalse(server.running)
        self.assertEqual(self.virtual_host, server.parameters.virtual_host)


class UserMainTests(gocept.amqprun.testing.MainTestCase):
    """What a user writes to test a handler with the real daemon."""

    __test__ = False

    def test_handler_in_process(self):
        self.start_server(ZCML)
        self.expect_message_on('test.testing.thanks')
        self.send_message(b'in-process', 'test.testing.thank')
        self.wait_for_processing()
        self.assertEqual([b'in-process'], received)
        self.assertEqual(b'thanks for in-process',
                         self.wait_for_message().body)
        self.assertEqual(0, self.stop_server())

    def test_handler_in_subprocess(self):
        self.start_server_in_subprocess(ZCML)
        self.expect_message_on('test.testing.thanks')
        self.send_message(b'subprocess', 'test.testing.thank')
        self.assertEqual(b'thanks for subprocess',
                         self.wait_for_message().body)
        self.assertEqual(0, self.stop_server())
        self.assertIn('Exiting', self.process.output)


def run_with_unittest(*cases):
    loader = unittest.TestLoader()
    suite = unittest.TestSuite(
        loader.loadTestsFromTestCase(case) for case in cases)
    output = io.StringIO()
    result = unittest.TextTestRunner(stream=output, verbosity=2).run(suite)
    return result, output.getvalue()


def test_test_cases_run_with_the_unittest_loader(amqp_broker):
    result, output = run_with_unittest(UserQueueTests, UserMainTests)
    assert result.wasSuccessful(), output
    assert result.testsRun == 5
    # each class had a virtual host of its own, deleted afterwards
    assert UserQueueTests.virtual_host not in (
        amqp_broker.ctl('list_vhosts', '-q', '--no-table-headers'))


def test_a_failing_expectation_fails_the_unittest_test(amqp_broker):
    class Failing(gocept.amqprun.testing.QueueTestCase):
        def test_nothing_arrives(self):
            self.expect_message_on('test.testing.never')
            self.wait_for_message(timeout=0.1)

    result, output = run_with_unittest(Failing)
    assert len(result.errors) == 1
    assert 'RuntimeError: No message received' in output


USER_TESTS = '''\
import gocept.amqprun.handler
import gocept.amqprun.message
import gocept.amqprun.testing

received = []


@gocept.amqprun.handler.declare('user.queue', 'user.routing')
def thank(message):
    received.append(message.body)
    return [gocept.amqprun.message.Message(
        {}, b'thanks', routing_key='user.thanks')]


ZCML = gocept.amqprun.testing.site_zcml('test_user.thank')


class QueueTests(gocept.amqprun.testing.QueueTestCase):

    def test_send_and_receive(self):
        self.expect_message_on('user.echo')
        self.send_message(b'hi', 'user.echo')
        self.assertEqual(b'hi', self.wait_for_message().body)


class MainTests(gocept.amqprun.testing.MainTestCase):

    def test_handler(self):
        self.start_server(ZCML)
        self.expect_message_on('user.thanks')
        self.send_message(b'hello', 'user.routing')
        self.wait_for_processing()
        self.assertEqual([b'hello'], received)
        self.assertEqual(b'thanks', self.wait_for_message().body)
'''


def test_test_cases_run_with_python_m_unittest(
        amqp_broker, amqp_vhost, tmp_path):
    (tmp_path / 'test_user.py').write_text(USER_TESTS)
    result = subprocess.run(
        [sys.executable, '-m', 'unittest', '-v', 'test_user'],
        cwd=tmp_path, env=broker_environment(amqp_broker, amqp_vhost),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'Ran 2 tests' in result.stderr
    assert 'OK' in result.stderr


def test_test_cases_run_with_zope_testrunner_in_the_broker_layer(
        amqp_broker, amqp_vhost, tmp_path):
    (tmp_path / 'test_user.py').write_text(USER_TESTS)
    result = subprocess.run(
        [sys.executable, '-m', 'zope.testrunner', '--test-path', '.',
         '--tests-pattern', '^test_user$', '-vv'],
        cwd=tmp_path, env=broker_environment(amqp_broker, amqp_vhost),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'Set up gocept.amqprun.testing.layers.BrokerLayer' in result.stdout
    assert ('Tear down gocept.amqprun.testing.layers.BrokerLayer'
            in result.stdout)
    assert 'Ran 2 tests with 0 failures, 0 errors' in result.stdout


# -- the pytest plugin in a user's project ---------------------------------

USER_PYTEST_TESTS = '''\
import gocept.amqprun.handler
import gocept.amqprun.message
import gocept.amqprun.testing


@gocept.amqprun.handler.declare('user.queue.pytest', 'user.pytest')
def thank(message):
    return [gocept.amqprun.message.Message(
        {}, b'thanks', routing_key='user.thanks')]


def test_handler(amqp_main, amqp_client):
    amqp_main(gocept.amqprun.testing.site_zcml('test_user.thank'))
    amqp_client.expect_message_on('user.thanks')
    amqp_client.send_message(b'hello', 'user.pytest')
    assert amqp_client.wait_for_message().body == b'thanks'
'''


@pytest.mark.parametrize('plugin', ['gocept.amqprun.testing.pytest',
                                    'gocept.amqprun.testing'])
@pytest.mark.parametrize('autoload', ['entry point', 'conftest only'])
def test_plugin_works_from_a_conftest_with_or_without_the_entry_point(
        amqp_broker, amqp_vhost, tmp_path, autoload, plugin):
    (tmp_path / 'conftest.py').write_text(
        "pytest_plugins = [%r]\n" % plugin)
    (tmp_path / 'test_user.py').write_text(USER_PYTEST_TESTS)
    env = broker_environment(amqp_broker, amqp_vhost)
    if autoload == 'conftest only':
        env['PYTEST_DISABLE_PLUGIN_AUTOLOAD'] = '1'
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
         '--rootdir', str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '1 passed' in result.stdout


def test_no_thread_of_the_daemon_outlives_a_test():
    assert not [thread for thread in threading.enumerate()
                if thread.name.startswith('amqprun-')]


# -- the package -------------------------------------------------------------

def test_importing_the_package_needs_no_pytest():
    code = ('import sys; sys.modules["pytest"] = None; '
            'import gocept.amqprun.testing as t; '
            'print(t.QueueTestCase.__name__, t.wait_for.__name__)')
    result = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True,
        env=gocept.amqprun.testing.subprocess_environment(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['QueueTestCase', 'wait_for']


def test_the_fixtures_can_still_be_imported_from_the_package():
    from gocept.amqprun.testing import amqp_client
    import gocept.amqprun.testing.pytest
    assert amqp_client is gocept.amqprun.testing.pytest.amqp_client
    with pytest.raises(AttributeError, match='no attribute'):
        gocept.amqprun.testing.no_such_name
