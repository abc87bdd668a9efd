"""Process state: the running server, stop requests and the exit status;
observation events.

Runs on: any thread. ``main.run()`` waits for a stop request here; features
that must stop the process (a readfiles directory that vanished, a signal)
call :func:`request_stop` without knowing the console script. Features tell
observers (metrics, the summary) what happened with :func:`notify`.
"""
import logging
import threading

import zope.event


log = logging.getLogger(__name__)

#: The server of the running ``main.run()``, or None.
server = None

_stop_requested = threading.Event()
_exit_status = 0


def reset():
    """Forget earlier stop requests; ``main.run()`` calls it at boot."""
    global _exit_status
    _stop_requested.clear()
    _exit_status = 0


def request_stop(exit_status=0, reason=None):
    """Ask the running daemon to shut down; callable from any thread.

    The process exits with the highest ``exit_status`` requested. ``reason``
    is logged at INFO.
    """
    global _exit_status
    if reason:
        log.info('%s', reason)
    _exit_status = max(_exit_status, exit_status)
    _stop_requested.set()


def wait_for_stop_request(timeout):
    """Block up to ``timeout`` seconds; True once a stop was requested."""
    return _stop_requested.wait(timeout)


def exit_status():
    """The exit status requested so far (0 when none)."""
    return _exit_status


def notify(event):
    """Notify an observation event; a subscriber's error is logged, never
    raised, so that an observer cannot fail the work it observes."""
    try:
        zope.event.notify(event)
    except Exception:
        log.error('A subscriber failed for %r', event, exc_info=True)


class LoopState:
    """The running flag of an ``ILoop``, for its implementations.

    The loop's own thread sets and clears ``_running``; any thread may ask.
    """

    def __init__(self):
        self._running = threading.Event()

    @property
    def running(self):
        """True while the loop serves."""
        return self._running.is_set()

    def wait_until_running(self, timeout=None):
        """Block until the loop serves (or ``timeout``); return ``running``.
        """
        self._running.wait(timeout)
        return self.running
