"""Prometheus metrics, liveness and readiness over HTTP (``<metrics>``).

Runs on: its own thread, ``amqprun-metrics``: the HTTP server, which also
samples the daemon's state twice a second so that ``since`` is exact, and
answers each request in a short-lived thread (``amqprun-metrics-request``). The
counters are updated by the threads whose work they count: worker threads
(``IMessageHandled``, ``IFileWritten``), the I/O thread (the commit
observer), sending threads (``ISendFinished``) and readfiles readers
(``IFileSent``); everything else is read from the server and the worker
pool when scraped, so the core does not know this module. Needs the
``metrics`` extra (``prometheus_client``).

Label values come from the configuration only (handler names, directories,
a fixed set of outcomes and loss reasons), never from a message, so no
message can make the number of series grow.
"""
import datetime
import json
import logging
import socket
import socketserver
import threading
import time
import wsgiref.simple_server

import prometheus_client
import prometheus_client.core
import zope.component

import gocept.amqprun.connection
import gocept.amqprun.interfaces
from gocept.amqprun.connection import describe


log = logging.getLogger(__name__)

#: Buckets of the handling and commit durations, in seconds.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1, 2.5, 5, 10, 30, 60)
#: Buckets of the commit batch size (ops per AMQP transaction).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: Seconds between two samples of the state (the ``since`` resolution).
SAMPLE_INTERVAL = 0.5


class Health:
    """Liveness and readiness of the daemon, judged from its state.

    ``clock`` (monotonic) and ``wall_clock`` are replaceable for tests.
    Any thread; :meth:`sample` remembers when a probe's status changed.
    """

    def __init__(self, server, pool, liveness_timeout, expects_consumers,
                 clock=time.monotonic, wall_clock=time.time):
        self.server = server
        self.pool = pool
        self.liveness_timeout = liveness_timeout
        #: False with ``amount 0`` or no handler: not consuming is fine.
        self.expects_consumers = expects_consumers
        self.clock = clock
        self.wall_clock = wall_clock
        #: Set on ``IProcessStopping``.
        self.stopping = False
        self.started = clock()
        self._since = {}
        self._lock = threading.Lock()

    def liveness(self):
        """``(live, status, reason)``: wedged I/O loop, dead worker."""
        if self.stopping:
            return True, 'stopping', 'The process is shutting down'
        last_turn = self.server.last_turn
        idle = self.clock() - (self.started if last_turn is None
                               else last_turn)
        if idle > self.liveness_timeout:
            return False, 'stalled', (
                'The I/O loop has not turned for %.1f s (liveness-timeout '
                '%s s)' % (idle, self.liveness_timeout))
        dead = [worker.name for worker in self.pool.workers
                if not worker.is_alive()]
        if dead:
            return False, 'worker-died', (
                '%d of %d worker thread(s) died: %s' % (
                    len(dead), self.pool.amount, ', '.join(dead)))
        return True, 'alive', None

    def readiness(self):
        """``(ready, status, reason)``: connected, consuming, unblocked."""
        server = self.server
        address = server.parameters.address
        if self.stopping:
            return False, 'stopping', 'The process is shutting down'
        if not server.running:
            loss = server.history.last_loss
            if loss is None:
                return False, 'connecting', (
                    'Connecting to the AMQP broker at %s' % address)
            return False, 'reconnecting', 'Lost the connection to %s: %s' % (
                address, describe(loss.error))
        if server.blocked is not None:
            return False, 'blocked', (
                'The broker blocks publishing: %s' % server.blocked)
        if server.republishing:
            return False, 'republishing', (
                'A queue refused %d message(s); commits that publish there '
                'wait until they are published again'
                % server.republishing)
        if self.expects_consumers and not server.consuming:
            return False, 'not-consuming', 'Connected, but not consuming'
        return True, 'ready', None

    def node(self):
        """``host:port`` of the broker node connected to, or None."""
        if not self.server.running:
            return None
        return self.server.node or self.server.parameters.address

    def sample(self):
        """Look at both probes now (remembers when their status began)."""
        for probe in (self.liveness, self.readiness):
            self.document(probe)

    def document(self, probe):
        """``(ok, {"status", "reason", "since"})`` of ``probe``
        (:meth:`liveness` or :meth:`readiness`); ``since`` is when the
        status began (ISO 8601, UTC), as far as sampling saw it."""
        ok, status, reason = probe()
        with self._lock:
            known = self._since.get(probe.__name__)
            if known is None or known[0] != status:
                known = self._since[probe.__name__] = (
                    status, self.wall_clock())
        since = datetime.datetime.fromtimestamp(
            known[1], datetime.timezone.utc)
        return ok, {'status': status, 'reason': reason,
                    'since': since.isoformat(timespec='seconds')}


