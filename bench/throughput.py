"""Handled messages per second: the daemon next to a raw py-amqp loop.

Runs on: the main thread of its own process; the daemon runs as a
subprocess (``python -m gocept.amqprun.main``), the broker is the one named
by ``AMQP_HOSTNAME`` etc. or a private loopback node started here.

Usage::

    python bench/throughput.py [--messages N] [--workers N] [--size BYTES]
                               [--metrics]

Every run gets a fresh virtual host (or, with ``AMQP_VIRTUALHOST``, queue
names of its own) and is preloaded with N persistent messages in a durable
queue. The raw loop consumes (prefetch = workers) and, outside the consume
callback, publishes a persistent reply, acks and ``tx_commit``\\ s per
message on one thread. The daemon's handler returns one reply; an
independent client counts the replies. Both rates are measured from the
first reply to the last: (N - 1) / seconds. See bench/README.rst.

Prints a table and exits 0; exits 1 when a run does not complete (no
speed is asserted anywhere).
"""
import argparse
import collections
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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

#: Seconds without progress after which a run counts as stuck.
STALL_TIMEOUT = 60


class BenchmarkFailed(Exception):
    """A run did not complete; the message says why."""


class Result:
    """What one run measured between the first reply and the last."""

    def __init__(self, count, seconds, cpu):
        self.count = count
        self.seconds = seconds
        #: CPU seconds the measured process used meanwhile (None: unknown).
        self.cpu = cpu

    @property
    def rate(self):
        """Messages per second: ``count - 1`` intervals in ``seconds``."""
        return (self.count - 1) / self.seconds

    @property
    def cpu_share(self):
        """CPU seconds per second (1.0 = one core busy), or None."""
        return None if self.cpu is None else self.cpu / self.seconds


def cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (Linux), or None.
    """
    try:
        with open('/proc/%d/stat' % pid) as f:
            # The fields after the command name (which may hold spaces):
            # state is the first, utime the 12th, stime the 13th.
            fields = f.read().rpartition(')')[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def format_cpu(share):
    """``share`` of one core as a percentage (``?`` when unknown)."""
    return '?' if share is None else '%.0f%%' % (share * 100)


def progress(text):
    """Tell what happens now (stderr, so stdout holds only the table)."""
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


def preload(broker, virtual_host, names, count, size):
    """Declare both durable queues; fill the request queue with ``count``
    persistent messages (as the daemon would declare it: bound to
    ``amq.topic``)."""
    with connected(broker, virtual_host) as connection:
        channel = connection.channel()
        channel.queue_declare(names.queue, durable=True, auto_delete=False)
        channel.queue_bind(names.queue, 'amq.topic', names.routing_key)
        channel.queue_declare(names.reply_queue, durable=True,
                              auto_delete=False)
        channel.queue_bind(names.reply_queue, 'amq.topic',
                           names.reply_routing_key)
        body = body_of(size)
        for number in range(count):
            channel.basic_publish(
                amqp.Message(body, delivery_mode=2,
                             message_id='<%d.request@bench>' % number,
                             timestamp=int(time.time())),
                exchange='amq.topic', routing_key=names.routing_key)
        wait_for_queue_length(channel, names.queue, count)


def wait_for_queue_length(channel, queue, count, timeout=STALL_TIMEOUT):
    """Wait until ``queue`` holds ``count`` ready messages."""
    deadline = time.monotonic() + timeout
    while True:
        _, length, _ = channel.queue_declare(queue, passive=True)
        if length == count:
            return
        if time.monotonic() > deadline:
            raise BenchmarkFailed('%s holds %d messages, expected %d' % (
                queue, length, count))
        time.sleep(0.05)


def run_raw(broker, virtual_host, names, count, prefetch):
    """The baseline: consume, then per message reply + ack + tx_commit.

    Returns the :class:`Result` from the first commit to the last, with
    the CPU time of this process (which runs nothing else meanwhile).
    """
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
        first = last = cpu_first = None
        while handled < count:
            if not deliveries:
                try:
                    connection.drain_events(timeout=STALL_TIMEOUT)
                except socket.timeout:
                    raise BenchmarkFailed(
                        'raw loop: no delivery for %d s after %d of %d'
                        % (STALL_TIMEOUT, handled, count))
                continue
            request = deliveries.popleft()
            parent_id = request.properties.get('message_id')
            channel.basic_publish(
                amqp.Message(
                    request.body, content_type='application/octet-stream',
                    delivery_mode=2, timestamp=int(time.time()),
                    message_id='<%d.reply@bench>' % handled,
                    correlation_id=parent_id,
                    application_headers={'references': parent_id}),
                exchange='amq.topic', routing_key=names.reply_routing_key)
            channel.basic_ack(request.delivery_tag)
            channel.tx_commit()
            handled += 1
            last = time.perf_counter()
            if first is None:
                first, cpu_first = last, time.process_time()
        cpu = time.process_time() - cpu_first
        wait_for_queue_length(channel, names.reply_queue, count)
    return Result(count, last - first, cpu)


class ReplyCounter:
    """An independent client that counts the daemon's replies as they come.
    """

    def __init__(self, connection, queue):
        self.connection = connection
        #: The process whose CPU time to measure (set it before counting).
        self.pid = None
        self.count = 0
        self.first = self.last = self.cpu_first = None
        channel = self.connection.channel()
        channel.basic_consume(queue, no_ack=True, callback=self._on_reply)

    def _on_reply(self, message):
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last
            self.cpu_first = cpu_seconds(self.pid)
        self.count += 1

    def wait_for(self, count, daemon, on_first_reply=None):
        """Count until ``count`` replies arrived; fail when stuck.

        ``on_first_reply()`` is called once, soon after the first reply.
        """
        seen, progressed = 0, time.monotonic()
        while self.count < count:
            try:
                self.connection.drain_events(timeout=0.5)
            except socket.timeout:
                pass
            now = time.monotonic()
            if self.count != seen:
                seen, progressed = self.count, now
                if on_first_reply is not None:
                    on_first_reply()
                    on_first_reply = None
                continue
            if daemon.process.poll() is not None:
                raise BenchmarkFailed(
                    'the daemon exited with status %s after %d of %d '
                    'replies:\n%s' % (daemon.process.returncode, self.count,
                                      count, daemon.output))
            if now - progressed > STALL_TIMEOUT:
                raise BenchmarkFailed(
                    'no reply for %d s after %d of %d' % (
                        STALL_TIMEOUT, self.count, count))

    def result(self):
        """The :class:`Result` as seen so far."""
        cpu = cpu_seconds(self.pid)
        if cpu is not None and self.cpu_first is not None:
            cpu -= self.cpu_first
        return Result(self.count, self.last - self.first, cpu)


#: The ``<metrics>`` section of the ``--metrics`` run (a free port).
METRICS_SECTION = """
<metrics>
  address 127.0.0.1:0
