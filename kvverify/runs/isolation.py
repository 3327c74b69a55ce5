"""Running a target's suite in a child process, so that nothing the target does can end, hang or fool the run.

:func:`run_isolated` starts a fresh interpreter (multiprocessing's "spawn": the same on Linux, macOS and Windows)
that runs the suite and sends each :class:`~kvverify.runs.runner.PropertyResult` back over a pipe, with a message as
each call into the cache begins and ends (:func:`kvverify.checks.watchdog.tell`). The parent holds the clock: a call
that runs past its time limit plus a grace (the child's own SIGALRM could not stop it: a bare ``except:`` swallowed
it, or a C call never returned, or there is no SIGALRM) gets the child killed. A child that dies (``os._exit()``,
``sys.exit()`` from a thread, a segfault, the OOM killer) or is killed becomes a failed property naming the exit
code or signal, the call and the last case it ran; the verdicts it sent before keep theirs, and the remaining
properties run in a new child. The child ends with ``os._exit`` once it has sent its last message, so a non-daemon
thread the cache left behind cannot keep it alive, and it ignores SIGINT: a ``KeyboardInterrupt`` in it comes from
the cache, while the user's Ctrl-C stops the parent, which kills the child. On POSIX the child leads a process group
of its own, and the parent kills the whole group when the child ends, dies or is stopped, so a process the cache
started (a worker, a server) does not outlive the run; SIGTERM or SIGHUP to the parent kill that group before they
end the parent, and on Linux the child dies with a parent killed outright. :func:`run_in_child` runs any other work
once in such a child (the plugin's probe of a target).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from kvverify.checks.devices import DeviceError
from kvverify.checks.loading import TargetError
from kvverify.checks.watchdog import listen
from kvverify.runs.database import DatabaseError
from kvverify.runs.runner import PropertyResult, SuiteResult

#: What a child runs: ``work(properties=[...])`` returns the suite of those properties. It must pickle (a
#: module-level function, or a functools.partial of one with picklable arguments).
Work = Callable[..., SuiteResult]
T = TypeVar("T")

#: Seconds the child may go without a word outside any timed call (imports, the suite's own work), when a time
#: limit is set; at least four time limits.
QUIET_LIMIT = 300.0
_POLL = 0.5  # seconds between checks that the child still lives
_ERRORS: dict[str, type[Exception]] = {"TargetError": TargetError, "DeviceError": DeviceError,
                                       "DatabaseError": DatabaseError, "ValueError": ValueError}


def grace(seconds: float) -> float:
    """How long past a call's time limit the parent waits for the child's own interrupt before killing it."""
    return min(10.0, max(2.0, seconds / 4))


def run_isolated(work: Work, *, target: str, properties: Sequence[str], time_limit: float | None,
                 reproduce: str | None = None) -> SuiteResult:
    """``work(properties=...)`` in child processes: one, and a new one for the remaining properties after each
    death. ``time_limit``: the per-example limit the work applies (None: none, and the child is never killed).
    ``reproduce``: the command that reruns the suite; a property whose child died gets it with ``--property``.

    The verdicts a child reported before it died are kept. The property it was running fails, naming the death;
    a child that died between two properties fails the next one (it had not begun), and a new child that died
    or found the target unusable before its first property fails all that remain (each would meet the same).

    Raises :class:`~kvverify.checks.loading.TargetError` for an unusable target, or one whose first child died
    before any property finished; the work's own ValueError, DeviceError and DatabaseError come through as such."""
    remaining = list(properties)
    results: list[PropertyResult] = []
    header: tuple[str, int, str, str, str, str] | None = None  # target, seed, profile, device, shapes, declared
    while remaining:
        watch = _Watch(time_limit)
        try:
            final = watch.run(work, remaining)
        except TargetError as error:  # a later child found the target unusable: the verdicts reached stand
            if not results or header is None:
                raise
            final, watch.death = None, str(error)
        results += watch.results
        header = watch.header or header
        if final is not None:
            header = (final.target, final.seed, final.profile, final.device, final.shapes, final.declaration)
            break
        if header is None or (watch.property is None and not results):
            raise TargetError(f"target {target!r}: {watch.death}")
        done = {r.name for r in results}
        deaths = _deaths(watch, [name for name in remaining if name not in done], reproduce)
        results += deaths
        remaining = [name for name in remaining if name not in done | {r.name for r in deaths}]
    if header is None:  # no properties asked for
        raise ValueError("run_isolated needs at least one property")
    name, seed, profile, device, shapes, declared = header
    return SuiteResult(name, seed, profile, results, device=device, shapes=shapes, declaration=declared)


