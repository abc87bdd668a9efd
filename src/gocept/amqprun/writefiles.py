"""FileWriter: a handler function that stores each message as two files.

Runs on: a worker thread. ``<amqp:writefiles>`` registers a
:class:`gocept.amqprun.handler.Handler` whose function is a
:class:`FileWriter`. The writer only decides the file name, joins a
:class:`FileDataManager` to the handler's transaction and sends
``MessageStored``; the files are written in the data manager's vote. That
vote comes before the AMQP data manager's (which acks the message), so a
write error is a "no" vote: the message is not acked and comes back.

File names come from the directive's ``pattern``, a ``string.Template``
(``{name}`` is accepted for ``${name}``, because zc.buildout cannot escape
``${...}``) with the variables ``date``, ``msgid``, ``routing_key``,
``unique`` and ``xfilename``. Slashes in the pattern create directories
below ``directory``. Slashes in the *values* must not: a value taken from
the message (routing key, message id, ``X-Filename``) is made harmless
before it is substituted (see :func:`safe_value`), and a pattern that could
leave ``directory`` is refused when it is configured (see
:func:`check_pattern`). So no message can place a file outside
``directory``, and none is refused for its name either: a message that
cannot be stored is never lost, it fails and is retried (or dead-lettered
by the retry policy).
"""
import copy
import datetime
import logging
import os
import re
import string
import uuid

import transaction
import transaction.interfaces
import zope.event
import zope.interface

import gocept.amqprun.datamanager
import gocept.amqprun.interfaces
import gocept.amqprun.process
import gocept.amqprun.xmlheader


log = logging.getLogger(__name__)

#: The pattern used when the directive gives none (or an empty one).
DEFAULT_PATTERN = '${routing_key}-${unique}'

#: The variables a pattern may use.
VARIABLES = ('date', 'msgid', 'routing_key', 'unique', 'xfilename')

#: Message values are cut to this many bytes (UTF-8), so that a file name
#: built from them stays below the usual limit of 255 bytes.
MAX_VALUE_BYTES = 100

# A ``{`` not preceded by ``$`` starts a buildout-safe placeholder.
_BRACE = re.compile(r'(?<!\$)\{')
# Characters a message value must not bring into a file name: the path
# separator and control characters (NUL cannot be in a file name at all).
_UNSAFE = re.compile('[/\x00-\x1f\x7f]')


def expand_pattern(pattern):
    """Return ``pattern`` with ``{name}`` spelt ``${name}``.

    ``{foo}/${bar}/{qux}`` becomes ``${foo}/${bar}/${qux}``.
    """
    return _BRACE.sub('${', pattern)


def check_pattern(pattern):
    """Raise :class:`ValueError` unless ``pattern`` is a usable pattern.

    It must use known variables only and describe a relative path without
    empty, ``.`` or ``..`` components and without a NUL character. Since
    substituted values never contain a slash, never start with a dot and
    are never empty, every file name made from such a pattern stays below
    the directory.
    """
    names = set()
    for match in string.Template.pattern.finditer(pattern):
        if match.group('invalid') is not None:
            raise ValueError(
                'Invalid placeholder in pattern %r at position %d' % (
                    pattern, match.start('invalid')))
        names.add(match.group('named') or match.group('braced'))
    unknown = sorted(names - set(VARIABLES) - {None})
    if unknown:
        raise ValueError('Unknown variable(s) %s in pattern %r (known: %s)' % (
            ', '.join(unknown), pattern, ', '.join(VARIABLES)))
    probe = string.Template(pattern).substitute(dict.fromkeys(VARIABLES, 'x'))
    if '\x00' in probe:
        raise ValueError('Pattern %r contains a NUL character' % pattern)
    if probe.startswith('/'):
        raise ValueError(
            'Pattern %r must be relative to the directory' % pattern)
    if any(part in ('', '.', '..') for part in probe.split('/')):
        raise ValueError(
            'Pattern %r has an empty, "." or ".." path component' % pattern)


