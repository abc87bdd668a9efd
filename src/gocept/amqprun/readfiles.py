"""MaildirReader: sends the files dropped into a Maildir as messages.

Runs on: its own thread, ``amqprun-readfiles`` (one per
``<amqp:readfiles>``), started on ``ProcessStarted`` and stopped (and
joined) on ``ProcessStopping``. It sends through ``ISender``, so its
messages are published on the server's send channel when its transaction
commits.

The directory is a Maildir: ``tmp/``, ``new/`` and ``cur/``. Writers put a
file together in ``tmp/`` and then rename it into ``new/`` (a rename within
one file system is atomic), so the reader never sees a half-written file.
Dot-files in ``new/`` are ignored.

Every ``poll_interval`` seconds the reader sends each file in ``new/`` (in
name order), one transaction per file, with the file's name in the
``X-Filename`` header. A file moves to ``cur/`` only after the AMQP commit
succeeded: when the broker did not take it (it is down, the connection was
lost), it stays in ``new/`` and is sent again at the next scan (at least
once, never lost).

A file that can never be sent is a poison file: it moves to ``failed/``
(created when first needed) with one ERROR line naming it and the reason,
and the reader goes on with the next file at once. That is anything but a
regular file (a symbolic link, which is never followed, a FIFO, a device,
a directory), a file larger than the sender's ``max_message_size`` (found
with ``fstat``, before anything is read), a file the reader has no
permission to read, and a file whose publish the broker refuses
(``PublishRefused``). A file is read into memory once, as the message
body: a file of the maximum size takes that much memory while it is sent.

A file system error about the directory (``new/`` gone, no permission on
it, a failed move) is fatal: the reader logs it once and asks the process
to stop with exit status 1.
"""
import errno
import logging
import os
import stat
import threading

import transaction
import zope.component
import zope.interface

import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.process
from gocept.amqprun.topology import DEFAULT_EXCHANGE


log = logging.getLogger(__name__)

#: The content type of the messages sent (as upstream).
CONTENT_TYPE = 'text/xml'

#: How a file in ``new/`` is opened: never through a symbolic link, never
#: blocking (a FIFO without writer), not inherited by child processes.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class PoisonFile(gocept.amqprun.interfaces.AMQPRunError):
    """A file that can never be sent; the text says why. It goes to
    ``failed/``."""


def kind_of(mode):
    """What a file of ``mode`` (``st_mode``) is, in words."""
    for test, kind in ((stat.S_ISLNK, 'a symbolic link'),
                       (stat.S_ISFIFO, 'a FIFO'),
                       (stat.S_ISDIR, 'a directory'),
                       (stat.S_ISCHR, 'a character device'),
                       (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISSOCK, 'a socket')):
        if test(mode):
            return kind
    return 'not a regular file'  # pragma: no cover (no other kinds exist)


