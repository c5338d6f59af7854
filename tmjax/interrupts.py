"""SIGINT and SIGTERM as one orderly stop, never half-handled.

Python runs a signal handler in the main thread between two bytecodes, wherever that is: inside a
``gc`` callback (jax registers one; an exception raised there is printed as "Exception ignored" and
dropped, so Ctrl-C would be swallowed) or while orbax's threads are writing (the staging folder would
be removed under them, and they would print tracebacks at shutdown). So the handler records the signal
and raises ``Interrupted`` only outside ``deferred()`` sections; ``check()`` re-raises a recorded
signal at safe points, which also catches one whose exception was swallowed. The swallowed one's
"Exception ignored in ..." report is muted (``sys.unraisablehook``): the signal is not lost, only late.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None  # the first signal since handled() was entered
_deferring = 0  # depth of deferred() sections
_installed = False


class Interrupted(KeyboardInterrupt):
    """Raised for SIGINT or SIGTERM; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


def _handler(signum: int, frame: object) -> None:
    global _received
    if _received is None:
        _received = signum
    if not _deferring:
        raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within this block, SIGINT and SIGTERM raise ``Interrupted`` (main thread only; re-entrant)."""
    global _received, _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    previous_hook = sys.unraisablehook

    def quiet_hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):  # ours is recorded: check() raises it
            previous_hook(unraisable)

    _received, _installed = None, True
    sys.unraisablehook = quiet_hook
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = previous_hook
        _installed = False


@contextlib.contextmanager
def deferred(*, raise_at_end: bool = True) -> Iterator[None]:
    """A section that a signal must not cut: one arriving inside takes effect when it ends (or, with
    ``raise_at_end=False``, at the caller's next ``check()``, for a section that finishes the work)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if raise_at_end and not _deferring:
        check()


def received() -> int | None:
    """The signal that arrived inside ``handled()``, if any."""
    return _received if _installed else None


def check() -> None:
    """Raise ``Interrupted`` if a signal arrived (even one whose exception was swallowed)."""
    if received() is not None:
        raise Interrupted(_received)


def exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal number (130 for a plain ``KeyboardInterrupt``, which is SIGINT)."""
    return getattr(err, "exit_code", 128 + signal.SIGINT)
