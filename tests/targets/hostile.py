"""Caches that try to end, hang or fool the run instead of failing: ``kvverify verify`` must answer each with a
verdict naming the cause (tests/test_hostile_targets.py). Each misbehaves only once a layer holds more than
the two tokens per layer the probe writes, so the properties meet it; the ``factory_*`` ones misbehave at once."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import torch

from targets.plain_cache import PlainCache

_PROBE_TOKENS = 2  # tokens per layer the target's probe writes


class _Misbehaves(PlainCache):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.get_seq_length(layer_idx) + key_states.shape[-2] > _PROBE_TOKENS:
            self.misbehave()
        return super().update(key_states, value_states, layer_idx, cache_kwargs)

    def misbehave(self) -> None:
        raise NotImplementedError


class _Exits(_Misbehaves):
    def misbehave(self) -> None:
        sys.exit(0)


class _HardExits(_Misbehaves):
    def misbehave(self) -> None:
        os._exit(0)


class _Segfaults(_Misbehaves):
    def misbehave(self) -> None:
        import ctypes

        ctypes.string_at(0)


class _RetriesForever(_Misbehaves):
    def misbehave(self) -> None:
        print("retrying forever", flush=True)
        while True:  # a retry loop whose bare except swallows every interrupt
            try:  # noqa: SIM105
                time.sleep(0.05)
            except:  # noqa: E722 (the bare except is the point)
                pass


class _Interrupts(_Misbehaves):
    def misbehave(self) -> None:
        raise KeyboardInterrupt


def exit_in_update(config: Any) -> PlainCache:
    return _Exits()


def os_exit_in_update(config: Any) -> PlainCache:
    return _HardExits()


def segfault_in_update(config: Any) -> PlainCache:
    return _Segfaults()


def hang_in_update(config: Any) -> PlainCache:
    return _RetriesForever()


def keyboard_interrupt_in_update(config: Any) -> PlainCache:
    return _Interrupts()


def exit_in_factory(config: Any) -> PlainCache:
    sys.exit(0)


def os_exit_in_factory(config: Any) -> PlainCache:
    os._exit(3)


def thread_in_factory(config: Any) -> PlainCache:
    """A correct cache whose factory leaves a non-daemon thread running forever."""
    threading.Thread(target=time.sleep, args=(3600,), name="left-behind", daemon=False).start()
    return PlainCache()


class _StartsAGrandchildThenHangs(_RetriesForever):
    """Starts a process of its own (its pid written where ``KVVERIFY_TEST_PIDFILE`` says), then hangs."""

    def misbehave(self) -> None:
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["KVVERIFY_TEST_PIDFILE"], "w", encoding="utf-8") as pidfile:
            pidfile.write(str(child.pid))
        super().misbehave()


class _ExitsInReset(PlainCache):
    """Correct until ``reset()`` of a cache holding more than the probe's tokens: then it ends the process."""

    def reset(self) -> None:
        if self.get_seq_length() > _PROBE_TOKENS:
            os._exit(0)
        super().reset()


def grandchild_then_hang(config: Any) -> PlainCache:
    return _StartsAGrandchildThenHangs()


def os_exit_in_reset(config: Any) -> PlainCache:
    return _ExitsInReset()
