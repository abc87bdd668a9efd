"""The ``server`` console script: ZConfig -> logging -> ZCML -> start.

Runs on: the main thread. Boot order: configuration file, logging, the
ISettings utility, ZCML, the ISender utility, ``ConfigFinished``, the
metrics server (``<metrics>``), signal handlers, workers, the I/O thread,
``ProcessStarted`` once connected. On
SIGTERM/SIGINT: ``ProcessStopping``, stop consuming, let running handlers
finish, close the connection, exit 0. Fatal errors exit non-zero with one
log line naming the cause.
"""
import argparse
import importlib
import logging
import signal
import sys
import threading

import zope.component
import zope.component.event  # noqa: F401 (dispatches events to handlers)
import zope.configuration.exceptions
import zope.configuration.xmlconfig
import zope.event

import gocept.amqprun.config
import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.process
import gocept.amqprun.retry
import gocept.amqprun.security
import gocept.amqprun.server
import gocept.amqprun.settings
import gocept.amqprun.summary
import gocept.amqprun.topology
import gocept.amqprun.worker


log = logging.getLogger(__name__)

#: Seconds the I/O thread gets to close the connection at shutdown, after
#: the handlers' ``shutdown-timeout``.
IO_STOP_TIMEOUT = 10


def main(config_file=None):
    """Run the daemon with ``config_file`` (default: ``sys.argv[1]``)."""
    if config_file is None:
        config_file = parse_arguments(sys.argv[1:]).config_file
    sys.exit(run(config_file))


def parse_arguments(argv):
    """Parse the command line of the ``server`` script."""
    parser = argparse.ArgumentParser(
        prog='server',
        description='Run the gocept.amqprun daemon: connect to the AMQP '
                    'broker and handle messages with the handlers the '
                    'configuration registers.')
    parser.add_argument('config_file', help='the ZConfig configuration file')
    return parser.parse_args(argv)


def run(config_file):
    """Boot, serve until stopped; return the exit status."""
    gocept.amqprun.process.reset()
    try:
        conf = gocept.amqprun.config.load(config_file)
    except gocept.amqprun.interfaces.ConfigurationError as e:
        sys.stderr.write('server: %s\n' % e)
        return 2
    try:
        configure_logging(conf)
    except Exception as e:
        sys.stderr.write('server: Cannot start logging of %s: %s\n' % (
            config_file, gocept.amqprun.config.one_line(e)))
        return 2
    try:
        pool, server = configure(conf)
        metrics = start_metrics(conf, server, pool)
    except Exception as e:
        log.critical('%s', describe_configuration_error(e, conf))
        return 1
    gocept.amqprun.process.server = server
    tally = gocept.amqprun.summary.MessageTally()
    tally.subscribe()
    try:
        return serve(conf, pool, server)
    finally:
        tally.unsubscribe()
        log.info('Messages: %s', tally.summary())
        if metrics is not None:
            metrics.stop()
        gocept.amqprun.process.server = None
        log.info('Exiting')


def configure_logging(conf):
    """Start the ``<eventlog>`` and ``<logger>`` sections."""
    conf.eventlog.startup()
    for logger in conf.loggers:
        logger.startup()


def configure(conf):
    """Settings, ZCML, server and ISender; ``ConfigFinished``."""
    settings = gocept.amqprun.settings.Settings()
    if conf.settings is not None:
        settings.update({str(key): str(value)
                         for key, value in conf.settings.items()})
    zope.component.provideUtility(
        settings, gocept.amqprun.interfaces.ISettings)
    zope.configuration.xmlconfig.file(conf.worker.component_configuration)
    handlers = list(zope.component.getUtilitiesFor(
        gocept.amqprun.interfaces.IHandler))
    gocept.amqprun.topology.check_unique_queues(handlers)
    gocept.amqprun.security.check_principals(handlers)
    amount = conf.worker.amount
    parameters = gocept.amqprun.connection.Parameters.from_section(
        conf.amqp_server,
        prefetch_count=conf.amqp_server.prefetch_count or max(amount, 1))
    server = gocept.amqprun.server.Server(
        parameters, setup_handlers=amount > 0, workers=amount)
    zope.component.provideUtility(
        server, gocept.amqprun.interfaces.ISender)
    policy = gocept.amqprun.retry.RetryPolicy(
        delay=conf.worker.retry_delay,
        max_attempts=conf.worker.max_attempts,
        dead_letter_routing_key=conf.worker.dead_letter_routing_key,
        dead_letter_exchange=conf.worker.dead_letter_exchange)
    pool = gocept.amqprun.worker.WorkerPool(
        server, amount, policy,
        transient_retries=conf.worker.transient_retries)
    zope.event.notify(gocept.amqprun.interfaces.ConfigFinished())
    return pool, server


