"""Databases in the message's transaction: ZODB on disk and PostgreSQL.

Every test runs the real daemon (``main()`` in a thread) against the
RabbitMQ node and a real database, then counts what is in the database
and what an independent client received (``faults_tally``). The handlers
and their subscribers are in ``database_handlers``; faults are injected
with ``faults_proxy.FaultProxy``.
"""
import pytest
import sqlalchemy

import gocept.amqprun.testing
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.integration import database_handlers
from gocept.amqprun.tests.integration.database_handlers import REPLY_KEY  # noqa: F401,E501 (read by the replies fixture)
from gocept.amqprun.tests.integration.faults_tally import Replies
from gocept.amqprun.tests.integration.faults_tally import message_id
from gocept.amqprun.tests.integration.faults_tally import numbered
from gocept.amqprun.tests.integration.faults_tally import publish
from gocept.amqprun.tests.integration.test_faults import FAST_RECONNECT


pytestmark = pytest.mark.usefixtures('no_thread_survives')

STORES = ['zodb', 'sql-one-phase', 'sql-two-phase']


@pytest.fixture(autouse=True)
def forget_failures():
    del database_handlers.failures[:]
    del database_handlers.calls[:]
    yield
    database_handlers.state.clear()


@pytest.fixture
def store(request, tmp_path):
    """The store a test is parametrized with (``indirect``): its daemon
    settings and a function reading {message id: result} back."""
    name = request.param
    if name == 'zodb':
        return Store('db.zodb', zodb_path=str(tmp_path / 'Data.fs'))
    url = request.getfixturevalue('postgresql_url')
    return Store('db.sql', sql_url=url, twophase=name == 'sql-two-phase')


class Store:
    """One database of a test: settings for the daemon, reading it back."""

    def __init__(self, routing_key, zodb_path=None, sql_url=None,
                 twophase=False):
        self.routing_key = routing_key
        self.zodb_path = zodb_path
        self.sql_url = sql_url
        self.twophase = twophase

    @property
    def handler_name(self):
        return 'zodb_count' if self.zodb_path else 'sql_write'

    def settings(self, *extra):
        lines = list(extra)
        if self.zodb_path:
            lines.append('db.zodb %s' % self.zodb_path)
        else:
            lines.append('db.sql %s' % self.sql_url)
            lines.append('db.twophase %s' % str(self.twophase).lower())
        return '\n  '.join(lines)

    def written(self):
        """{message id: stored result}, read after the daemon stopped."""
        if self.zodb_path:
            db = gocept.amqprun.testing.open_zodb(self.zodb_path)
            try:
                with db.transaction() as connection:
                    return dict(connection.root().get('handled', {}))
            finally:
                db.close()
        engine = sqlalchemy.create_engine(self.sql_url)
        try:
            with engine.connect() as connection:
                return {row.message_id: 1 for row in connection.execute(
                    database_handlers.writes.select())}
        finally:
            engine.dispose()

    def prepared_transactions(self):
        """The number of prepared (two-phase) transactions left behind."""
        engine = sqlalchemy.create_engine(self.sql_url)
        try:
            with engine.connect() as connection:
                return connection.execute(sqlalchemy.text(
                    'SELECT count(*) FROM pg_prepared_xacts')).scalar()
        finally:
            engine.dispose()


def start(amqp_main, store, *settings, **kw):
    kw.setdefault('workers', 2)
    return amqp_main(database_handlers.zcml(store.handler_name),
                     settings=store.settings(*settings), **kw)


def results_of(replies):
    """{body: [count header of each copy]} of what arrived."""
    results = {}
    for message in replies.messages:
        headers = message.properties.get('application_headers') or {}
        results.setdefault(message.body, []).append(headers.get('count'))
    return results


# -- normal and failing cases ------------------------------------------------

@pytest.mark.parametrize('store', STORES, indirect=True)
def test_each_message_has_its_write_and_its_reply(
        amqp_main, amqp_broker, amqp_vhost, replies, store):
    main = start(amqp_main, store)
    bodies = numbered(20)
    publish(amqp_broker, amqp_vhost, bodies, store.routing_key)
    replies.wait_for(bodies, timeout=30)
    assert main.stop() == 0
    assert set(store.written()) == {message_id(body) for body in bodies}
    assert {body: len(flags) for body, flags in replies.copies.items()} == {
        body: 1 for body in bodies}
    if store.twophase:
        assert store.prepared_transactions() == 0