class StateCollector:
    """Collects what is read from the daemon when scraped: gauges of the
    connection, the workers and the queue, loss and reconnect counts."""

    def __init__(self, health):
        self.health = health

    def collect(self):
        """The metric families (prometheus_client collector protocol)."""
        health = self.health
        server, pool = health.server, health.pool
        gauge = prometheus_client.core.GaugeMetricFamily
        yield gauge('amqprun_connected',
                    'Whether the AMQP connection is up (0/1).',
                    value=int(server.running))
        yield gauge('amqprun_consuming',
                    'Whether the handlers\' queues are consumed (0/1).',
                    value=int(bool(server.consuming)))
        yield gauge('amqprun_blocked',
                    'Whether the broker blocks publishing (0/1).',
                    value=int(server.blocked is not None))
        yield gauge('amqprun_commits_held',
                    'Commits held while the broker blocks publishing or '
                    'refused messages wait to be published again.',
                    value=server.held)
        yield gauge('amqprun_messages_to_republish',
                    'Messages a queue refused that wait to be published '
                    'again (while there are any, commits that publish '
                    'there are held).', value=server.republishing)
        yield gauge('amqprun_ready', 'Whether /readyz says ready (0/1).',
                    value=int(health.readiness()[0]))
        yield gauge('amqprun_live', 'Whether /healthz says alive (0/1).',
                    value=int(health.liveness()[0]))
        last_turn = server.last_turn
        yield gauge('amqprun_io_loop_idle_seconds',
                    'Seconds since the I/O loop last turned.',
                    value=0 if last_turn is None
                    else max(0, health.clock() - last_turn))
        yield gauge('amqprun_workers_configured',
                    'Worker threads configured (<worker> amount).',
                    value=pool.amount)
        yield gauge('amqprun_workers_alive', 'Worker threads alive.',
                    value=sum(worker.is_alive() for worker in pool.workers))
        waiting = server.tasks.qsize()
        yield gauge('amqprun_deliveries_waiting',
                    'Received messages waiting for a worker (bounded by '
                    'the prefetch count).', value=waiting)
        yield gauge('amqprun_messages_in_handlers',
                    'Messages being handled now.',
                    value=max(0, server.tasks.unfinished_tasks - waiting))
        losses = prometheus_client.core.CounterMetricFamily(
            'amqprun_connection_losses',
            'Connections to the broker lost, by reason.', labels=['reason'])
        for reason in gocept.amqprun.connection.LOSS_REASONS:
            losses.add_metric([reason], server.history.losses[reason])
        yield losses
        yield prometheus_client.core.CounterMetricFamily(
            'amqprun_reconnects',
            'Connections opened after the first one.',
            value=max(0, server.history.generation - 1))
        yield prometheus_client.core.InfoMetricFamily(
            'amqprun_broker', 'The broker node connected to ("" when not '
            'connected).', value={'node': health.node() or ''})


