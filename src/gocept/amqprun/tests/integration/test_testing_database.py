"""Tests for gocept.amqprun.testing.database: PostgreSQL and ZODB for tests.
"""
import os

import pytest
import sqlalchemy
import transaction

import gocept.amqprun.testing
import gocept.amqprun.testing.database
from gocept.amqprun.testing.database import PostgreSQLServer


def query(url, sql):
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(sql)).scalar()
    finally:
        engine.dispose()


def test_private_postgresql_listens_on_loopback_with_two_phase_commit(
        postgresql_server, postgresql_url):
    if postgresql_server is None:
        pytest.skip('AMQPRUN_TEST_POSTGRESQL_URL names a database')
    assert postgresql_url.startswith('postgresql://postgres@127.0.0.1:%d/'
                                     % postgresql_server.port)
    assert query(postgresql_url, 'SHOW listen_addresses') == '127.0.0.1'
    assert int(query(postgresql_url,
                     'SHOW max_prepared_transactions')) > 0


def test_each_test_gets_a_fresh_database(postgresql_server, postgresql_url):
    if postgresql_server is None:
        pytest.skip('AMQPRUN_TEST_POSTGRESQL_URL names a database')
    assert query(postgresql_url, "SELECT count(*) FROM pg_tables "
                 "WHERE schemaname = 'public'") == 0
    name = postgresql_url.rsplit('/', 1)[1]
    postgresql_server.drop_database(name)
    assert query(postgresql_server.url, "SELECT count(*) FROM pg_database "
                 "WHERE datname = '%s'" % name) == 0


def test_stopped_postgresql_leaves_neither_process_nor_files():
    server = PostgreSQLServer()
    server.start()
    pid, directory = server.pid, server.directory
    assert os.path.isdir(directory)
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(directory)
    server.stop()  # again: nothing to do


def test_a_database_named_in_the_environment_is_used_as_is(monkeypatch):
    monkeypatch.setenv('AMQPRUN_TEST_POSTGRESQL_URL', 'postgresql://x/y')
    url, cleanup = gocept.amqprun.testing.postgresql_database()
    assert url == 'postgresql://x/y'
    cleanup()  # drops nothing


def test_missing_postgresql_names_the_package(monkeypatch):
    monkeypatch.setattr(gocept.amqprun.testing.database,
                        'POSTGRESQL_BINARIES', '/nonexistent/*/bin')
    with pytest.raises(RuntimeError, match='apt-get install postgresql'):
        PostgreSQLServer().start()


def test_zodb_fixture_is_a_fresh_filestorage_in_tmp_path(
        zodb, zodb_path, tmp_path):
    assert os.path.dirname(zodb_path) == str(tmp_path)
    with zodb.transaction() as connection:
        assert dict(connection.root()) == {}
        connection.root()['x'] = 1
    assert os.path.getsize(zodb_path) > 0


def test_zodb_layer_gives_a_fresh_storage_path_and_removes_it():
    layer = gocept.amqprun.testing.ZODBLayer
    layer.setUp()
    path = layer.path
    db = gocept.amqprun.testing.open_zodb(path)
    db.open().root()['x'] = 1
    transaction.commit()
    db.close()
    layer.tearDown()
    assert layer.path is None
    assert not os.path.exists(os.path.dirname(path))


def test_postgresql_layer_gives_a_database_and_drops_it(monkeypatch):
    monkeypatch.setenv('AMQPRUN_TEST_POSTGRESQL_URL', 'postgresql://x/y')
    layer = gocept.amqprun.testing.PostgreSQLLayer
    layer.setUp()
    assert layer.url == 'postgresql://x/y'
    layer.tearDown()
    assert layer.url is None
