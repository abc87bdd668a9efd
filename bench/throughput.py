"""Handled messages per second: the daemon next to raw py-amqp loops.

Runs on: the main thread of its own process (plus, for the latency run, a
producer thread with a connection of its own); the daemon runs as a
subprocess (``python -m gocept.amqprun.main``), the broker is the one named
by ``AMQP_HOSTNAME`` etc. or a private loopback node started here.

Usage::

    python bench/throughput.py [--messages N] [--workers 1,16,64]
                               [--metrics] [--tree NAME=DIR] ...

Every run gets a fresh virtual host (or, with ``AMQP_VIRTUALHOST``, queue
names of its own) and is preloaded with N persistent messages in a durable
queue. Contenders, all doing the same broker work per message (one
persistent reply published, the request acked, in an AMQP transaction):
the raw per-message loop (``tx_commit`` per message), the raw group loop
(one ``tx_commit`` per 16 messages) and the daemon at each worker amount.
Each reports msg/s, client and broker CPU per message (from ``/proc``) and,
for the daemon, the mean batch of its AMQP transactions. Then: latency at
half the daemon's peak rate, RSS over a longer run, and the goals of issue
12 next to the ratios measured. See bench/README.rst.

Prints tables and exits 0; exits 1 when a run does not complete (no
speed is asserted anywhere).
"""
import argparse
import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import amqp
import amqp.exceptions

import gocept.amqprun.testing


HERE = os.path.dirname(os.path.abspath(__file__))

ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="gocept.amqprun" />
  <utility component="handlers.reply" name="bench" />
</configure>
"""

#: The daemon logs WARNING and up, except for the server's lifecycle lines
#: (among them the count of AMQP transactions at exit): no per-message line.
CONFIG = gocept.amqprun.testing.CONFIG_TEMPLATE + """\
<logger>
  name gocept.amqprun.server
  level INFO
  propagate false
  <logfile>
    path STDOUT
  </logfile>