class Maildir:
    """The directories of a Maildir, as far as the reader uses them:
    ``tmp``, ``new``, ``cur`` and ``failed`` for poison files."""

    def __init__(self, path):
        self.path = path

    def prepare(self):
        """Create ``tmp``, ``new`` and ``cur`` where missing."""
        for name in ('tmp', 'new', 'cur'):
            os.makedirs(os.path.join(self.path, name), exist_ok=True)

    def new_files(self):
        """Return the names of the entries in ``new``, sorted; no
        dot-files. (Whatever is not a regular file is found out by
        :meth:`read_new`.)"""
        with os.scandir(os.path.join(self.path, 'new')) as entries:
            return sorted(entry.name for entry in entries
                          if not entry.name.startswith('.'))

    def read_new(self, name, limit=0):
        """Return the content of ``new/<name>``.

        Raises :class:`PoisonFile` for what is not a regular file (links
        are not followed), for a file larger than ``limit`` bytes (0: no
        limit; nothing is read then) and for a file the reader may not
        read. Other :class:`OSError`\\ s propagate.
        """
        path = os.path.join(self.path, 'new', name)
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError as e:
            raise self._open_error(path, e) from e
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PoisonFile(kind_of(info.st_mode))
            if limit and info.st_size > limit:
                raise PoisonFile('%d bytes, above max_message_size %d'
                                 % (info.st_size, limit))
            with open(fd, 'rb', closefd=False) as f:
                body = f.read()  # one buffer of st_size bytes
        finally:
            os.close(fd)
        # A file that grew meanwhile (a writer ignoring the convention) is
        # refused by the sender's own size check (PublishRefused).
        return body

    @staticmethod
    def _open_error(path, error):
        """The error to raise for ``error`` from opening ``path``."""
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            return PoisonFile('a symbolic link')
        if isinstance(error, PermissionError):
            # stat needs search permission on the directory only: if it
            # fails too, the directory is the trouble (fatal).
            os.lstat(path)
            return PoisonFile('no permission to read it')
        if error.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
            return PoisonFile(kind_of(os.lstat(path).st_mode))
        return error

    def move_to_cur(self, name):
        """Move ``new/<name>`` to ``cur/<name>``."""
        os.rename(os.path.join(self.path, 'new', name),
                  os.path.join(self.path, 'cur', name))

    def move_to_failed(self, name):
        """Move ``new/<name>`` to ``failed/<name>`` (created if needed)."""
        os.makedirs(os.path.join(self.path, 'failed'), exist_ok=True)
        os.rename(os.path.join(self.path, 'new', name),
                  os.path.join(self.path, 'failed', name))


def filename_header(name):
    """Return a file name as text fit for the ``X-Filename`` header.

    Names that are not UTF-8 get replacement characters.
    """
    return os.fsencode(name).decode('utf-8', 'replace')