def run_in_child(work: Callable[..., T], *, target: str, time_limit: float | None) -> T:
    """``work(properties=[])`` once, in a child process watched as :func:`run_isolated` watches the suite's (its
    own process group, killed whole): the value it returns. A child that dies or hangs raises
    :class:`~kvverify.checks.loading.TargetError` naming how; the work's own errors come through as there."""
    watch = _Watch(time_limit)
    value = watch.run(work, [])
    if value is None:
        raise TargetError(f"target {target!r}: {watch.death}")
    return value  # type: ignore[no-any-return]


def _deaths(watch: _Watch, remaining: list[str], reproduce: str | None) -> list[PropertyResult]:
    """The failed verdicts a child's death gives, first of ``remaining`` first: the property it was running, or
    the next one when it died between two, or every one when it died before its first."""
    if watch.property is not None:
        dead, examples = [watch.property], watch.examples
    else:
        dead, examples = (remaining[:1] if watch.results else remaining), 0
    seconds = time.monotonic() - watch.property_started if watch.property is not None else 0.0
    verdicts = []
    for name in dead:
        why = watch.death
        if name != watch.property:
            why += f"\n\nProperty {name} had not begun: it fails for what ended the process that was to run it."
        again = f"{reproduce} --property {name}" if reproduce else ""
        verdicts.append(PropertyResult(name, "failed", examples, seconds, why, reproduce=again))
    return verdicts


def _child(connection: Connection, work: Callable[..., Any], properties: list[str], parent: int) -> None:
    """The child's whole life: run the work, say how it went, and end whatever the cache left running."""
    if hasattr(os, "setpgrp"):  # POSIX: a group of its own, which the parent kills whole
        os.setpgrp()
        _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: a KeyboardInterrupt here is the cache's
    message: tuple[Any, ...]
    try:
        listen(connection.send)
        message = ("done", work(properties=properties))
    except BaseException as error:
        message = ("error", type(error).__name__, str(error), "".join(traceback.format_exception(error)))
    try:
        listen(None)
        connection.send(message)
        connection.close()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)


