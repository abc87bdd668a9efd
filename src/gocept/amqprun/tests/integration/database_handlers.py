"""Handlers that write to ZODB or PostgreSQL, as the Databases chapter says.

Runs on: the daemon's worker threads (the handlers) and its main thread
(the subscribers). The database is opened on ``IConfigFinished`` from the
``<settings>`` keys ``db.zodb`` (a FileStorage path) or ``db.sql`` (a URL;
``db.twophase true`` for two-phase commit), and closed on
``IWorkersStopped``. Every handler is idempotent by message id: a second
handling of a message whose write is stored writes nothing and replies
again with the stored result. A body ending with ``:fail`` raises after
the write (which must then roll back). Replies go to :data:`REPLY_KEY`
with the body received and the headers ``redelivered`` and ``count`` (the
result).
"""
import threading
import time

import BTrees.OOBTree
import sqlalchemy
import sqlalchemy.orm
import ZODB
import ZODB.FileStorage
import zope.component
import zope.sqlalchemy

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message


REPLY_KEY = 'db.reply'

#: What the subscribers opened; tests look at it while the daemon runs.
state = {}
#: The body of every handler call, at its start.
calls = []
#: (name, error) of every handler call that raised.
failures = []
_local = threading.local()

metadata = sqlalchemy.MetaData()
writes = sqlalchemy.Table(
    'writes', metadata,
    sqlalchemy.Column('message_id', sqlalchemy.Text, primary_key=True),
    sqlalchemy.Column('body', sqlalchemy.Text, nullable=False))


def settings():
    return zope.component.getUtility(gocept.amqprun.interfaces.ISettings)


@zope.component.adapter(gocept.amqprun.interfaces.IConfigFinished)
def open_databases(event):
    """Open what ``<settings>`` names, once per process."""
    config = settings()
    if config.get('db.zodb'):
        state['zodb'] = ZODB.DB(ZODB.FileStorage.FileStorage(
            config['db.zodb']))
    if config.get('db.sql'):
        engine = sqlalchemy.create_engine(config['db.sql'])
        metadata.create_all(engine)
        session = sqlalchemy.orm.scoped_session(sqlalchemy.orm.sessionmaker(
            bind=engine,
            twophase=config.get('db.twophase', 'false') == 'true'))
        zope.sqlalchemy.register(session)
        state.update(engine=engine, sql=session)


@zope.component.adapter(gocept.amqprun.interfaces.IWorkersStopped)
def close_databases(event):
    """No handler runs any more: close what was opened."""
    if 'zodb' in state:
        state.pop('zodb').close()
    if 'engine' in state:
        state.pop('sql').remove()
        state.pop('engine').dispose()


def zodb_root():
    """The root of this worker thread's connection (opened on first use,
    bound to the thread's transaction manager)."""
    db = state['zodb']
    connection = getattr(_local, 'connection', None)
    if connection is None or connection.db() is not db:
        connection = _local.connection = db.open()
    return connection.root()


def reply_to(message, count):
    return gocept.amqprun.message.Message(
        {'redelivered': bool(message.redelivered), 'count': count},
        message.body, routing_key=REPLY_KEY)


def pause():
    seconds = float(settings().get('db.sleep', 0))
    if seconds:
        time.sleep(seconds)


def fail_if_asked(message):
    """Bodies ending with ``:fail`` fail after their write."""
    if message.body.endswith(b':fail'):
        raise RuntimeError('asked to fail: %r' % message.body)


def recording(function):
    """Remember each call and what it raised (the tests count them)."""
    def handler(message):
        calls.append(message.body)
        try:
            return function(message)
        except Exception as e:
            failures.append((function.__name__, e))
            raise
    handler.__name__ = function.__name__
    return handler


@gocept.amqprun.handler.declare('db.zodb', 'db.zodb')
@recording
def zodb_count(message):
    """Count messages on one ZODB object (the root): every handler of
    every worker conflicts on it. ``handled[message_id]`` keeps the
    count each message got."""
    root = zodb_root()
    if 'handled' not in root:
        root['handled'] = BTrees.OOBTree.OOBTree()
        root['count'] = 0
    message_id = message.header.message_id
    handled = root['handled']
    if message_id not in handled:
        pause()
        root['count'] += 1
        handled[message_id] = root['count']
    fail_if_asked(message)
    return [reply_to(message, handled[message_id])]


@gocept.amqprun.handler.declare('db.sql', 'db.sql')
@recording
def sql_write(message):
    """One row per message id; a second handling writes nothing."""
    session = state['sql']()
    message_id = message.header.message_id
    row = session.get(Write, message_id)
    if row is None:
        pause()
        session.add(Write(message_id=message_id,
                          body=message.body.decode()))
        session.flush()
    fail_if_asked(message)
    return [reply_to(message, 1)]


class Write:
    """A row of :data:`writes`."""

    def __init__(self, **kw):
        for name, value in kw.items():
            setattr(self, name, value)


sqlalchemy.orm.registry().map_imperatively(Write, writes)


def zcml(*handlers):
    """Site ZCML: the subscribers and the named handlers of this module.
    """
    here = __name__
    return (
        '<configure xmlns="http://namespaces.zope.org/zope">\n'
        '<include package="gocept.amqprun" />\n'
        '<subscriber handler="%s.open_databases" />\n'
        '<subscriber handler="%s.close_databases" />\n%s</configure>\n' % (
            here, here, ''.join(
                '<utility component="%s.%s" name="%s" />\n'
                % (here, name, name) for name in handlers)))