@zope.interface.implementer(gocept.amqprun.interfaces.ILoop)
class MaildirReader(gocept.amqprun.process.LoopState):
    """Polls ``directory/new`` and sends each file to ``routing_key`` on
    ``exchange``.

    Creating it prepares the Maildir (an :class:`OSError` when that is not
    possible). ``start()`` runs the loop in the calling thread;
    :meth:`on_process_started` runs it in a thread of its own.
    """

    #: The name of the reader's thread.
    thread_name = 'amqprun-readfiles'
    #: Seconds ``on_process_stopping`` waits for the thread to end.
    stop_timeout = 10

    def __init__(self, directory, routing_key, poll_interval=1,
                 exchange=DEFAULT_EXCHANGE):
        self.maildir = Maildir(directory)
        self.maildir.prepare()
        self.routing_key = routing_key
        self.exchange = exchange
        self.poll_interval = poll_interval
        self.thread = None
        super().__init__()
        self._should_stop = threading.Event()

    def __repr__(self):
        return '<MaildirReader %s -> %r>' % (
            self.maildir.path, self.routing_key)

    def start(self):
        """Scan ``new`` every ``poll_interval`` seconds until :meth:`stop`.

        A fatal error ends the loop: it is logged and the process is asked
        to stop with exit status 1 (once; the loop does not go on).
        """
        log.info('Watching %s for files to send to %r on exchange %r',
                 self.maildir.path, self.routing_key, self.exchange)
        self._running.set()
        try:
            sender = zope.component.getUtility(
                gocept.amqprun.interfaces.ISender)
            while not self._should_stop.is_set():
                self.scan(sender)
                self._should_stop.wait(self.poll_interval)
        except Exception as e:
            log.error('Unhandled exception, terminating. Reading %s failed: '
                      '%s: %s', self.maildir.path, type(e).__name__, e,
                      exc_info=True)
            gocept.amqprun.process.request_stop(
                1, 'readfiles stopped the process: reading %s failed'
                % self.maildir.path)
        finally:
            self._running.clear()
            log.info('Stopped watching %s', self.maildir.path)

    def stop(self):
        """Make the loop end after the file it is sending; any thread."""
        self._should_stop.set()

    def scan(self, sender):
        """Send the files in ``new`` once; return how many were dealt with
        (sent or put aside in ``failed``).

        Stops at the first file the broker did not take; it stays in
        ``new`` for the next scan. Raises :class:`OSError` for file system
        trouble.
        """
        sent = 0
        for name in self.maildir.new_files():
            if self._should_stop.is_set() or not self.send(name, sender):
                break
            sent += 1
        return sent

    def send(self, name, sender):
        """Send ``new/<name>`` in a transaction of its own; then move it to
        ``cur`` (or, when it can never be sent, to ``failed``). Return
        False when the commit failed (the file stays in ``new``). Notifies
        ``IFileSent`` with the outcome.
        """
        try:
            body = self.maildir.read_new(name, sender.max_message_size)
        except FileNotFoundError:
            log.warning('%s vanished from %s/new before it was sent',
                        name, self.maildir.path)
            return True
        except PoisonFile as e:
            self._put_aside(name, e)
            return True
        message = gocept.amqprun.message.Message(
            {'content_type': CONTENT_TYPE,
             'X-Filename': filename_header(name)},
            body, routing_key=self.routing_key, exchange=self.exchange)
        log.debug('Sending %s/new/%s to %r as %s', self.maildir.path, name,
                  self.routing_key, message.header.message_id)
        transaction.begin()
        try:
            sender.send(message)
            transaction.commit()
        except gocept.amqprun.interfaces.PublishRefused as e:
            transaction.abort()
            self._put_aside(name, e)
            return True
        except Exception as e:
            transaction.abort()
            log.warning('Sending %s/new/%s to %r failed (%s: %s); it stays '
                        'in new/ and is sent again', self.maildir.path, name,
                        self.routing_key, type(e).__name__, e)
            gocept.amqprun.process.notify(gocept.amqprun.interfaces.FileSent(
                self.maildir.path, name, e))
            return False
        # Only now: the broker has the message. A failure here is fatal
        # (raised), and the file is sent again after a restart.
        self.maildir.move_to_cur(name)
        gocept.amqprun.process.notify(gocept.amqprun.interfaces.FileSent(
            self.maildir.path, name))
        log.info('Sent %s/new/%s to %r as %s; moved it to cur/',
                 self.maildir.path, name, self.routing_key,
                 message.header.message_id)
        return True

    def _put_aside(self, name, reason):
        """Move a poison file to ``failed``; one ERROR line says why."""
        self.maildir.move_to_failed(name)
        log.error('Cannot send %s/new/%s to %r (%s); moved it to failed/',
                  self.maildir.path, name, self.routing_key, reason)

    def on_process_started(self, event):
        """Start the reader thread (the connection is usable now)."""
        if self.thread is not None and self.thread.is_alive():
            return
        self._should_stop.clear()
        self.thread = threading.Thread(
            target=self.start, name=self.thread_name, daemon=True)
        self.thread.start()

    def on_process_stopping(self, event):
        """Stop the reader thread and wait for it (``stop_timeout``)."""
        self.stop()
        if self.thread is None:
            return
        self.thread.join(self.stop_timeout)
        if self.thread.is_alive():
            log.warning('The reader of %s did not stop within %s s',
                        self.maildir.path, self.stop_timeout)


def register_reader(directory, routing_key, poll_interval=1,
                    exchange=DEFAULT_EXCHANGE):
    """Create a :class:`MaildirReader` and hook it to the process events.

    The action of ``<amqp:readfiles>``; returns the reader.
    """
    reader = MaildirReader(directory, routing_key, poll_interval, exchange)
    site_manager = zope.component.getSiteManager()
    site_manager.registerHandler(
        reader.on_process_started,
        (gocept.amqprun.interfaces.IProcessStarted,))
    site_manager.registerHandler(
        reader.on_process_stopping,
        (gocept.amqprun.interfaces.IProcessStopping,))
    return reader
