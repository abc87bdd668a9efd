"""FaultProxy: a TCP proxy between the daemon and the broker that can fail.

Runs on: one thread of its own (``amqprun-faults-proxy``). The test thread
calls :meth:`FaultProxy.cut`, :meth:`~FaultProxy.stall`,
:meth:`~FaultProxy.resume` and :meth:`~FaultProxy.stop`; each returns once
the proxy thread has carried it out.

It listens on 127.0.0.1 (a free port) and forwards every connection to the
broker, byte for byte, with non-blocking sockets and one ``select`` loop.
It reads the AMQP frames it forwards, so that :meth:`FaultProxy.cut_at`
can cut the connection at one method frame (e.g. ``tx.commit-ok``): the
frame never arrives, which opens the window of a commit in doubt.
"""
import errno
import queue
import select
import socket
import struct
import threading


#: Bytes buffered per direction before the proxy stops reading that side.
BUFFER_LIMIT = 1 << 20

#: AMQP 0-9-1 methods :meth:`FaultProxy.cut_at` knows: (class, method) ids.
METHODS = {'tx.commit': (90, 20), 'tx.commit-ok': (90, 21)}
PROTOCOL_HEADER = 8
FRAME_METHOD = 1


class Pipe:
    """One proxied connection: the client's socket and the broker's."""

    def __init__(self, client, upstream):
        self.client = client
        self.upstream = upstream
        #: socket -> bytes waiting to be written to it
        self.pending = {client: bytearray(), upstream: bytearray()}
        #: socket -> bytes read from it that do not make a frame yet
        self.partial = {client: bytearray(), upstream: bytearray()}
        #: bytes of the client's protocol header still to pass unparsed
        self.header_left = PROTOCOL_HEADER

    def frames(self, sock, data):
        """Split what ``sock`` sent into whole frames (header first)."""
        buffer = self.partial[sock]
        buffer += data
        if sock is self.client and self.header_left:
            take = min(self.header_left, len(buffer))
            self.header_left -= take
            yield bytes(buffer[:take]), None
            del buffer[:take]
        while len(buffer) >= 7:
            frame_type, _, size = struct.unpack('>BHI', buffer[:7])
            if len(buffer) < size + 8:
                return
            frame = bytes(buffer[:size + 8])
            del buffer[:size + 8]
            method = (struct.unpack('>HH', frame[7:11])
                      if frame_type == FRAME_METHOD else None)
            yield frame, method

    def peer(self, sock):
        return self.upstream if sock is self.client else self.client

    @property
    def sockets(self):
        return (self.client, self.upstream)

    def close(self, reset=False):
        for sock in self.sockets:
            if reset:
                # SO_LINGER 0: close() sends RST, as a broken network does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                struct.pack('ii', 1, 0))
            sock.close()


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``; cuts or stalls on demand.

    ``accepted`` counts the connections accepted so far: a client that
    reconnected shows up as one more.
    """

    def __init__(self, upstream_host, upstream_port):
        self.upstream = (upstream_host, upstream_port)
        self.accepted = 0
        self.stalled = False
        #: How often a cut_at() was carried out.
        self.cuts = 0
        self._cut_at = None  # [(class, method), frames to let pass]
        self._pipes = []
        self._commands = queue.Queue()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(('127.0.0.1', 0))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(
            target=self._run, name='amqprun-faults-proxy', daemon=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- the test thread ----------------------------------------------------

    def start(self):
        """Start the proxy thread; return self."""
        self._thread.start()
        return self

    @property
    def open_connections(self):
        """The number of connections being proxied now."""
        return self._call('count')

    def cut(self):
        """Reset every open connection (both sides get a RST)."""
        return self._call('cut')

    def stall(self):
        """Stop forwarding, in both directions, on every connection (also
        on new ones) until :meth:`resume`: the peers see a silent network.
        """
        self._call('stall')

    def resume(self):
        """Forward again after :meth:`stall`."""
        self._call('resume')

    def cut_at(self, method, after=0):
        """Swallow the next ``method`` frame (a key of :data:`METHODS`)
        after letting ``after`` of them pass, then cut every connection.

        Returns at once; :attr:`cuts` counts the cuts carried out. With
        ``'tx.commit'`` the broker never sees the commit (it rolls back);
        with ``'tx.commit-ok'`` it committed but the client never hears.
        """
        self._call(('cut_at', (METHODS[method], after)))

    def stop(self):
        """Close every socket and join the proxy thread."""
        if self._thread.is_alive():
            self._call('stop')
            self._thread.join(10)
        assert not self._thread.is_alive(), 'The proxy thread survived.'
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def _call(self, command):
        result = queue.Queue()
        self._commands.put((command, result))
        self._wake_w.send(b'!')
        return result.get(timeout=10)

    # -- the proxy thread ---------------------------------------------------

    def _run(self):
        try:
            while self._step():
                pass
        finally:
            for pipe in self._pipes:
                pipe.close()
            self._pipes = []
            self._listener.close()

    def _step(self):
        """One round of the loop; False once stopped."""
        readers = [self._listener, self._wake_r]
        writers = []
        if not self.stalled:
            for pipe in self._pipes:
                for sock in pipe.sockets:
                    if len(pipe.pending[pipe.peer(sock)]) < BUFFER_LIMIT:
                        readers.append(sock)
                    if pipe.pending[sock]:
                        writers.append(sock)
        readable, writable, _ = select.select(readers, writers, [], 1.0)
        if self._wake_r in readable:
            if not self._run_commands():
                return False
        if self._listener in readable:
            self._accept()
        for sock in writable:
            self._write(sock)
        for sock in readable:
            if sock not in (self._listener, self._wake_r):
                self._read(sock)
        return True

    def _run_commands(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                command, result = self._commands.get_nowait()
            except queue.Empty:
                return True
            value = None
            if command == 'stop':
                result.put(None)
                return False
            if command == 'cut':
                value = len(self._pipes)
                self._run_cut()
            elif command == 'stall':
                self.stalled = True
            elif command == 'resume':
                self.stalled = False
            elif command == 'count':
                value = len(self._pipes)
            elif isinstance(command, tuple) and command[0] == 'cut_at':
                self._cut_at = list(command[1])
            result.put(value)

    def _accept(self):
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()  # the broker is down: so are we
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pipes.append(Pipe(client, upstream))

    def _pipe_of(self, sock):
        for pipe in self._pipes:
            if sock in pipe.pending:
                return pipe
        return None  # closed earlier in this round

    def _read(self, sock):
        pipe = self._pipe_of(sock)
        if pipe is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        if not data:
            self._close(pipe, flush_to=pipe.peer(sock))
            return
        for frame, method in pipe.frames(sock, data):
            if method is not None and self._swallows(method):
                self.cuts += 1
                self._run_cut()
                return
            pipe.pending[pipe.peer(sock)] += frame

    def _swallows(self, method):
        if self._cut_at is None or method != self._cut_at[0]:
            return False
        if self._cut_at[1]:
            self._cut_at[1] -= 1
            return False
        self._cut_at = None
        return True

    def _run_cut(self):
        for pipe in self._pipes:
            pipe.close(reset=True)
        self._pipes = []

    def _write(self, sock):
        pipe = self._pipe_of(sock)
        if pipe is None:
            return
        buffer = pipe.pending[sock]
        try:
            sent = sock.send(buffer)
        except BlockingIOError:
            return
        except OSError:
            self._close(pipe)
            return
        del buffer[:sent]

    def _close(self, pipe, flush_to=None):
        """One side closed: pass on what it sent before, then close both."""
        if flush_to is not None and pipe.pending[flush_to]:
            try:
                flush_to.setblocking(True)
                flush_to.settimeout(1)
                flush_to.sendall(pipe.pending[flush_to])
            except OSError as e:
                if e.errno not in (None, errno.EPIPE, errno.ECONNRESET):
                    raise
        pipe.close()
        self._pipes.remove(pipe)