def safe_value(value):
    """Return a message value made safe to be part of one file name.

    Slashes and control characters (NUL included) become ``_``, so do
    leading dots (no ``..``, no hidden files); the value is cut to
    :data:`MAX_VALUE_BYTES` bytes; a missing or empty value becomes ``_``.
    """
    if value is None:
        value = ''
    elif isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode('utf-8', 'replace')
    value = _UNSAFE.sub('_', str(value))
    undotted = value.lstrip('.')
    value = '_' * (len(value) - len(undotted)) + undotted
    # Lone surrogates cannot be encoded as a file name: drop them, and
    # whatever character the cut splits.
    value = value.encode('utf-8', 'surrogatepass')[:MAX_VALUE_BYTES].decode(
        'utf-8', 'ignore')
    return value or '_'


def _with_safe_values(message):
    """Return a copy of ``message`` whose name-giving values are safe.

    A timestamp that is no date (out of range, wrong type) is dropped, so
    ``date`` is today's.
    """
    safe = copy.copy(message)
    safe.header = header = copy.copy(message.header)
    try:
        datetime.datetime.fromtimestamp(header.timestamp)
    except (TypeError, ValueError, OverflowError, OSError):
        header.timestamp = None
    header.message_id = safe_value(message.header.message_id)
    headers = dict(message.header.headers or {})
    headers['X-Filename'] = safe_value(headers.get('X-Filename'))
    header.headers = headers
    safe.routing_key = safe_value(message.routing_key)
    return safe


def resolve(directory, path):
    """Return the absolute name of ``path`` (relative) below ``directory``.

    Raises :class:`ValueError` when it would not be strictly below
    ``directory``; :func:`check_pattern` and :func:`safe_value` make sure
    this does not happen, so this is the last line of defence.
    """
    full = os.path.normpath(os.path.join(directory, path))
    if ('\x00' in path or os.path.isabs(path) or full == directory
            or os.path.commonpath([directory, full]) != directory):
        raise ValueError('Refusing to write %r: it is not below %s' % (
            path, directory))
    return full


class FileWriter:
    """Handler function: store each message as a body and a header file.

    ``directory`` is made absolute (relative to the current directory);
    ``pattern`` defaults to :data:`DEFAULT_PATTERN`. Raises
    :class:`ValueError` for a pattern :func:`check_pattern` refuses.
    Calling it with a message returns None (no messages to send).
    """

    def __init__(self, directory, pattern=None):
        self.directory = os.path.abspath(directory)
        self.pattern = expand_pattern(pattern or DEFAULT_PATTERN)
        check_pattern(self.pattern)

    def __repr__(self):
        return '<FileWriter %s/%s>' % (self.directory, self.pattern)

    def filename(self, message):
        """Return the body file's path for ``message``, relative to the
        directory: the pattern with the message's values made safe."""
        return _with_safe_values(message).generate_filename(self.pattern)

    def __call__(self, message):
        """Join a data manager that writes the files at commit; notify
        ``MessageStored`` (a subscriber that raises aborts the
        transaction, so nothing is written and the message comes back).
        """
        path = self.filename(message)
        resolve(self.directory, path)
        transaction.get().join(FileDataManager(message, self.directory, path))
        log.debug('Storing message %s as %s in %s', message.header.message_id,
                  path, self.directory)
        zope.event.notify(gocept.amqprun.interfaces.MessageStored(
            message, path))


