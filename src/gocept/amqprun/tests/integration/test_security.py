"""Handlers with a principal run in a zope.security interaction.

The daemon runs in-process (``amqp_main``) with one worker, so every
message here is handled by the same worker thread: an interaction left
over by one message would show in the next.
"""
import json
import threading

import pytest
import zope.security.checker
import zope.security.interfaces
import zope.security.management
import zope.security.simplepolicies

import gocept.amqprun.handler
import gocept.amqprun.main
import gocept.amqprun.process
import gocept.amqprun.message
import gocept.amqprun.security
import gocept.amqprun.testing


#: Permissions per principal id, as the test security policy grants them.
GRANTS = {'some.user': {'test.read'}}

#: What the failing handler saw before it raised.
seen_before_failure = []


class GrantingPolicy(zope.security.simplepolicies.ParanoidSecurityPolicy):
    """Grants each principal the permissions GRANTS lists for it."""

    def checkPermission(self, permission, object):
        return all(permission in GRANTS.get(p.principal.id, ())
                   for p in self.participations)


class Document:
    """Something protected: reading ``title`` needs ``test.read``."""

    title = 'the title'


DOCUMENT_CHECKER = zope.security.checker.NamesChecker(
    ['title'], permission_id='test.read')


def security_report():
    """What the current thread's interaction allows, as a dict."""
    report = {'thread': threading.current_thread().name}
    interaction = zope.security.management.queryInteraction()
    if interaction is None:
        report['principals'] = None
        return report
    report['principals'] = [
        p.principal.id for p in interaction.participations]
    report['provides_iprincipal'] = (
        zope.security.interfaces.IPrincipal.providedBy(
            interaction.participations[0].principal))
    report['may_read'] = zope.security.management.checkPermission(
        'test.read', None)
    report['may_write'] = zope.security.management.checkPermission(
        'test.write', None)
    proxied = zope.security.checker.ProxyFactory(
        Document(), DOCUMENT_CHECKER)
    try:
        report['proxied_title'] = proxied.title
    except zope.security.interfaces.Unauthorized:
        report['proxied_title'] = 'Unauthorized'
    return report


def reply(report):
    return gocept.amqprun.message.Message(
        {}, json.dumps(report), routing_key='test.security.report')


@gocept.amqprun.handler.declare(
    'test.queue.principal', 'test.principal', principal='some.user')
def as_some_user(message):
    """Replies with what it may do; fails when the body says so."""
    if message.body == b'fail':
        seen_before_failure.append(security_report())
        raise RuntimeError('provoked failure')
    return [reply(security_report())]


@gocept.amqprun.handler.declare(
    'test.queue.principal.other', 'test.principal.other',
    principal='other.user')
def as_other_user(message):
    return [reply(security_report())]


@gocept.amqprun.handler.declare('test.queue.anonymous', 'test.anonymous')
def anonymous(message):
    """Replies with the interaction it finds (there should be none)."""
    return [reply(security_report())]


ZCML = gocept.amqprun.testing.site_zcml(
    __name__ + '.as_some_user', __name__ + '.as_other_user',
    __name__ + '.anonymous')


@pytest.fixture(autouse=True)
def granting_policy():
    """Use GrantingPolicy while the test runs."""
    previous = zope.security.management.setSecurityPolicy(GrantingPolicy)
    del seen_before_failure[:]
    yield
    zope.security.management.setSecurityPolicy(previous)


@pytest.fixture
def daemon(amqp_main, amqp_client):
    """The daemon with one worker and a dead-letter destination."""
    amqp_client.expect_message_on('test.security.report')
    return amqp_main(ZCML, workers=1, worker_extra=(
        'max-attempts 1\n  dead-letter-routing-key test.security.dead'))


def ask(amqp_client, routing_key, body=b'?'):
    amqp_client.send_message(body, routing_key)
    return json.loads(amqp_client.wait_for_message().body)


def test_handler_runs_in_an_interaction_of_its_principal(
        daemon, amqp_client):
    report = ask(amqp_client, 'test.principal')
    assert report['principals'] == ['some.user']
    assert report['provides_iprincipal']
    assert report['thread'] == 'amqprun-worker-1'


def test_check_permission_and_security_proxies_use_the_principal(
        daemon, amqp_client):
    report = ask(amqp_client, 'test.principal')
    assert report['may_read'] is True
    assert report['may_write'] is False
    assert report['proxied_title'] == 'the title'
    other = ask(amqp_client, 'test.principal.other')
    assert other['principals'] == ['other.user']
    assert other['may_read'] is False
    assert other['proxied_title'] == 'Unauthorized'


def test_no_interaction_is_left_on_the_worker_thread_after_handling(
        daemon, amqp_client):
    assert ask(amqp_client, 'test.principal')['principals'] == ['some.user']
    report = ask(amqp_client, 'test.anonymous')
    assert report == {'thread': 'amqprun-worker-1', 'principals': None}


def test_a_failing_handler_ends_its_interaction_too(daemon, amqp_client):
    amqp_client.expect_message_on('test.security.dead')
    amqp_client.send_message(b'fail', 'test.principal')
    dead = amqp_client.wait_for_message()
    assert dead.body == b'fail'
    assert 'provoked failure' in dead.properties[
        'application_headers']['x-amqprun-error']
    assert seen_before_failure[0]['principals'] == ['some.user']
    report = ask(amqp_client, 'test.anonymous')
    assert report == {'thread': 'amqprun-worker-1', 'principals': None}


def test_principals_do_not_mix_between_messages(daemon, amqp_client):
    for routing_key, principal in [('test.principal', 'some.user'),
                                   ('test.principal.other', 'other.user'),
                                   ('test.principal', 'some.user')]:
        assert ask(amqp_client, routing_key)['principals'] == [principal]


# -- without zope.security (needs no broker) ---------------------------------

def test_main_refuses_to_start_a_principal_handler_without_zope_security(
        monkeypatch, tmp_path, clean_registry):
    monkeypatch.setattr(gocept.amqprun.security, 'available', lambda: False)
    log_path = tmp_path / 'server.log'
    config = gocept.amqprun.testing.write_config(
        str(tmp_path), ZCML, gocept.amqprun.testing.CONFIG_TEMPLATE,
        dict(amqp_hostname='127.0.0.1', amqp_port=1, amqp_username='guest',
             amqp_password='guest', amqp_virtualhost='/', workers=1,
             settings='', amqp_extra='', worker_extra='', log_level='INFO',
             log_path=str(log_path)))
    logging_state = gocept.amqprun.testing.LoggingState()
    try:
        assert gocept.amqprun.main.run(config) == 1
    finally:
        logging_state.restore()
    critical = [line for line in log_path.read_text().splitlines()
                if 'CRITICAL' in line]
    assert len(critical) == 1
    assert ("Handler 'as_some_user' declares principal 'some.user'"
            in critical[0]) or (
        "Handler 'as_other_user' declares principal 'other.user'"
        in critical[0])
    assert 'install gocept.amqprun[security]' in critical[0]
    assert 'Process started' not in log_path.read_text()
    assert gocept.amqprun.process.server is None