</logger>
"""

COMMITTED = re.compile(
    r'Committed (\d+) op\(s\) in (\d+) AMQP transaction\(s\)')

#: Messages per ``tx_commit`` of the raw group loop.
GROUP = 16

#: The goals of issue 12 hold for this worker amount.
GOAL_WORKERS = 16

#: Seconds without progress after which a run counts as stuck.
STALL_TIMEOUT = 60

#: Seconds between two looks at the reply queue's length.
POLL_INTERVAL = 0.01

#: Latency samples left out at the start (connections, caches warming up).
LATENCY_WARM_UP = 0.1


class BenchmarkFailed(Exception):
    """A run did not complete; the message says why."""


def cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (Linux), or None.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _stat_fields(pid):
    """The fields of ``/proc/<pid>/stat`` after the command name, or None.

    State is the first, the parent pid the second, utime the 12th, stime
    the 13th.
    """
    if pid is None:
        return None
    try:
        with open('/proc/%d/stat' % pid) as f:
            # The command name (in parentheses) may hold spaces.
            return f.read().rpartition(')')[2].split()
    except OSError:
        return None


def rss_bytes(pid):
    """Resident set size of process ``pid`` in bytes (Linux), or None."""
    try:
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def beam_pid(root):
    """The Erlang VM among ``root`` and its descendants (a private node's
    ``rabbitmq-server`` pid), or None.

    Only the tree below the pid the harness started is searched; the VM is
    the process of it that used the most CPU.
    """
    children = collections.defaultdict(list)
    for name in os.listdir('/proc'):
        fields = _stat_fields(int(name)) if name.isdigit() else None
        if fields is not None:
            children[int(fields[1])].append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children[pid])
    known = [(cpu_seconds(pid), pid) for pid in tree
             if cpu_seconds(pid) is not None]
    return max(known)[1] if known else None


class Meter:
    """CPU of the client process and of the broker, and wall-clock time,
    between :meth:`start` and :meth:`stop`."""

    def __init__(self, client_pid, broker_pid):
        self.client_pid = client_pid
        self.broker_pid = broker_pid
        self._start = None

    def _sample(self):
        return (time.perf_counter(), cpu_seconds(self.client_pid),
                cpu_seconds(self.broker_pid))

    def start(self, done=0):
        """Begin measuring; ``done`` messages are handled so far."""
        self._start = (done,) + self._sample()

    @property
    def started(self):
        """Whether :meth:`start` was called."""
        return self._start is not None

    def stop(self, done):
        """The :class:`Result` since :meth:`start`, ``done`` handled now.
        """
        now = self._sample()
        first_done, began = self._start[0], self._start[1:]
        spent = [None if a is None or b is None else b - a
                 for a, b in zip(began[1:], now[1:])]
        return Result(done - first_done, now[0] - began[0], *spent)


class Result:
    """What one run measured."""

    def __init__(self, count, seconds, client_cpu, broker_cpu):
        #: Messages handled within the measured ``seconds``.
        self.count = count
        self.seconds = seconds
        #: CPU seconds of the client process and of the broker meanwhile
        #: (None: unknown).
        self.client_cpu = client_cpu
        self.broker_cpu = broker_cpu
        #: Mean ops per AMQP transaction of the daemon (None: not known).
        self.batch = None

    @property
    def rate(self):
        """Messages per second."""
        return self.count / self.seconds

    @property
    def client_us(self):
        """Client CPU microseconds per message, or None."""
        return _per_message(self.client_cpu, self.count)

    @property
    def broker_us(self):
        """Broker CPU microseconds per message, or None."""
        return _per_message(self.broker_cpu, self.count)


def _per_message(cpu, count):
    return None if cpu is None else cpu / count * 1e6


def progress(text):
    """Tell what happens now (stderr, so stdout holds only the tables)."""
    sys.stderr.write('bench: %s\n' % text)
    sys.stderr.flush()


class Names:
    """Queue and routing keys of one run, unique on the broker."""

    def __init__(self):
        token = uuid.uuid4().hex[:8]
        self.queue = 'bench.%s.requests' % token
        self.routing_key = 'bench.%s.request' % token
        self.reply_queue = 'bench.%s.replies' % token
        self.reply_routing_key = 'bench.%s.reply' % token

    def environment(self):
        """The variables ``bench/handlers.py`` reads."""
        return dict(AMQPRUN_BENCH_QUEUE=self.queue,
                    AMQPRUN_BENCH_ROUTING_KEY=self.routing_key,
                    AMQPRUN_BENCH_REPLY_ROUTING_KEY=self.reply_routing_key)


@contextlib.contextmanager
def connected(broker, virtual_host):
    """A plain py-amqp connection to ``virtual_host``, closed afterwards.
    """
    connection = amqp.Connection(
        host='%s:%s' % (broker.hostname, broker.port),
        userid=broker.username, password=broker.password,
        virtual_host=virtual_host)
    connection.connect()
    try:
        yield connection
    except BaseException:
        # An interrupted read leaves the framing in an unknown state, and
        # the close handshake could wait forever: just drop the socket.
        connection.collect()
        raise
    connection.close()


def body_of(size):
    """``size`` bytes of printable filler."""
    return (b'0123456789abcdef' * (size // 16 + 1))[:size]


def request(body, number):
    """The ``number``-th persistent request with ``body``."""
    return amqp.Message(body, delivery_mode=2,
                        message_id='<%d.request@bench>' % number,
                        timestamp=int(time.time()))


def declare(channel, names):
    """Declare both durable queues, bound to ``amq.topic`` as the daemon
    would declare them."""
    channel.queue_declare(names.queue, durable=True, auto_delete=False)
    channel.queue_bind(names.queue, 'amq.topic', names.routing_key)
    channel.queue_declare(names.reply_queue, durable=True, auto_delete=False)
    channel.queue_bind(names.reply_queue, 'amq.topic',
                       names.reply_routing_key)


def preload(broker, virtual_host, names, count, size):
    """Declare the queues; fill the request queue with ``count`` messages.
    """
    with connected(broker, virtual_host) as connection:
        channel = connection.channel()
        declare(channel, names)
        body = body_of(size)
        for number in range(count):
            channel.basic_publish(request(body, number), exchange='amq.topic',
                                  routing_key=names.routing_key)
        wait_for_queue_length(channel, names.queue, count)


def queue_length(channel, queue):
    """Ready messages in ``queue`` now."""
    return channel.queue_declare(queue, passive=True)[1]


def wait_for_queue_length(channel, queue, count, timeout=STALL_TIMEOUT):
    """Wait until ``queue`` holds ``count`` ready messages."""
    deadline = time.monotonic() + timeout
    while True:
        length = queue_length(channel, queue)
        if length == count:
            return
        if time.monotonic() > deadline:
            raise BenchmarkFailed('%s holds %d messages, expected %d' % (
                queue, length, count))
        time.sleep(0.05)


def reply_to(delivery, number, names):
    """The reply the raw loops publish, as the daemon's handler makes it:
    persistent, with message id, timestamp, correlation id and
    ``references``."""
    parent_id = delivery.properties.get('message_id')
    return amqp.Message(
        delivery.body, content_type='application/octet-stream',
        delivery_mode=2, timestamp=int(time.time()),
        message_id='<%d.reply@bench>' % number, correlation_id=parent_id,
        application_headers={'references': parent_id})


def run_raw(broker, virtual_host, names, count, group, prefetch):
    """A raw loop: consume; per ``group`` deliveries publish their replies,
    ack them and ``tx_commit`` once.

    Measured from the first commit to the last, with the CPU time of this
    process (which runs nothing else meanwhile) and of the broker.
    """
    meter = Meter(os.getpid(), broker.pid)
    with connected(broker, virtual_host) as connection:
        channel = connection.channel()
        channel.tx_select()
        channel.basic_qos(0, prefetch, False)
        deliveries = collections.deque()
        # The callback only collects: publishing or committing inside it
        # would dispatch further deliveries recursively (py-amqp reads
        # frames while it waits for a synchronous reply).
        channel.basic_consume(names.queue, callback=deliveries.append)
        handled = 0
        while handled < count:
            wanted = min(group, count - handled)
            while len(deliveries) < wanted:
                try:
                    connection.drain_events(timeout=STALL_TIMEOUT)
                except socket.timeout:
                    raise BenchmarkFailed(
                        'raw loop: no delivery for %d s after %d of %d'
                        % (STALL_TIMEOUT, handled, count))
            for _ in range(wanted):
                delivery = deliveries.popleft()
                channel.basic_publish(
                    reply_to(delivery, handled, names), exchange='amq.topic',
                    routing_key=names.reply_routing_key)
                channel.basic_ack(delivery.delivery_tag)
                handled += 1
            channel.tx_commit()
            if not meter.started:
                meter.start(handled)
        result = meter.stop(handled)
        wait_for_queue_length(channel, names.reply_queue, count)
    return result


class Daemon:
    """The ``server`` script in a subprocess, serving one run's queues."""

    def __init__(self, broker, virtual_host, names, workers, directory,
                 metrics=False, prefetch=None, source=None):
        directory = tempfile.mkdtemp(prefix='daemon-%dw-' % workers,
                                     dir=directory)
        mapping = dict(broker.config_mapping(virtual_host),
                       workers=workers, settings='',
                       amqp_extra=('' if prefetch is None
                                   else 'prefetch_count %d' % prefetch),
                       worker_extra='', log_level='WARNING',
                       log_path='STDOUT')
        config = gocept.amqprun.testing.write_config(
            directory, ZCML, CONFIG + METRICS_SECTION if metrics else CONFIG,
            mapping)
        env = dict(os.environ, **names.environment())
        # ``source`` (another tree's src) comes before the installed one.
        env['PYTHONPATH'] = os.pathsep.join(
            filter(None, [HERE, source, os.environ.get('PYTHONPATH')]))
        self.workers = workers
        self.process = gocept.amqprun.testing.ServerProcess(config, env=env)

    @property
    def pid(self):
        """The daemon's process id."""
        return self.process.pid

    @contextlib.contextmanager
    def running(self):
        """Start the daemon; stop it with SIGTERM on exit (it must exit 0).
        """
        self.process.start()
        progress('daemon pid %d, %d worker(s)' % (self.pid, self.workers))
        try:
            yield self
            self.process.signal(signal.SIGTERM)
            status = self.process.wait(60)
            if status != 0:
                raise BenchmarkFailed('the daemon exited with status %s:\n%s'
                                      % (status, self.process.output))
        finally:
            self.process.kill()  # by its pid, only if it still runs

    def check_alive(self, what):
        """Fail when the daemon has exited."""
        if self.process.process.poll() is not None:
            raise BenchmarkFailed(
                'the daemon exited with status %s during %s:\n%s' % (
                    self.process.process.returncode, what,
                    self.process.output))

    def batch(self):
        """Mean ops per AMQP transaction, from the line logged at exit."""
        found = COMMITTED.search(self.process.output)
        if found is None or not int(found.group(2)):
            return None
        return int(found.group(1)) / int(found.group(2))