class Metrics:
    """The registry of one daemon and the subscribers that count."""

    def __init__(self, health, handler_names):
        self.health = health
        self.registry = registry = prometheus_client.CollectorRegistry()
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)
        self.messages = prometheus_client.Counter(
            'amqprun_messages', 'Received messages whose handling ended, by '
            'handler and outcome.', ['handler', 'outcome'],
            registry=registry)
        self.handling = prometheus_client.Histogram(
            'amqprun_handling_seconds', 'Seconds from taking a message to '
            'the end of its transaction, by handler.', ['handler'],
            buckets=DURATION_BUCKETS, registry=registry)
        for name in handler_names:
            self.handling.labels(name)
            for outcome in gocept.amqprun.interfaces.OUTCOMES:
                self.messages.labels(name, outcome)
        self.commit_seconds = prometheus_client.Histogram(
            'amqprun_commit_seconds', 'Seconds of a tx.commit round trip.',
            buckets=DURATION_BUCKETS, registry=registry)
        self.batch_size = prometheus_client.Histogram(
            'amqprun_commit_batch_size', 'Ops (acks with their publishes, '
            'rejects, sends) per AMQP transaction.', buckets=BATCH_BUCKETS,
            registry=registry)
        self.sent = prometheus_client.Counter(
            'amqprun_sent_messages', 'Messages sent outside handlers '
            '(ISender from other threads, readfiles), by outcome.',
            ['outcome'], registry=registry)
        for outcome in ('committed', 'failed'):
            self.sent.labels(outcome)
        self.files_written = prometheus_client.Counter(
            'amqprun_files_written', 'Messages stored by writefiles, by '
            'directory.', ['directory'], registry=registry)
        self.file_write_errors = prometheus_client.Counter(
            'amqprun_file_write_errors', 'Messages writefiles failed to '
            'store (they come back), by directory.', ['directory'],
            registry=registry)
        self.files_sent = prometheus_client.Counter(
            'amqprun_files_sent', 'Files sent by readfiles, by directory.',
            ['directory'], registry=registry)
        self.file_send_failures = prometheus_client.Counter(
            'amqprun_file_send_failures', 'Files readfiles failed to send '
            '(they stay in new/), by directory.', ['directory'],
            registry=registry)
        registry.register(StateCollector(health))

    def subscriptions(self):
        """``(subscriber, event interface)`` pairs to register."""
        interfaces = gocept.amqprun.interfaces
        return [(self.on_message_handled, interfaces.IMessageHandled),
                (self.on_send_finished, interfaces.ISendFinished),
                (self.on_file_written, interfaces.IFileWritten),
                (self.on_file_sent, interfaces.IFileSent),
                (self.on_process_stopping, interfaces.IProcessStopping)]

    def on_message_handled(self, event):
        """Count the outcome; observe the duration."""
        self.messages.labels(event.handler_name, event.outcome).inc()
        self.handling.labels(event.handler_name).observe(event.duration)

    def on_commit(self, size, seconds):
        """Commit observer (I/O thread): batch size and round trip."""
        self.commit_seconds.observe(seconds)
        self.batch_size.observe(size)

    def on_send_finished(self, event):
        """Count the messages of a send outside a handler."""
        self.sent.labels('committed' if event.error is None
                         else 'failed').inc(event.count)

    def on_file_written(self, event):
        """Count a writefiles outcome."""
        counter = (self.files_written if event.error is None
                   else self.file_write_errors)
        counter.labels(event.directory).inc()

    def on_file_sent(self, event):
        """Count a readfiles outcome."""
        counter = (self.files_sent if event.error is None
                   else self.file_send_failures)
        counter.labels(event.directory).inc()

    def on_process_stopping(self, event):
        """From now on both probes say ``stopping``."""
        self.health.stopping = True

    def count(self, outcomes):
        """Messages of every handler that ended in one of ``outcomes``."""
        return int(sum(
            sample.value for family in self.messages.collect()
            for sample in family.samples
            if sample.name == 'amqprun_messages_total'
            and sample.labels['outcome'] in outcomes))

    def status(self):
        """``(ready, document)`` for /readyz and ``amqprun-status``."""
        ready, document = self.health.document(self.health.readiness)
        document.update(
            node=self.health.node(),
            handled=self.count((gocept.amqprun.interfaces.HANDLED,)),
            failed=self.count(gocept.amqprun.interfaces.FAILED_OUTCOMES),
            backlog=self.health.server.tasks.qsize())
        return ready, document


