"""A per-example time limit, so a cache that hangs fails its property instead of hanging the suite.

On the main thread of a POSIX process the limit is a ``SIGALRM`` timer that interrupts the example where it
is (a Python loop, a sleep, a lock wait); elsewhere the example runs on a helper thread that is abandoned
when the limit passes. Neither can interrupt a single C call that never returns.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

T = TypeVar("T")

#: Seconds one example may take by default (the ci profile's examples take well under a second each).
DEFAULT_TIME_LIMIT = 60.0


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


def run_with_time_limit(function: Callable[[], T], seconds: float | None, what: str) -> T:
    """``function()``, or :class:`ExampleTimeout` once it has run ``seconds`` (None: no limit)."""
    if seconds is None:
        return function()
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _with_alarm(function, seconds, what)
    return _with_thread(function, seconds, what)


def _with_alarm(function: Callable[[], T], seconds: float, what: str) -> T:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise ExampleTimeout(seconds, what)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return function()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
