"""Subscribers the writefiles integration tests register through ZCML."""
import threading


#: Message ids of every ``MessageStored`` event ``fail_to_store`` saw.
stored = []
#: How many more events ``fail_to_store`` turns into an error.
failures_left = [0]
_lock = threading.Lock()


def reset():
    """Forget what was seen; fail no more."""
    del stored[:]
    failures_left[0] = 0


def fail_to_store(event):
    """Raise while ``failures_left`` says so (aborting the transaction)."""
    with _lock:
        stored.append(event.message.header.message_id)
        left = failures_left[0]
        failures_left[0] = left - 1
    if left > 0:
        raise RuntimeError('provoked')