def start_metrics(conf, server, pool):
    """Serve metrics, health and readiness as ``<metrics>`` says (before
    the connection, so readiness can say "connecting"); return the
    running ``metrics.MetricsServer`` or None without the section."""
    if conf.metrics is None:
        return None
    try:
        # Imported here: without <metrics> the extra is not needed.
        metrics_module = importlib.import_module('gocept.amqprun.metrics')
    except ImportError as e:
        if e.name != 'prometheus_client':
            raise
        raise gocept.amqprun.interfaces.ConfigurationError(
            'The <metrics> section needs the metrics extra: pip install '
            'gocept.amqprun[metrics] (%s)' % e) from e
    metrics = metrics_module.MetricsServer(conf.metrics, server, pool)
    metrics.start()
    return metrics


def describe_configuration_error(error, conf):
    """One line naming what is wrong with the configuration."""
    text = gocept.amqprun.config.one_line(error)
    if isinstance(error, zope.configuration.exceptions.ConfigurationError):
        return 'Invalid ZCML file %s: %s' % (
            conf.worker.component_configuration, text)
    return 'Cannot start: %s' % text


def install_signal_handlers():
    """SIGTERM/SIGINT stop cleanly; SIGUSR1 stops with exit status 1."""
    if threading.current_thread() is not threading.main_thread():
        return  # e.g. main() run in a thread by tests

    def stop(signum, frame):
        gocept.amqprun.process.request_stop(
            0, 'Received signal %s, terminating.' % signum)

    def stop_on_error(signum, frame):
        gocept.amqprun.process.request_stop(
            1, 'Received signal %s, terminating with an error.' % signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, stop_on_error)


def serve(conf, pool, server):
    """Start workers and the I/O thread; run until asked to stop."""
    install_signal_handlers()
    pool.start()
    io_thread = threading.Thread(
        target=server.start, name='amqprun-io', daemon=True)
    io_thread.start()
    while not server.wait_until_running(0.2):
        if (not io_thread.is_alive()
                or gocept.amqprun.process.wait_for_stop_request(0)):
            return shut_down(conf, pool, server, io_thread)
    zope.event.notify(gocept.amqprun.interfaces.ProcessStarted())
    log.info('Process started: %d worker(s).', pool.amount)
    while not gocept.amqprun.process.wait_for_stop_request(0.5):
        if not io_thread.is_alive():
            break
    return shut_down(conf, pool, server, io_thread)


def shut_down(conf, pool, server, io_thread):
    """Stop consuming, let handlers finish, close; return the exit status.
    """
    zope.event.notify(gocept.amqprun.interfaces.ProcessStopping())
    server.stop_consuming()
    survivors = pool.stop(conf.worker.shutdown_timeout)
    if survivors:
        # Whether their commits still go through is the I/O thread's to
        # tell: it logs what it did not carry out when it stops.
        log.warning('%d handler(s) did not finish within %s s%s; what they '
                    'have not committed when the connection closes goes '
                    'back to the broker', len(survivors),
                    conf.worker.shutdown_timeout,
                    ' (publishing blocked by the broker: %s)' % server.blocked
                    if server.blocked else '')
    zope.event.notify(
        gocept.amqprun.interfaces.WorkersStopped(len(survivors)))
    server.stop()
    io_thread.join(IO_STOP_TIMEOUT)
    if io_thread.is_alive():
        log.warning('The I/O thread did not stop within %s s (a broker '
                    'call it waits for is not answered); exiting anyway: '
                    'what it did not commit goes back to the broker',
                    IO_STOP_TIMEOUT)
    if server.error is not None:
        return 1
    return gocept.amqprun.process.exit_status()


if __name__ == '__main__':
    main()
