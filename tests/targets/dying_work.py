"""Work for a child of :func:`kvverify.runs.run_isolated` that speaks as the suite does (``suite``, ``property``,
``result``) without running Hypothesis, and dies where it is told to: the child's death in a few seconds, for
tests/test_isolation.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvverify.checks.watchdog import tell
from kvverify.runs import PropertyResult, SuiteResult


def work(*, properties: list[str], die: tuple[str, ...] = (), how: str = "exit", marker: str = "",
         pidfile: str = "") -> SuiteResult:
    """Report every property passed, but die (``how``: ``exit``, ``kill``, ``hang``) where ``die`` says (any of):
    ``in:P`` during property P, ``after:P`` once P's verdict is sent, ``setup`` before the first property of
    any child but the first (``marker``: a file the first child creates). ``pidfile``: start a process of its
    own first; the child's pid and that process's are written there, ``CHILD GRANDCHILD``."""
    if pidfile:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(f"{pidfile}.tmp").write_text(f"{os.getpid()} {grandchild.pid}")
        Path(f"{pidfile}.tmp").replace(pidfile)  # whole when it appears
    tell("suite", "dying", 0, "dev", "cpu", "default", "CacheDeclaration()")
    if "setup" in die and marker:
        if Path(marker).exists():
            _die(how)
        Path(marker).touch()
    results = []
    for name in properties:
        tell("property", name)
        if f"in:{name}" in die:
            _die(how)
        result = PropertyResult(name, "passed", 3, 0.01)
        tell("result", result)
        results.append(result)
        if f"after:{name}" in die:
            _die(how)
    return SuiteResult("dying", 0, "dev", results)


def _die(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hang":
        tell("enter", 0.1, "one example of a hanging property", "the case that hung")
        while True:
            time.sleep(0.05)
    os._exit(3)