def wait_for_replies(channel, names, count, daemon, on_reply=None):
    """Poll the reply queue's length until it holds ``count`` messages.

    ``on_reply(length)`` is called after each look that saw progress. The
    replies stay in the queue, as in the raw runs: the broker does the same
    work for every contender.
    """
    seen, progressed = 0, time.monotonic()
    while seen < count:
        time.sleep(POLL_INTERVAL)
        length = queue_length(channel, names.reply_queue)
        now = time.monotonic()
        if length != seen:
            seen, progressed = length, now
            if on_reply is not None:
                on_reply(length)
            continue
        daemon.check_alive('%d of %d replies' % (seen, count))
        if now - progressed > STALL_TIMEOUT:
            raise BenchmarkFailed(
                'no reply for %d s after %d of %d' % (
                    STALL_TIMEOUT, seen, count))


#: The ``<metrics>`` section of the ``--metrics`` run (a free port).
#: The name of the ``--metrics`` run.
METRICS_RUN = 'daemon, %d workers, <metrics>' % GOAL_WORKERS

METRICS_SECTION = """
<metrics>
  address 127.0.0.1:0
</metrics>
"""


def run_daemon(broker, virtual_host, names, count, workers, directory,
               profile=None, metrics=False, prefetch=None, source=None):
    """Run the daemon with ``workers`` workers on the preloaded queue (and
    a ``<metrics>`` section with ``metrics``, a ``prefetch_count`` unless
    None, the gocept.amqprun of the ``src`` directory ``source`` unless
    None).

    Measured from the first look at the reply queue that saw replies to
    the look that saw all of them, with the CPU time of the daemon process
    and of the broker meanwhile.
    """
    daemon = Daemon(broker, virtual_host, names, workers, directory,
                    metrics, prefetch, source)
    meter = Meter(None, broker.pid)
    profiler = None
    with connected(broker, virtual_host) as connection:
        channel = connection.channel()
        try:
            with daemon.running():
                meter.client_pid = daemon.pid

                def on_reply(length):
                    nonlocal profiler
                    if meter.started:
                        return
                    meter.start(length)
                    if profile:
                        # Only now: the profile shows handling, not
                        # start-up.
                        profiler = start_profiler(daemon.pid, workers,
                                                  profile)
                wait_for_replies(channel, names, count, daemon, on_reply)
                result = meter.stop(count)
        finally:
            if profiler is not None:
                stop_profiler(profiler)
    result.batch = daemon.batch()
    return result