@zope.interface.implementer(transaction.interfaces.ISavepointDataManager)
class FileDataManager:
    """Writes one message's two files when the transaction commits.

    Two-phase commit mapped onto the file system:

    ``abort``, ``tpc_abort``
        Remove what this manager wrote (temporary files, and the files it
        renamed into place when a later vote, e.g. the AMQP commit, failed:
        the message comes back, so no orphaned pair is left). Except when
        the AMQP commit of a pure send failed with ``CommitInDoubt``: the
        message may be published, so the files stay. (For a received
        message an AMQP commit in doubt does not abort: the transaction
        commits and the files stay anyway.) Never raise; they log what
        they could not remove.
    ``tpc_begin``, ``commit``
        Nothing.
    ``tpc_vote``
        Create missing directories, write header and body to temporary
        dot-files in the target directory, then rename them into place
        (header first, so a reader seeing the body finds its header). No
        half-written file ever carries a final name. An error is a "no"
        vote. ``sortKey`` sorts before the AMQP data manager's.
    ``tpc_finish``
        Forget the files: they stay.

    With :attr:`fsync` the files and their directory are synced to disk
    before the vote says yes, so an acked message survives a crash.
    """

    transaction_manager = None
    #: Sync files and directory before voting yes.
    fsync = True

    def __init__(self, message, base_directory, path):
        self.message = message
        self.base_directory = base_directory
        self.path = path
        self._temporary = []
        self._written = []

    def __repr__(self):
        return '<FileDataManager %s in %s>' % (self.path, self.base_directory)

    def abort(self, txn):
        """Remove what was written (usually nothing yet)."""
        self._discard()

    def tpc_begin(self, txn):
        """Nothing to prepare."""

    def commit(self, txn):
        """Nothing to do before the vote."""

    def tpc_vote(self, txn):
        """Write both files under temporary names, rename them into place;
        notify ``IFileWritten`` with the outcome."""
        try:
            self._write()
        except Exception as e:
            self._written_event(e)
            raise
        self._written_event()

    def _written_event(self, error=None):
        gocept.amqprun.process.notify(gocept.amqprun.interfaces.FileWritten(
            self.base_directory, self.path, error))

    def _write(self):
        body_path = resolve(self.base_directory, self.path)
        directory = os.path.dirname(body_path)
        header_path = os.path.join(
            directory, gocept.amqprun.xmlheader.header_filename(
                os.path.basename(body_path)))
        log.debug('Writing message %s to %s', self.message.header.message_id,
                  body_path)
        self._make_directories(directory)
        header_temporary = self._write_temporary(
            directory, gocept.amqprun.xmlheader.dumps(self.message.header))
        body_temporary = self._write_temporary(
            directory, self.message.body or b'')
        self._rename(header_temporary, header_path)
        self._rename(body_temporary, body_path)
        if self.fsync:
            _sync_directory(directory)

    def tpc_finish(self, txn):
        """The transaction committed: the files stay."""
        self._temporary = []
        self._written = []

    def tpc_abort(self, txn):
        """Remove what was written, unless the AMQP commit is in doubt;
        never raises."""
        # When the AMQP commit is in doubt the broker may have acked the
        # message: the files must stay (a duplicate pair if it comes back
        # is better than a lost message).
        if self._written and gocept.amqprun.datamanager.commit_in_doubt(txn):
            log.warning('Kept %s although the transaction failed: the AMQP '
                        'commit is in doubt', ', '.join(self._written))
            self._written = []
        self._discard()

    def sortKey(self):
        """Sort before the AMQP data manager (``~~gocept.amqprun``)."""
        return '~gocept.amqprun.writefiles'

    def savepoint(self):
        """Support savepoints as a no-op (files are written at commit)."""
        return gocept.amqprun.datamanager.NoOpSavepoint()

    def _make_directories(self, directory):
        # The base directory is created when missing, but not its parents:
        # a missing parent (an unmounted volume, say) is an error.
        try:
            os.mkdir(self.base_directory)
        except FileExistsError:
            pass
        os.makedirs(directory, exist_ok=True)

    def _write_temporary(self, directory, data):
        path = os.path.join(directory, '.amqprun-%s.tmp' % uuid.uuid4().hex)
        # Mode 0666 minus the umask, as a plain open() would create it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._temporary.append(path)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        return path

    def _rename(self, temporary, path):
        os.replace(temporary, path)
        self._temporary.remove(temporary)
        self._written.append(path)

    def _discard(self):
        for path in self._temporary + self._written:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning('Could not remove %s after the transaction '
                            'failed: %s', path, e)
            else:
                if path in self._written:
                    log.warning('Removed %s: the transaction did not commit, '
                                'the message comes back', path)
        self._temporary = []
        self._written = []


def _sync_directory(directory):
    """Make the renames in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
