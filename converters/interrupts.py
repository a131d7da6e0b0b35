"""Ctrl-C (SIGINT) and SIGTERM during a conversion.

Orbax writes and reads with background threads and an event loop: an exception raised in the
middle of one of its calls leaves those threads writing into a folder that is then being
deleted, and the event loop printing tracebacks. `uninterrupted()` holds the two signals
while such a call runs and acts on them when it returns, where cleanup can run.
`signals_raise_interrupted()` makes both raise `Interrupted` (the converter CLI's choice), so
that an interrupted conversion cleans up and says so in one line.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `exit_status` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_status = 128 + signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _deliver(signum: int, handler, frame):
    """What `handler` (as returned by signal.getsignal) would have done with `signum`."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # its handler is already back in place


@contextlib.contextmanager
def uninterrupted(*, deliver: bool = True):
    """Holds SIGINT and SIGTERM until the block ends and then hands the first one to the
    handler that was in place (with `deliver=False`, drops it: for a block after which
    there is nothing left to interrupt). A second one while held is handed on at once.
    Outside the main thread, where signals are not received, it does nothing."""
    previous = {s: signal.getsignal(s) for s in SIGNALS} if _in_main_thread() else {}
    if any(handler is None for handler in previous.values()):  # installed outside Python: leave it
        previous = {}
    held = []

    def hold(signum, frame):
        if held:
            _deliver(signum, previous[signum], frame)
        held.append(signum)

    for s in previous:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if held and deliver:
        _deliver(held[0], previous[held[0]], None)


@contextlib.contextmanager
def signals_raise_interrupted():
    """SIGINT and SIGTERM raise `Interrupted` while the block runs. After the first, further
    ones are ignored, so that the cleanup the first one started is not cut short."""
    if not _in_main_thread():
        yield
        return
    raised = []

    def interrupt(signum, frame):
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