@pytest.mark.parametrize('store', STORES, indirect=True)
def test_a_failing_handler_leaves_neither_write_nor_reply(
        amqp_main, amqp_broker, amqp_vhost, replies, store):
    main = start(amqp_main, store, worker_extra='\n  '.join([
        'retry-delay 0', 'max-attempts 2',
        'dead-letter-routing-key db.dead']))
    dead = Replies(amqp_broker, amqp_vhost, 'db.dead')
    try:
        [good] = numbered(1)
        failing = good + b':fail'
        publish(amqp_broker, amqp_vhost, [failing, good], store.routing_key)
        replies.wait_for([good], timeout=30)
        dead.wait_for([failing], timeout=30)
    finally:
        dead.close()
    assert main.stop() == 0
    assert set(store.written()) == {message_id(good)}
    assert failing not in replies.copies
    assert len(database_handlers.failures) == 2
    if store.twophase:
        assert store.prepared_transactions() == 0


# -- the AMQP commit in doubt ------------------------------------------------

@pytest.mark.parametrize('frame', ['tx.commit', 'tx.commit-ok'])
@pytest.mark.parametrize('store', STORES, indirect=True)
def test_commit_in_doubt_never_answers_a_message_without_its_write(
        amqp_main, amqp_broker, amqp_vhost, replies, proxy,  # noqa: F811
        store, frame):
    # 'tx.commit': the broker never gets the commit, rolls back and
    # redelivers; 'tx.commit-ok': it committed, the daemon never hears.
    # Either way every message ends with exactly one write, and every
    # reply reports the write that is stored.
    main = start(amqp_main, store, amqp_port=proxy.port,
                 amqp_extra='\n  '.join(FAST_RECONNECT))
    bodies = numbered(20)
    proxy.cut_at(frame, after=3)
    publish(amqp_broker, amqp_vhost, bodies, store.routing_key)
    replies.wait_for(bodies, timeout=60)
    wait_for(lambda: main.server.tasks.unfinished_tasks == 0, timeout=10)
    replies.drain(0.5)
    assert proxy.cuts == 1
    log = main.log
    assert main.stop() == 0
    written = store.written()
    assert set(written) == {message_id(body) for body in bodies}
    for body, counts in results_of(replies).items():
        assert set(counts) == {written[message_id(body)]}, body
    if store.zodb_path:  # counted once each: no write lost, none doubled
        assert sorted(written.values()) == list(range(1, 21))
    assert 'its transaction commits anyway' in log
    if frame == 'tx.commit':
        assert any(any(flags) for flags in replies.copies.values())
    assert database_handlers.failures == []
    if store.twophase:
        assert store.prepared_transactions() == 0


# -- conflicts ---------------------------------------------------------------

@pytest.mark.parametrize('store', ['zodb'], indirect=True)
def test_conflicts_on_one_zodb_object_are_retried_and_never_dead_letter(
        amqp_main, amqp_broker, amqp_vhost, replies, store):
    count = 1000
    main = start(amqp_main, store, workers=8, worker_extra='\n  '.join([
        'retry-delay 0.1', 'max-attempts 3',
        'dead-letter-routing-key db.dead']))
    dead = Replies(amqp_broker, amqp_vhost, 'db.dead')
    try:
        bodies = numbered(count)
        publish(amqp_broker, amqp_vhost, bodies, store.routing_key)
        replies.wait_for(bodies, timeout=120)
        dead.drain(0.2)
        assert dead.messages == []
    finally:
        dead.close()
    log = main.log
    assert main.stop() == 0
    written = store.written()
    assert len(written) == count
    assert sorted(written.values()) == list(range(1, count + 1))
    retries = log.count('Transient error while processing message')
    returns = log.count('kept failing with transient errors')
    print('\n%d messages: %d transient retries in the worker, %d returned '
          'to the broker uncounted' % (count, retries, returns))
    assert retries
    assert ' ERROR ' not in log


# -- shutdown ----------------------------------------------------------------

@pytest.mark.parametrize('store', STORES, indirect=True)
def test_database_closed_on_workers_stopped_fails_no_running_handler(
        amqp_main, amqp_broker, amqp_vhost, replies, store):
    main = start(amqp_main, store, 'db.sleep 0.5', workers=4)
    bodies = numbered(8)
    publish(amqp_broker, amqp_vhost, bodies, store.routing_key)
    wait_for(lambda: len(set(database_handlers.calls)) >= 4, timeout=10)
    assert main.stop() == 0  # while four handlers sleep in their write
    replies.drain(0.5)
    assert database_handlers.failures == []
    written = store.written()
    assert len(written) >= 4  # the running ones finished and committed
    assert {message_id(body) for body in replies.copies} == set(written)
    assert ' ERROR ' not in main.log
