"""The guard around every call into the cache under test: a time limit, and an exit request turned into an error.

On the main thread of a POSIX process the limit is a ``SIGALRM`` timer that interrupts the example where it
is (a Python loop, a sleep, a lock wait); elsewhere the example runs on a helper thread that is abandoned
when the limit passes. Limits nest: an inner call never extends an outer one. Neither can interrupt a single
C call that never returns, nor code that swallows the interrupt (``while True: try: ... except: pass``):
``kvverify verify`` runs the target in a child process that its parent kills for those
(:mod:`kvverify.runs.isolation`); the parent learns what runs from the messages :func:`tell` sends.

``SystemExit`` and ``KeyboardInterrupt`` raised by the cache's code become :class:`TargetExit`, an ordinary
failure; a ``KeyboardInterrupt`` that comes from the user's Ctrl-C (a SIGINT seen while the call ran) still
stops the run.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds one example may take by default (the ci profile's examples take well under a second each).
DEFAULT_TIME_LIMIT = 60.0

#: Receives every message of :func:`tell` (one listener per process: the isolated child's pipe).
_listener: Callable[[tuple[Any, ...]], None] | None = None
#: Deadlines (time.monotonic()) of the SIGALRM limits in force, outermost first; each earlier than the last.
_alarms: list[float] = []


class ExampleTimeout(BaseException):
    """An example ran past its time limit.

    A ``BaseException``, like ``KeyboardInterrupt``: Hypothesis lets it through at once instead of shrinking,
    which would run more examples that hang.
    """

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        super().__init__(
            f"{what} did not finish within the time limit of {seconds:g} s: the cache hangs or is far too slow "
            "(a lock never released, a loop that never ends, a wait on a device). Raise the limit with "
            "--time-limit SECONDS if it is merely slow."
        )


class TargetExit(Exception):
    """The cache's code raised ``SystemExit`` (``sys.exit()``, ``exit()``) or a ``KeyboardInterrupt`` of its
    own: a failure of the cache, reported like any other, never the end of the run."""

    def __init__(self, error: SystemExit | KeyboardInterrupt, what: str) -> None:
        raised = f"SystemExit({error.code!r})" if isinstance(error, SystemExit) else "KeyboardInterrupt"
        why = ("asked to end the process (sys.exit(), exit(), quit())" if isinstance(error, SystemExit)
               else "interrupted itself (no Ctrl-C was pressed)")
        super().__init__(
            f"{raised} raised by the cache's code ({what}): it {why}; a cache must report a problem by raising an "
            "ordinary exception (ValueError, RuntimeError, ...), never by ending the process"
        )


def check_time_limit(value: object, option: str, came: str | None = None) -> float | None:
    """``value`` as seconds (None: no limit), or ValueError naming ``option`` unless it is a finite number > 0.
    ``came``: what was typed, when ``value`` was parsed from it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{option} must be > 0 seconds and finite, or none for no limit (the default is "
            f"{DEFAULT_TIME_LIMIT:g}); got {came if came is not None else repr(value)}."
        )
    return float(value)


def parse_time_limit(text: str, option: str) -> float | None:
    """A command-line ``SECONDS`` or ``none``: the seconds, None for no limit; ValueError naming ``option``."""
    if text.strip().lower() == "none":
        return None
    try:
        value: object = float(text)
    except ValueError:
        value = text
    return check_time_limit(value, option, came=text)


def listen(listener: Callable[[tuple[Any, ...]], None] | None) -> None:
    """Send every message of :func:`tell` in this process to ``listener`` (None: to nobody)."""
    global _listener
    _listener = listener


def tell(*message: Any) -> None:
    """Tell the listener, if any, what the run does now (``("property", name)``, ``("result", result)``, ...)."""
    if _listener is not None:
        _listener(message)


@contextmanager
def watched(seconds: float | None, what: str, case: object = None) -> Iterator[None]:
    """Tell the listener that ``what`` runs for at most ``seconds`` (with ``case``'s description), and when it
    ends; the listener's process enforces the limit from outside."""
    if _listener is not None:
        describe = getattr(case, "describe", None)
        tell("enter", seconds, what, describe() if callable(describe) else None)
    try:
        yield
    finally:
        tell("leave")


def run_with_time_limit(function: Callable[[], T], seconds: float | None, what: str, case: object = None) -> T:
    """``function()``, or :class:`ExampleTimeout` once it has run ``seconds`` (None: no limit); a
    ``SystemExit`` or ``KeyboardInterrupt`` it raises (not the user's Ctrl-C) becomes :class:`TargetExit`.
    ``case``: what the function runs, told to the listener."""
    with watched(seconds, what, case), _sigint_seen() as pressed:
        try:
            if seconds is None:
                return function()
            if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
                return _with_alarm(function, seconds, what)
            return _with_thread(function, seconds, what)
        except (SystemExit, KeyboardInterrupt) as error:
            if isinstance(error, KeyboardInterrupt) and pressed():
                raise
            # with the cache's frames, so reports say where in the cache it was raised
            raise TargetExit(error, what).with_traceback(error.__traceback__) from error


@contextmanager
def _sigint_seen() -> Iterator[Callable[[], bool]]:
    """Yields ``pressed()``: whether a SIGINT arrived meanwhile (only then is a KeyboardInterrupt the user's).
    Off the main thread no signal can raise one; where SIGINT is ignored (the isolated child) none comes."""
    seen: list[int] = []
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield lambda: False
        return

    def note(signum: int, frame: FrameType | None) -> Any:
        seen.append(signum)
        return previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)


def _with_alarm(function: Callable[[], T], seconds: float, what: str) -> T:
    deadline = time.monotonic() + seconds
    if _alarms and _alarms[-1] <= deadline:  # an enclosing limit ends first: it alone applies
        return function()

    def expire(signum: int, frame: FrameType | None) -> None:
        raise ExampleTimeout(seconds, what)

    previous = signal.signal(signal.SIGALRM, expire)
    _alarms.append(deadline)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return function()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _alarms.pop()
        signal.signal(signal.SIGALRM, previous)
        if _alarms:  # the enclosing limit, with the time it has left
            signal.setitimer(signal.ITIMER_REAL, max(_alarms[-1] - time.monotonic(), 1e-3))


def _with_thread(function: Callable[[], T], seconds: float, what: str) -> T:
    outcome: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            outcome.append(function())
        except BaseException as error:
            failure.append(error)

    worker = threading.Thread(target=work, name="kvverify-example", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ExampleTimeout(seconds, what)
    if failure:
        raise failure[0]
    return outcome[0]