def run_long(broker, virtual_host, names, count, workers, directory):
    """The daemon on ``count`` messages; return its RSS in bytes at the
    first reply, after 10 % of the replies and at the end."""
    daemon = Daemon(broker, virtual_host, names, workers, directory)
    samples = {}
    with connected(broker, virtual_host) as connection:
        channel = connection.channel()
        with daemon.running():
            def on_reply(length):
                samples.setdefault('first', rss_bytes(daemon.pid))
                if length >= count // 10:
                    samples.setdefault('warm', rss_bytes(daemon.pid))
            wait_for_replies(channel, names, count, daemon, on_reply)
            samples['end'] = rss_bytes(daemon.pid)
    return samples


class PacedProducer(threading.Thread):
    """Publishes ``count`` requests at ``rate`` per second on a connection
    of its own; each body starts with the monotonic time it was sent."""

    def __init__(self, broker, virtual_host, names, count, rate, size):
        super().__init__(name='bench-producer', daemon=True)
        self.args = broker, virtual_host
        self.names = names
        self.count = count
        self.rate = rate
        self.filler = body_of(max(0, size - 8))
        self.error = None

    def run(self):
        """Publish on schedule (late messages go at once, not skipped)."""
        try:
            with connected(*self.args) as connection:
                channel = connection.channel()
                began = time.monotonic()
                for number in range(self.count):
                    delay = began + number / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    body = struct.pack('>d', time.monotonic()) + self.filler
                    channel.basic_publish(
                        request(body, number), exchange='amq.topic',
                        routing_key=self.names.routing_key)
        except Exception as e:  # reported by the main thread
            self.error = e


def run_latency(broker, virtual_host, names, rate, seconds, workers,
                directory, size):
    """Offer ``rate`` msg/s for ``seconds`` to a running daemon; return
    the latencies (request sent to reply received) in seconds.

    The replies are consumed by an independent client; the daemon's
    handler copies the request's body, timestamp included, into them.
    """
    count = max(2, int(rate * seconds))
    latencies = []
    daemon = Daemon(broker, virtual_host, names, workers, directory)
    with connected(broker, virtual_host) as connection:
        channel = connection.channel()
        declare(channel, names)

        def on_reply(message):
            sent, = struct.unpack('>d', message.body[:8])
            latencies.append(time.monotonic() - sent)
        channel.basic_consume(names.reply_queue, no_ack=True,
                              callback=on_reply)
        with daemon.running():
            daemon.process.wait_for_output('Consuming', STALL_TIMEOUT)
            producer = PacedProducer(
                broker, virtual_host, names, count, rate, size)
            producer.start()
            deadline = time.monotonic() + seconds + STALL_TIMEOUT
            while len(latencies) < count:
                try:
                    connection.drain_events(timeout=0.5)
                except socket.timeout:
                    pass
                daemon.check_alive('the latency run')
                if producer.error is not None:
                    raise BenchmarkFailed('producer: %s' % producer.error)
                if time.monotonic() > deadline:
                    raise BenchmarkFailed('latency run: %d of %d replies'
                                          % (len(latencies), count))
            producer.join()
    return latencies[int(len(latencies) * LATENCY_WARM_UP):]