</metrics>
"""


def run_daemon(broker, virtual_host, names, count, workers, directory,
               profile=None, metrics=False):
    """Run the daemon (a subprocess) with ``workers`` workers (and
    ``<metrics>`` with ``metrics``).

    Returns the :class:`Result` from the first reply to the last, as the
    counter saw them, with the CPU time of the daemon process meanwhile.
    """
    directory = tempfile.mkdtemp(prefix='daemon-%dw-' % workers,
                                 dir=directory)
    mapping = dict(broker.config_mapping(virtual_host),
                   workers=workers, settings='', amqp_extra='',
                   worker_extra='', log_level='WARNING',
                   log_path='STDOUT')
    template = gocept.amqprun.testing.CONFIG_TEMPLATE
    config = gocept.amqprun.testing.write_config(
        directory, ZCML, template + METRICS_SECTION if metrics else template,
        mapping)
    env = dict(os.environ, **names.environment())
    env['PYTHONPATH'] = os.pathsep.join(
        filter(None, [HERE, os.environ.get('PYTHONPATH')]))
    daemon = gocept.amqprun.testing.ServerProcess(config, env=env)
    profiler = None
    with connected(broker, virtual_host) as connection:
        # Consuming before the daemon starts: the first reply is seen as
        # it arrives, not in a burst of replies that waited for a counter.
        counter = ReplyCounter(connection, names.reply_queue)
        try:
            daemon.start()
            counter.pid = daemon.process.pid
            progress('daemon pid %d, %d worker(s)' % (
                daemon.process.pid, workers))

            def start_profiling():
                # Only now: the profile shows handling, not start-up.
                nonlocal profiler
                profiler = start_profiler(
                    daemon.process.pid, workers, profile)
            counter.wait_for(count, daemon,
                             start_profiling if profile else None)
            result = counter.result()
            daemon.signal(signal.SIGTERM)
            status = daemon.wait(60)
            if status != 0:
                raise BenchmarkFailed(
                    'the daemon exited with status %s:\n%s'
                    % (status, daemon.output))
        finally:
            daemon.kill()  # by its pid, only if it still runs
            if profiler is not None:
                stop_profiler(profiler)
    return result


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


def measure(broker, name, count, size, run):
    """Preload a fresh vhost and call ``run(vhost, names)``; clean up."""
    try:
        virtual_host = broker.create_vhost()
    except RuntimeError as e:
        raise BenchmarkFailed(
            'cannot create a virtual host (set AMQP_VIRTUALHOST to use an '
            'existing one): %s' % e)
    names = Names()
    try:
        progress('%s: preloading %d messages of %d bytes' % (
            name, count, size))
        preload(broker, virtual_host, names, count, size)
        progress('%s: running' % name)
        result = run(virtual_host, names)
        progress('%s: %.0f msg/s, %s CPU' % (
            name, result.rate, format_cpu(result.cpu_share)))
        return result
    finally:
        remove(broker, virtual_host, names)


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


def parse_arguments(argv):
    """The command line."""
    parser = argparse.ArgumentParser(
        prog='bench/throughput.py',
        description='Measure handled messages per second through the '
                    'gocept.amqprun daemon next to a raw py-amqp loop '
                    'doing the same work, in the same run.')
    parser.add_argument('--messages', type=int, default=5000, metavar='N',
                        help='messages per run (default: %(default)s)')
    parser.add_argument('--workers', type=int, default=10, metavar='N',
                        help='daemon workers = prefetch of both '
                             '(default: %(default)s)')
    parser.add_argument('--size', type=int, default=100, metavar='BYTES',
                        help='body size of requests and replies '
                             '(default: %(default)s)')
    parser.add_argument('--repeat', type=int, default=3, metavar='R',
                        help='rounds of all runs; the table shows the '
                             'median (default: %(default)s)')
    parser.add_argument('--profile', metavar='DIR',
                        help='record each daemon run with py-spy (must be '
                             'installed) into DIR/daemon-<workers>w-<n>.txt '
                             '(collapsed stacks)')
    parser.add_argument('--metrics', action='store_true',
                        help='add a daemon run with <metrics> and print its '
                             'ratio to the plain daemon run (goal: 0.95)')
    parser.add_argument('--no-single-worker', dest='single_worker',
                        action='store_false',
                        help='skip the daemon run with one worker')
    arguments = parser.parse_args(argv)
    if arguments.messages < 2:
        parser.error('--messages must be at least 2')
    if arguments.workers < 1:
        parser.error('--workers must be at least 1')
    if arguments.repeat < 1:
        parser.error('--repeat must be at least 1')
    if arguments.size < 0:
        parser.error('--size must not be negative')
    return arguments


def print_table(arguments, broker, results, load):
    """The result: per run the median rate, its range, the ratio of the
    medians to the raw loop's and the median CPU share of the measured
    process (the raw loop's or the daemon's)."""
    raw = statistics.median(result.rate for result in results[0][1])
    print()
    print('%d persistent messages of %d bytes per run, %d round(s), '
          'broker %s:%s%s' % (
              arguments.messages, arguments.size, arguments.repeat,
              broker.hostname, broker.port,
              ' (private node)' if broker.node is not None else ''))
    print('load average before/after: %.1f/%.1f on %d CPU(s)' % (
        load[0], os.getloadavg()[0], os.cpu_count()))
    print()
    print('%-34s %8s %11s %7s %5s' % (
        'run', 'msg/s', 'min-max', 'vs raw', 'CPU'))
    print('%-34s %8s %11s %7s %5s' % (
        '-' * 34, '-' * 8, '-' * 11, '-' * 7, '-' * 5))
    for name, run_results in results:
        rates = [result.rate for result in run_results]
        shares = [result.cpu_share for result in run_results
                  if result.cpu_share is not None]
        median = statistics.median(rates)
        print('%-34s %8.0f %11s %7.2f %5s' % (
            name, median, '%.0f-%.0f' % (min(rates), max(rates)),
            median / raw,
            format_cpu(statistics.median(shares) if shares else None)))
    print()
    if arguments.metrics:
        plain, metrics = (statistics.median(result.rate for result in run)
                          for _, run in results[1:3])
        print('metrics on / off: %.2f (goal: at least 0.95)'
              % (metrics / plain))
        print()


def plan(arguments, broker, directory):
    """The runs of one round: (name, function of vhost and names)."""
    count, workers = arguments.messages, arguments.workers

    def raw(virtual_host, names):
        return run_raw(broker, virtual_host, names, count, workers)

    def daemon(amount, metrics=False):
        def run(virtual_host, names):
            return run_daemon(broker, virtual_host, names, count, amount,
                              directory, arguments.profile, metrics)
        return run

    runs = [('raw py-amqp, 1 thread, prefetch %d' % workers, raw),
            ('daemon, %d worker(s)' % workers, daemon(workers))]
    if arguments.metrics:
        runs.append(('daemon, %d worker(s), <metrics>' % workers,
                     daemon(workers, metrics=True)))
    if arguments.single_worker and workers != 1:
        runs.append(('daemon, 1 worker', daemon(1)))
    return runs


def start_broker():
    """The broker named by ``AMQP_*`` variables, or a private node."""
    broker = gocept.amqprun.testing.Broker.from_environment()
    if broker is not None:
        return broker
    progress('starting a private RabbitMQ node on 127.0.0.1')
    try:
        return gocept.amqprun.testing.Broker.start_private_node()
    except RuntimeError as e:
        raise BenchmarkFailed('cannot start a private RabbitMQ node: %s' % e)


def main(argv=None):
    """Run everything; return the exit status."""
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load = os.getloadavg()
    directory = tempfile.mkdtemp(prefix='amqprun-bench-')
    broker = None
    try:
        broker = start_broker()
        runs = plan(arguments, broker, directory)
        # Rounds interleave the runs, so that a slow phase of the broker's
        # disk hits them alike rather than one run.
        results = [(name, []) for name, _ in runs]
        for round_number in range(1, arguments.repeat + 1):
            for (name, run), (_, run_results) in zip(runs, results):
                label = '%s (round %d)' % (name, round_number)
                run_results.append(measure(
                    broker, label, arguments.messages, arguments.size, run))
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
    print_table(arguments, broker, results, load)
    return 0


if __name__ == '__main__':
    sys.exit(main())
