"""Databases for tests: a fresh ZODB on disk, a private PostgreSQL server.

Runs on: the test's thread (a test session, a layer); it starts and stops
a child process and runs PostgreSQL's command line tools, but never speaks
SQL itself (no database driver is needed for it).

:class:`PostgreSQLServer` runs Debian's ``postgresql`` package as a child
process whose cluster lives in one temporary directory and which listens
on 127.0.0.1 only, on a free port, with ``max_prepared_transactions`` > 0
for two-phase commit. PostgreSQL refuses to run as root: as root the
cluster belongs to the ``postgres`` system user and the server runs as it.
The package must be installed beforehand (``apt-get install postgresql``;
``./dev.sh`` does it); this module never installs anything, never uses the
system's clusters and never stops a process by name.

``AMQPRUN_TEST_POSTGRESQL_URL`` names a database of your own instead
(``postgresql://user:password@host:port/database``): then no server is
started, and the tests share that database.

:func:`filestorage_path`, :func:`open_zodb` and :class:`ZODBLayer` give a
fresh ZODB FileStorage in a temporary directory (the ``database`` extra
installs ZODB). The pytest plugin's fixtures ``zodb_path``, ``zodb``,
``postgresql_server`` and ``postgresql_url`` are built on them.
"""
import atexit
import glob
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

from gocept.amqprun.testing import processes


log = logging.getLogger(__name__)

#: Names a PostgreSQL database to use instead of a private server.
URL_VARIABLE = 'AMQPRUN_TEST_POSTGRESQL_URL'
POSTGRESQL_BINARIES = '/usr/lib/postgresql/*/bin'
#: The system user that owns the cluster when the tests run as root.
SYSTEM_USER = 'postgres'
SUPERUSER = 'postgres'
START_TIMEOUT = 60


def find_binaries():
    """The ``bin`` directory of the newest installed PostgreSQL.

    Raises RuntimeError naming the package when there is none.
    """
    candidates = [path for path in glob.glob(POSTGRESQL_BINARIES)
                  if os.path.exists(os.path.join(path, 'initdb'))]
    if not candidates:
        raise RuntimeError(
            'PostgreSQL is not installed (no %s/initdb): apt-get install '
            'postgresql, or name a database in %s'
            % (POSTGRESQL_BINARIES, URL_VARIABLE))
    return max(candidates, key=lambda path: int(
        os.path.basename(os.path.dirname(path)).split('.')[0]))