@dataclass
class _Watch:
    """One child, watched: what it reported, and what it was doing when it died."""

    time_limit: float | None
    results: list[PropertyResult] = field(default_factory=list)
    header: tuple[str, int, str, str, str, str] | None = None  # target, seed, profile, device, shapes, declared
    property: str | None = None  # the property running now
    property_started: float = 0.0
    examples: int = 0  # calls of the current property that finished
    calls: list[tuple[float | None, float, str, str | None]] = field(default_factory=list)  # limit, start, what, case
    last_case: str | None = None
    last_word: float = field(default_factory=time.monotonic)
    death: str = ""

    def run(self, work: Callable[..., Any], properties: list[str]) -> Any:
        """What the child's work returned (a SuiteResult), or None when it died (``death`` says how)."""
        context = multiprocessing.get_context("spawn")
        reader, writer = context.Pipe(duplex=False)
        # not a daemon: a daemon may not start processes of its own, and a cache may (workers, a server)
        process = context.Process(target=_child, args=(writer, work, properties, os.getpid()),
                                  name="kvverify-target")
        with _ending_kills_the_group():
            try:
                process.start()
                writer.close()  # the child holds the only writer: its death is the reader's end of file
                return self._follow(process, reader)
            finally:
                reader.close()
                _kill_group(process)
                process.join(5)

    def _follow(self, process: Any, reader: Connection) -> Any:
        while True:
            deadline, call = self._deadline()
            now = time.monotonic()
            if deadline is not None and now >= deadline and not reader.poll(0):
                _kill_group(process)
                process.join(5)
                self.death = self._with_case(_hang(call, now - (call[1] if call else self.last_word)))
                return None
            if reader.poll(_POLL if deadline is None else min(_POLL, deadline - now)):
                try:
                    message = reader.recv()
                except (EOFError, OSError):
                    self._died(process)
                    return None
                self.last_word = time.monotonic()
                if message[0] == "done":
                    return message[1]
                if message[0] == "error":
                    _raise(*message[1:])
                self._note(message)
            elif not process.is_alive() and not reader.poll(0):
                self._died(process)
                return None

    def _note(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "enter":
            self.calls.append((message[1], time.monotonic(), message[2], message[3]))
            self.last_case = message[3] or self.last_case
        elif kind == "leave" and self.calls:
            self.calls.pop()
            self.examples += not self.calls and self.property is not None
        elif kind == "suite":
            self.header = (message[1], message[2], message[3], message[4], message[5], message[6])
        elif kind == "property":
            self.property, self.property_started, self.examples, self.last_case = message[1], time.monotonic(), 0, None
        elif kind == "result":
            self.results.append(message[1])
            self.property = None

    def _deadline(self) -> tuple[float | None, tuple[float | None, float, str, str | None] | None]:
        """When to kill the child, and the call whose limit that is (None: the quiet limit between calls)."""
        if self.time_limit is None:
            return None, None
        timed = [(start + limit + grace(limit), (limit, start, what, case))
                 for limit, start, what, case in self.calls if limit is not None]
        if timed:
            return min(timed, key=lambda pair: pair[0])
        if self.calls:  # inside a call with no limit of its own
            return None, None
        return self.last_word + max(QUIET_LIMIT, 4 * self.time_limit), None

    def _died(self, process: Any) -> None:
        process.join(5)
        code = process.exitcode
        what = self.calls[-1][2] if self.calls else self._between()
        if code is not None and code < 0:
            name = _signal_name(-code)
            cause = (f"was killed by signal {-code} ({name}) during {what}: a crash in native code (a segfault "
                     "in an extension or a kernel: SIGSEGV or SIGBUS; abort(): SIGABRT), or memory exhausted (the "
                     "kernel's out-of-memory killer sends SIGKILL).")
        else:
            cause = (f"ended with exit code {code} during {what}: the cache's code ended the process (os._exit(), "
                     "or an extension calling exit() or abort()) instead of returning or raising an exception.")
        self.death = self._with_case(f"The process running the cache {cause}")

    def _between(self) -> str:
        if self.property is not None:
            return f"property {self.property}, between two calls to the cache"
        if self.results:
            return f"the suite's own work after property {self.results[-1].name} finished, before the next began"
        return "the suite's setup (importing the target, building the models)"

    def _with_case(self, text: str) -> str:
        plural = "" if self.examples == 1 else "s"
        if self.property:
            text += (f" It happened after {self.examples} example{plural} of {self.property} finished; the remaining "
                     "properties run in a new process.")
        elif self.results:
            text += " The verdicts reached before it stand; the remaining properties run in a new process."
        if self.last_case:
            text += "\n\nlast case (not shrunk):\n" + "\n".join("  " + line for line in self.last_case.splitlines())
        return text


class _Ending(BaseException):
    """SIGTERM or SIGHUP came while a child ran: the group is killed on the way out, then the signal acts."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


def _ending(number: int, frame: object) -> None:
    raise _Ending(number)


@contextlib.contextmanager
def _ending_kills_the_group() -> Iterator[None]:
    """SIGTERM or SIGHUP (a CI timeout, ``kill``, a closed terminal) while a child runs: the child's group,
    out of reach of a signal sent to this process's group, is killed first (the ``finally`` the signal raises
    through), then the signal is sent again with its default action and ends this process as it would have.
    Only on POSIX, in the main thread, for a signal whose action is still the default."""
    replaced: dict[int, Any] = {}
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        for ending_signal in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(ending_signal) is signal.SIG_DFL:
                replaced[ending_signal] = signal.signal(ending_signal, _ending)
    try:
        yield
    except _Ending as ending:
        for number in replaced:
            signal.signal(number, signal.SIG_DFL)
        replaced.clear()
        os.kill(os.getpid(), ending.number)
        raise SystemExit(128 + ending.number) from None  # not reached: the default action ends the process
    finally:
        for number, handler in replaced.items():
            signal.signal(number, handler)


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with(parent: int) -> None:
    """Linux: the kernel kills the child when the process that started it dies (a SIGKILL no ``finally`` sees):
    leading a group of its own, it is out of reach of a signal sent to the parent's group."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # no prctl in this C library: the parent's finally only
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def _kill_group(process: Any) -> None:
    """Kill the child and, on POSIX, every process left in its group (what the cache started)."""
    if process.is_alive():
        process.kill()
    if hasattr(os, "killpg") and process.pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left in the group
            os.killpg(process.pid, signal.SIGKILL)


def _hang(call: tuple[float | None, float, str, str | None] | None, elapsed: float) -> str:
    if call is None:
        return (f"the process running the cache said nothing for {elapsed:.0f} s outside any call to the cache "
                "(importing the target, or the suite's own work) and was stopped.")
    limit, _, what, _ = call
    text = (f"{what} did not finish within the time limit of {limit:g} s, and went on past the interrupt sent at "
            "the limit (a bare `except:` or `except BaseException:` around a retry loop swallows it; so does a C "
            f"call that never returns): kvverify stopped the process running the cache after {elapsed:.1f} s. "
            "Raise the limit with --time-limit SECONDS if it is merely slow.")
    return text


def _raise(kind: str, text: str, trace: str) -> None:
    """The child's exception, raised again here: the suite's own errors as such, anything else with its trace."""
    if kind in _ERRORS:
        raise _ERRORS[kind](text)
    raise RuntimeError(f"the suite failed in the process running the cache: {kind}: {text}\n\n{trace}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "an unknown signal"