def start_profiler(pid, workers, directory):
    """Attach py-spy to the daemon ``pid``; it stops when the daemon exits.
    """
    os.makedirs(directory, exist_ok=True)
    number = len([name for name in os.listdir(directory)
                  if name.startswith('daemon-%dw-' % workers)]) + 1
    path = os.path.join(directory, 'daemon-%dw-%d.txt' % (workers, number))
    progress('profiling the daemon into %s' % path)
    # --threads: one stack root per thread (amqprun-io, amqprun-worker-N);
    # --idle: waiting threads too, so each thread's samples show where its
    # wall-clock time goes (py-spy's on-CPU guess counts lock waits anyway);
    # raw: collapsed stacks, one line per stack with its sample count.
    # Not --nonblocking: reading a running process lost most samples here.
    return subprocess.Popen(
        ['py-spy', 'record', '--pid', str(pid), '--threads', '--idle',
         '--rate', '200', '--format', 'raw', '--output', path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(profiler):
    """Wait for py-spy to write its output (it ends with the daemon)."""
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.send_signal(signal.SIGINT)  # by its pid: write and stop
        profiler.wait(30)


@contextlib.contextmanager
def fresh_vhost(broker):
    """A fresh virtual host and run names; removed afterwards."""
    try:
        virtual_host = broker.create_vhost()
    except RuntimeError as e:
        raise BenchmarkFailed(
            'cannot create a virtual host (set AMQP_VIRTUALHOST to use an '
            'existing one): %s' % e)
    names = Names()
    try:
        yield virtual_host, names
    finally:
        remove(broker, virtual_host, names)


def measure(broker, name, count, size, run):
    """Preload a fresh vhost and call ``run(vhost, names)``; clean up."""
    with fresh_vhost(broker) as (virtual_host, names):
        progress('%s: preloading %d messages of %d bytes' % (
            name, count, size))
        preload(broker, virtual_host, names, count, size)
        progress('%s: running' % name)
        result = run(virtual_host, names)
        progress('%s: %.0f msg/s, %s/%s us CPU per message' % (
            name, result.rate, format_number(result.client_us),
            format_number(result.broker_us)))
        return result


def remove(broker, virtual_host, names):
    """Delete the run's fresh vhost, or its queues on a fixed one."""
    if virtual_host == broker.virtual_host:
        delete_queues(broker, virtual_host, names)
        return
    try:
        broker.delete_vhost(virtual_host)  # with its queues
    except RuntimeError as e:
        progress('could not delete virtual host %s: %s' % (virtual_host, e))


def delete_queues(broker, virtual_host, names):
    """Remove the run's queues (best effort)."""
    try:
        with connected(broker, virtual_host) as connection:
            channel = connection.channel()
            channel.queue_delete(names.queue)
            channel.queue_delete(names.reply_queue)
    except (OSError, amqp.exceptions.AMQPError) as e:
        progress('could not delete the queues %s and %s: %s' % (
            names.queue, names.reply_queue, e))


def worker_amounts(text):
    """``1,16:32,64`` -> [(1, None), (16, 32), (64, None)]: worker amounts,
    each with the ``prefetch_count`` after a colon (None: the default)."""
    try:
        runs = [tuple(int(number) for number in part.split(':'))
                for part in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError('not a list of numbers: %r' % text)
    if not runs or any(len(run) > 2 or min(run) < 1 for run in runs):
        raise argparse.ArgumentTypeError(
            'each run is WORKERS or WORKERS:PREFETCH, both >= 1')
    return [(run[0], run[1] if len(run) == 2 else None) for run in runs]


def source_tree(text):
    """``NAME=DIR`` -> (NAME, absolute DIR): a checkout's ``src`` (or the
    checkout itself) holding ``gocept/amqprun``."""
    name, _, directory = text.partition('=')
    if not name or not directory:
        raise argparse.ArgumentTypeError('not NAME=DIR: %r' % text)
    directory = os.path.abspath(directory)
    for candidate in (directory, os.path.join(directory, 'src')):
        if os.path.isfile(os.path.join(
                candidate, 'gocept', 'amqprun', '__init__.py')):
            return name, candidate
    raise argparse.ArgumentTypeError(
        'no gocept/amqprun in %s or its src/' % directory)


def parse_arguments(argv):
    """The command line."""
    parser = argparse.ArgumentParser(
        prog='bench/throughput.py',
        description='Measure handled messages per second and CPU per '
                    'message of the gocept.amqprun daemon next to raw '
                    'py-amqp loops doing the same work, in the same run.')
    parser.add_argument('--messages', type=int, default=8000, metavar='N',
                        help='messages per run (default: %(default)s)')
    parser.add_argument('--workers', type=worker_amounts,
                        default=[(1, None), (GOAL_WORKERS, None),
                                 (64, None)], metavar='N[:P],..',
                        help='daemon worker amounts, each optionally with '
                             'its prefetch_count P (default: 1,16,64)')
    parser.add_argument('--size', type=int, default=100, metavar='BYTES',
                        help='body size of requests and replies '
                             '(default: %(default)s)')
    parser.add_argument('--repeat', type=int, default=3, metavar='R',
                        help='rounds of all runs; the table shows the '
                             'median (default: %(default)s)')
    parser.add_argument('--latency-seconds', type=float, default=5,
                        metavar='S',
                        help='length of the latency run at half the peak '
                             'rate; 0 skips it (default: %(default)s)')
    parser.add_argument('--long-messages', type=int, default=30000,
                        metavar='N',
                        help='messages of the RSS run; 0 skips it '
                             '(default: %(default)s; the goal is stated '
                             'for 200000)')
    parser.add_argument('--profile', metavar='DIR',
                        help='record each daemon run with py-spy (must be '
                             'installed) into DIR/daemon-<workers>w-<n>.txt '
                             '(collapsed stacks)')
    parser.add_argument('--tree', type=source_tree, action='append',
                        default=[], metavar='NAME=DIR',
                        help='also run every daemon run with the '
                             'gocept.amqprun of the checkout DIR, named '
                             'NAME in the table (repeatable)')
    parser.add_argument('--metrics', action='store_true',
                        help='add a %d-worker daemon run with <metrics> and '
                             'print its ratio to the plain one (goal: 0.95)'
                             % GOAL_WORKERS)
    arguments = parser.parse_args(argv)
    if arguments.messages < 2 * GROUP:
        parser.error('--messages must be at least %d' % (2 * GROUP))
    if arguments.repeat < 1:
        parser.error('--repeat must be at least 1')
    if arguments.size < 8:
        parser.error('--size must be at least 8 (the latency timestamp)')
    if arguments.long_messages and arguments.long_messages < 10:
        parser.error('--long-messages must be 0 or at least 10')
    return arguments


def format_number(value, pattern='%.0f'):
    """``value`` with ``pattern``, ``?`` when unknown."""
    return '?' if value is None else pattern % value


def median_of(results, attribute):
    """The median of a result attribute over the rounds, or None."""
    values = [getattr(result, attribute) for result in results]
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def print_header(arguments, broker, load):
    """What was measured where."""
    print()
    print('%d persistent messages of %d bytes per run, %d round(s), '
          'broker %s:%s%s' % (
              arguments.messages, arguments.size, arguments.repeat,
              broker.hostname, broker.port,
              ' (private node)' if broker.node is not None else ''))
    print('load average before/after: %.1f/%.1f on %d CPU(s)' % (
        load[0], os.getloadavg()[0], os.cpu_count()))
    print()


def print_runs(results):
    """Per run the median rate, its range, the ratio to the raw per-message
    loop, the median CPU per message of client and broker, the batch."""
    raw = statistics.median(result.rate for result in results[0][1])
    row = '%-30s %7s %11s %6s %9s %9s %6s'
    print(row % ('run', 'msg/s', 'min-max', 'vs raw', 'client us',
                 'broker us', 'batch'))
    print(row % tuple('-' * width for width in (30, 7, 11, 6, 9, 9, 6)))
    for name, run_results in results:
        rates = [result.rate for result in run_results]
        print(row % (
            name, '%.0f' % statistics.median(rates),
            '%.0f-%.0f' % (min(rates), max(rates)),
            '%.2f' % (statistics.median(rates) / raw),
            format_number(median_of(run_results, 'client_us')),
            format_number(median_of(run_results, 'broker_us')),
            format_number(median_of(run_results, 'batch'), '%.1f')))
    print()


def print_goals(goals):
    """Each goal's ratio next to its target."""
    row = '%-52s %9s %9s %4s'
    print(row % ('goal (issue 12)', 'measured', 'target', 'met'))
    print(row % ('-' * 52, '-' * 9, '-' * 9, '-' * 4))
    for text, value, pattern, target, met in goals:
        print(row % (text, format_number(value, pattern), target,
                     '?' if value is None else ('yes' if met(value)
                                                else 'NO')))
    print()


def goals_of(medians, latencies, rss):
    """(text, value, format, target, test) of every goal; value may be None.
    """
    daemon = medians.get('daemon, %d workers' % GOAL_WORKERS)
    raw, group = medians['raw'], medians['group']

    def ratio(a, b):
        return None if None in (daemon, a, b) or not b else a / b
    p99 = (statistics.quantiles(latencies, n=100)[98] * 1000
           if latencies and len(latencies) >= 2 else None)
    growth = (None if not rss or None in (rss.get('warm'), rss.get('end'))
              else (rss['end'] / rss['warm'] - 1) * 100)

    def get(attribute):
        return None if daemon is None else daemon[attribute]
    return [
        ('msg/s: daemon %d w / raw group of %d' % (GOAL_WORKERS, GROUP),
         ratio(get('rate'), group['rate']), '%.2f', '>= 0.60',
         lambda v: v >= 0.6),
        ('msg/s: daemon %d w / raw per message' % GOAL_WORKERS,
         ratio(get('rate'), raw['rate']), '%.2f', '>= 3.00',
         lambda v: v >= 3),
        ('client CPU/msg: daemon %d w / raw group' % GOAL_WORKERS,
         ratio(get('client_us'), group['client_us']), '%.2f', '<= 2.00',
         lambda v: v <= 2),
        ('broker CPU/msg: daemon %d w / raw group' % GOAL_WORKERS,
         ratio(get('broker_us'), group['broker_us']), '%.2f', '<= 1.25',
         lambda v: v <= 1.25),
        ('p99 latency at half the peak rate (ms)', p99, '%.1f', '< 10',
         lambda v: v < 10),
        ('RSS growth over the long run (%)', growth, '%.1f', '< 10',
         lambda v: v < 10),
    ] + metrics_goal(medians, daemon)


def metrics_goal(medians, daemon):
    """The goal of the ``--metrics`` run, when there was one."""
    with_metrics = medians.get(METRICS_RUN)
    if with_metrics is None:
        return []
    value = (with_metrics['rate'] / daemon['rate']
             if daemon and daemon['rate'] else None)
    return [('msg/s: daemon %d w, <metrics> on / off' % GOAL_WORKERS,
             value, '%.2f', '>= 0.95', lambda v: v >= 0.95)]


def print_latency(rate, latencies):
    """p50/p99 of the latency run."""
    if not latencies:
        return
    cuts = statistics.quantiles(latencies, n=100)
    print('latency at %.0f msg/s offered (half the %d-worker peak), %d '
          'replies: p50 %.1f ms, p99 %.1f ms, max %.1f ms' % (
              rate, GOAL_WORKERS, len(latencies), cuts[49] * 1000,
              cuts[98] * 1000, max(latencies) * 1000))


def print_rss(count, rss):
    """RSS of the long run."""
    if not rss:
        return
    sizes = tuple(format_number(rss.get(key) and rss[key] / 2 ** 20, '%.1f')
                  for key in ('first', 'warm', 'end'))
    print('RSS over %d messages (%d workers): %s MB at the first reply, '
          '%s MB after 10 %%, %s MB at the end'
          % ((count, GOAL_WORKERS) + sizes))


def plan(arguments, broker, directory):
    """The runs of one round: (name, function of vhost and names)."""
    count = arguments.messages

    def raw(group, prefetch):
        def run(virtual_host, names):
            return run_raw(broker, virtual_host, names, count, group,
                           prefetch)
        return run

    def daemon(amount, metrics=False, prefetch=None, source=None):
        def run(virtual_host, names):
            return run_daemon(broker, virtual_host, names, count, amount,
                              directory, arguments.profile, metrics,
                              prefetch, source)
        return run

    runs = [('raw, commit per message', raw(1, GOAL_WORKERS)),
            ('raw, commit per %d' % GROUP, raw(GROUP, 2 * GROUP))]
    for amount, prefetch in arguments.workers:
        name = 'daemon, %d worker%s' % (amount, 's' if amount != 1 else '')
        if prefetch is not None:
            name += ', prefetch %d' % prefetch
        runs.append((name, daemon(amount, prefetch=prefetch)))
        for tree, source in arguments.tree:
            runs.append(('%s [%s]' % (name, tree),
                         daemon(amount, prefetch=prefetch, source=source)))
    if arguments.metrics:
        runs.append((METRICS_RUN, daemon(GOAL_WORKERS, metrics=True)))
    return runs


def start_broker():
    """The broker named by ``AMQP_*`` variables, or a private node.

    ``broker.pid`` is the Erlang VM of a private node (its CPU time is
    measured), else None.
    """
    broker = gocept.amqprun.testing.Broker.from_environment()
    if broker is None:
        progress('starting a private RabbitMQ node on 127.0.0.1')
        try:
            broker = gocept.amqprun.testing.Broker.start_private_node()
        except RuntimeError as e:
            raise BenchmarkFailed(
                'cannot start a private RabbitMQ node: %s' % e)
    broker.pid = (beam_pid(broker.node.server_pid)
                  if broker.node is not None else None)
    progress('broker CPU measured on pid %s' % broker.pid)
    return broker


def run_rounds(arguments, broker, directory):
    """Every run, ``repeat`` times; return (name, [Result, ...]) pairs.

    Rounds interleave the runs, so that a slow phase of the broker's disk
    hits them alike rather than one run; every other round runs them in
    the reverse order, so that none always comes first.
    """
    runs = plan(arguments, broker, directory)
    results = [(name, []) for name, _ in runs]
    for round_number in range(1, arguments.repeat + 1):
        order = list(zip(runs, results))
        if round_number % 2 == 0:
            order.reverse()
        for (name, run), (_, run_results) in order:
            label = '%s (round %d)' % (name, round_number)
            run_results.append(measure(
                broker, label, arguments.messages, arguments.size, run))
    return results


def medians_of(results):
    """name (``raw``, ``group`` or the daemon's) -> median attributes."""
    medians = {}
    for number, (name, run_results) in enumerate(results):
        key = {0: 'raw', 1: 'group'}.get(number, name)
        medians[key] = {attribute: median_of(run_results, attribute)
                        for attribute in ('rate', 'client_us', 'broker_us',
                                          'batch')}
    return medians


def latency_and_rss(arguments, broker, directory, peak):
    """The latency run at half ``peak`` and the long RSS run."""
    latencies, rss, rate = [], {}, peak / 2
    if arguments.latency_seconds and peak:
        with fresh_vhost(broker) as (virtual_host, names):
            progress('latency: %.0f msg/s offered for %.0f s' % (
                rate, arguments.latency_seconds))
            latencies = run_latency(
                broker, virtual_host, names, rate, arguments.latency_seconds,
                GOAL_WORKERS, directory, arguments.size)
    if arguments.long_messages:
        with fresh_vhost(broker) as (virtual_host, names):
            progress('long run: preloading %d messages'
                     % arguments.long_messages)
            preload(broker, virtual_host, names, arguments.long_messages,
                    arguments.size)
            progress('long run: running')
            rss = run_long(broker, virtual_host, names,
                           arguments.long_messages, GOAL_WORKERS, directory)
    return rate, latencies, rss


def main(argv=None):
    """Run everything; return the exit status."""
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load = os.getloadavg()
    directory = tempfile.mkdtemp(prefix='amqprun-bench-')
    broker = None
    try:
        broker = start_broker()
        results = run_rounds(arguments, broker, directory)
        medians = medians_of(results)
        peak = (medians.get('daemon, %d workers' % GOAL_WORKERS)
                or {}).get('rate')
        rate, latencies, rss = latency_and_rss(
            arguments, broker, directory, peak)
    except BenchmarkFailed as e:
        progress('FAILED: %s' % e)
        return 1
    except (OSError, amqp.exceptions.AMQPError) as e:
        progress('FAILED: broker %s:%s: %s: %s' % (
            broker.hostname, broker.port, type(e).__name__, e))
        return 1
    except KeyboardInterrupt:
        progress('interrupted')
        return 130
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if broker is not None and broker.node is not None:
            progress('stopping the private RabbitMQ node')
            broker.stop()  # by the pids of its processes
    print_header(arguments, broker, load)
    print_runs(results)
    print_latency(rate, latencies)
    print_rss(arguments.long_messages, rss)
    print()
    print_goals(goals_of(medians, latencies, rss))
    return 0


if __name__ == '__main__':
    sys.exit(main())