class PostgreSQLServer:
    """One private PostgreSQL server on loopback: start, create databases,
    stop.

    Not thread-safe: use it from one thread. Usable as a context manager.
    """

    hostname = '127.0.0.1'

    def __init__(self):
        self.directory = None
        self.port = None
        self._bin = None
        self._process = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def pid(self):
        """Process id of the ``postgres`` server (None when not running)."""
        return self._process.pid if self._process is not None else None

    @property
    def url(self):
        """The URL of the server's ``postgres`` database."""
        return self.database_url('postgres')

    def database_url(self, name):
        """The SQLAlchemy/libpq URL of database ``name`` on this server."""
        return 'postgresql://%s@%s:%d/%s' % (
            SUPERUSER, self.hostname, self.port, name)

    def start(self, timeout=START_TIMEOUT):
        """Create the cluster, start the server, wait until it accepts.

        Raises RuntimeError with the tail of the server's log when it does
        not come up; what was started is stopped first. Stopped at
        interpreter exit at the latest.
        """
        if self._process is not None:
            raise RuntimeError('PostgreSQL is already running')
        self._bin = find_binaries()
        atexit.register(self.stop)
        began = time.monotonic()
        try:
            self._init_cluster()
            self._start_server(began + timeout)
        except BaseException:
            self.stop()
            raise
        log.info('PostgreSQL listens on %s:%d (started in %.1f s)',
                 self.hostname, self.port, time.monotonic() - began)

    def stop(self):
        """Fast shutdown (SIGINT: clients are disconnected, open
        transactions roll back), SIGKILL to its process group after
        ``processes.STOP_TIMEOUT``; remove the cluster. Calling it again
        does nothing."""
        atexit.unregister(self.stop)
        if self._process is not None:
            process, self._process = self._process, None
            processes.terminate([(process, 'PostgreSQL')], signal.SIGINT)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def create_database(self, name=None):
        """Create a fresh database (a unique name by default); return its
        URL."""
        name = name or 'test_%s' % uuid.uuid4().hex[:12]
        self._tool('createdb', '-h', self.hostname, '-p', str(self.port),
                   '-U', SUPERUSER, name)
        return self.database_url(name)

    def drop_database(self, name):
        """Drop database ``name`` (its connections are closed first)."""
        self._tool('dropdb', '-h', self.hostname, '-p', str(self.port),
                   '-U', SUPERUSER, '--force', '--if-exists', name)

    def _init_cluster(self):
        self.directory = tempfile.mkdtemp(prefix='amqprun-postgresql-')
        os.chmod(self.directory, 0o755)
        for name in ('data', 'socket'):
            os.mkdir(os.path.join(self.directory, name), 0o700)
        if os.getuid() == 0:
            user = pwd.getpwnam(SYSTEM_USER)
            for path in (self.directory, self._data, self._socket):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._tool('initdb', '-D', self._data, '-U', SUPERUSER,
                   '--auth=trust', '-E', 'UTF8', '--no-sync')

    @property
    def _data(self):
        return os.path.join(self.directory, 'data')

    @property
    def _socket(self):
        return os.path.join(self.directory, 'socket')

    def _start_server(self, deadline):
        [self.port] = processes.free_ports(1)
        command = [
            os.path.join(self._bin, 'postgres'), '-D', self._data,
            '-p', str(self.port),
            '-c', 'listen_addresses=%s' % self.hostname,
            '-c', 'unix_socket_directories=%s' % self._socket,
            '-c', 'max_prepared_transactions=20',
            '-c', 'max_connections=100',
            # A test cluster: durability against power loss buys nothing.
            '-c', 'fsync=off', '-c', 'synchronous_commit=off',
            '-c', 'full_page_writes=off']
        self._process = processes.spawn(
            command, self.directory, 'postgresql.log', **self._as_user())
        while not self._ready():
            processes.check_progress([(self._process, 'PostgreSQL')],
                                     deadline, 'PostgreSQL', self.directory)
            time.sleep(processes.POLL_INTERVAL)

    def _ready(self):
        result = subprocess.run(
            [os.path.join(self._bin, 'pg_isready'), '-q', '-h',
             self.hostname, '-p', str(self.port)],
            stdin=subprocess.DEVNULL, capture_output=True)
        return result.returncode == 0

    def _tool(self, name, *args):
        """Run PostgreSQL's tool ``name``; RuntimeError on failure."""
        result = subprocess.run(
            [os.path.join(self._bin, name)] + list(args),
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            cwd=self.directory, **self._as_user())
        if result.returncode:
            raise RuntimeError('%s failed: %s' % (
                name, (result.stdout + result.stderr).strip()))
        return result.stdout

    @staticmethod
    def _as_user():
        """Popen keywords: as root, run as the ``postgres`` user."""
        if os.getuid() != 0:
            return {}
        return dict(user=SYSTEM_USER, group=SYSTEM_USER, extra_groups=[])


_server = None


def get_postgresql_server():
    """The private PostgreSQL server of this test run (started on first
    use)."""
    global _server
    if _server is None:
        server = PostgreSQLServer()
        server.start()
        _server = server
    return _server


def stop_postgresql_server():
    """Stop the private PostgreSQL server of this run, if one was started.
    """
    global _server
    if _server is not None:
        _server.stop()
        _server = None


def postgresql_database():
    """(URL, cleanup) of a database for one test.

    ``AMQPRUN_TEST_POSTGRESQL_URL`` if set (cleanup does nothing; tests
    share it), else a fresh database on the private server (cleanup drops
    it).
    """
    url = os.environ.get(URL_VARIABLE)
    if url:
        return url, lambda: None
    server = get_postgresql_server()
    url = server.create_database()
    return url, lambda: server.drop_database(url.rsplit('/', 1)[1])


def filestorage_path(directory):
    """The path of a fresh FileStorage (``Data.fs``) in ``directory``."""
    return os.path.join(directory, 'Data.fs')


def open_zodb(path):
    """A ``ZODB.DB`` on the FileStorage at ``path`` (close it after use).
    """
    import ZODB.FileStorage  # the ``database`` extra
    return ZODB.DB(ZODB.FileStorage.FileStorage(path))


class ZODBLayer:
    """zope.testrunner layer: ``ZODBLayer.path``, a fresh FileStorage path
    in a temporary directory, removed at tear-down."""

    path = None
    _directory = None

    @classmethod
    def setUp(cls):
        """Make the temporary directory."""
        cls._directory = tempfile.mkdtemp(prefix='amqprun-zodb-')
        cls.path = filestorage_path(cls._directory)

    @classmethod
    def tearDown(cls):
        """Remove the directory with the storage."""
        shutil.rmtree(cls._directory, ignore_errors=True)
        cls._directory = cls.path = None


class PostgreSQLLayer:
    """zope.testrunner layer: ``PostgreSQLLayer.url``, a database of its
    own (see :func:`postgresql_database`); the private server stops at
    tear-down."""

    url = None
    _cleanup = None

    @classmethod
    def setUp(cls):
        """Start the server if needed; create the database."""
        cls.url, cls._cleanup = postgresql_database()

    @classmethod
    def tearDown(cls):
        """Drop the database; stop a private server."""
        cls._cleanup()
        cls.url = cls._cleanup = None
        stop_postgresql_server()