class Application:
    """The WSGI application: ``/metrics``, ``/healthz``, ``/readyz``."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.health = metrics.health
        self._exposition = prometheus_client.make_wsgi_app(metrics.registry)

    def __call__(self, environ, start_response):
        """Answer one request; anything else is a 404."""
        path = environ.get('PATH_INFO') or '/'
        if path == '/metrics':
            return self._exposition(environ, start_response)
        if path == '/healthz':
            return self._json(start_response,
                              *self.health.document(self.health.liveness))
        if path == '/readyz':
            return self._json(start_response, *self.metrics.status())
        start_response('404 Not Found', [('Content-Type', 'text/plain')])
        return [b'Not found: try /metrics, /healthz or /readyz\n']

    @staticmethod
    def _json(start_response, ok, document):
        body = json.dumps(document).encode('utf-8')
        start_response('200 OK' if ok else '503 Service Unavailable', [
            ('Content-Type', 'application/json'),
            ('Content-Length', str(len(body))),
            ('Cache-Control', 'no-store')])
        return [body]


class RequestHandler(wsgiref.simple_server.WSGIRequestHandler):
    """Logs requests at DEBUG instead of writing them to stderr."""

    #: Seconds a client may take to send its request.
    timeout = 5

    def log_message(self, format, *args):
        """One DEBUG line per request."""
        log.debug('%s %s', self.address_string(), format % args)


class HTTPServer(socketserver.ThreadingMixIn,
                 wsgiref.simple_server.WSGIServer):
    """The WSGI server; samples the state between requests.

    Each request gets a thread of its own (``amqprun-metrics-request``), so
    that a client that connects and sends nothing cannot hold up the
    probes.
    """

    #: The :class:`Health` to sample (set before serving).
    health = None
    daemon_threads = True

    def process_request(self, request, client_address):
        """Answer in a named thread."""
        threading.Thread(
            target=self.process_request_thread, args=(request, client_address),
            name='amqprun-metrics-request', daemon=True).start()

    def server_bind(self):
        """Bind without ``getfqdn``: a DNS lookup must not delay start-up.
        """
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()

    def service_actions(self):
        """Sample the probes (``serve_forever`` calls it every pass)."""
        self.health.sample()


class IPv6HTTPServer(HTTPServer):
    """The WSGI server on an IPv6 address."""

    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` for one daemon.

    Creating it binds the socket: an address in use is a
    :class:`~gocept.amqprun.interfaces.ConfigurationError`. :meth:`start`
    subscribes and starts the thread, :meth:`stop` undoes both (joined).
    """

    thread_name = 'amqprun-metrics'

    def __init__(self, section, server, pool):
        handler_names = [name for name, _ in zope.component.getUtilitiesFor(
            gocept.amqprun.interfaces.IHandler)]
        self.server = server
        self.health = Health(
            server, pool, section.liveness_timeout,
            expects_consumers=bool(pool.amount and handler_names))
        self.metrics = Metrics(self.health, handler_names)
        host, port = section.address
        server_class = IPv6HTTPServer if ':' in host else HTTPServer
        try:
            self.httpd = wsgiref.simple_server.make_server(
                host, port, Application(self.metrics),
                server_class=server_class, handler_class=RequestHandler)
        except OSError as e:
            raise gocept.amqprun.interfaces.ConfigurationError(
                'Cannot serve metrics on %s:%s (<metrics> address): %s' % (
                    host, port, e.strerror or e)) from e
        self.httpd.health = self.health
        self.thread = None

    @property
    def address(self):
        """``(host, port)`` actually bound (the free port for port 0)."""
        return self.httpd.server_address[:2]

    def start(self):
        """Subscribe, observe commits, serve in the ``amqprun-metrics``
        thread."""
        site_manager = zope.component.getGlobalSiteManager()
        for subscriber, interface in self.metrics.subscriptions():
            site_manager.registerHandler(subscriber, (interface,))
        self.server.commit_observers.append(self.metrics.on_commit)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(SAMPLE_INTERVAL,),
            name=self.thread_name, daemon=True)
        self.thread.start()
        host, port = self.address
        log.info('Serving metrics on http://%s:%s/metrics (health: /healthz, '
                 'readiness: /readyz)',
                 '[%s]' % host if ':' in host else host, port)

    def stop(self):
        """Stop serving; join the thread; unsubscribe."""
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join()
            self.thread = None
            self.server.commit_observers.remove(self.metrics.on_commit)
            site_manager = zope.component.getGlobalSiteManager()
            for subscriber, interface in self.metrics.subscriptions():
                site_manager.unregisterHandler(subscriber, (interface,))
            log.info('Stopped serving metrics.')
        self.httpd.server_close()
