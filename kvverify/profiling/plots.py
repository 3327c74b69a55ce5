"""The report's figures, drawn with matplotlib (Agg) into PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from kvverify.profiling.results import CacheRow, Profile


def _figure(draw: Callable[[Any], None], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=100)
    draw(axes)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _series(rows: list[CacheRow], preset: str) -> dict[str, list[CacheRow]]:
    out: dict[str, list[CacheRow]] = {}
    for row in rows:
        if row.preset == preset:
            out.setdefault(row.cache, []).append(row)
    return {name: sorted(series, key=lambda r: r.length) for name, series in out.items()}


def time_per_token(profile: Profile, preset: str) -> bytes:
    def draw(a: Any) -> None:
        for name, series in _series(profile.rows, preset).items():
            lengths = [r.length for r in series]
            line = a.plot(lengths, [1e3 * (r.cached_step_s or 0) for r in series], marker="o", label=f"{name} cached")
            a.plot(
                lengths,
                [1e3 * (r.uncached_step_s or 0) for r in series],
                linestyle="--",
                marker="x",
                color=line[0].get_color(),
                label=f"{name} uncached",
            )
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("tokens in context")
        a.set_ylabel("ms per generated token")
        a.legend(fontsize=7, ncol=2)

    return _figure(draw, f"Decode time per token, cached vs uncached ({preset})")


def speedup(profile: Profile, preset: str) -> bytes:
    def draw(a: Any) -> None:
        for name, series in _series(profile.rows, preset).items():
            a.plot([r.length for r in series], [r.speedup or 0 for r in series], marker="o", label=name)
        a.set_xscale("log", base=2)
        a.set_xlabel("tokens in context")
        a.set_ylabel("uncached / cached time per token")
        a.legend(fontsize=8)

    return _figure(draw, f"Speedup of the cache ({preset})")


def memory(profile: Profile, preset: str) -> bytes:
    def draw(a: Any) -> None:
        for name, series in _series(profile.rows, preset).items():
            lengths = [r.length for r in series]
            line = a.plot(lengths, [r.held_bytes / 2**20 for r in series], marker="o", label=f"{name} held")
            a.plot(
                lengths,
                [r.formula_bytes / 2**20 for r in series],
                linestyle=":",
                color=line[0].get_color(),
                label=f"{name} formula",
            )
        any_rows = next(iter(_series(profile.rows, preset).values()), [])
        a.plot(
            [r.length for r in any_rows],
            [r.uncached_peak_estimate_bytes / 2**20 for r in any_rows],
            color="black",
            linestyle="-.",
            label="uncached step transient (estimate)",
        )
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("tokens in context")
        a.set_ylabel("MiB")
        a.legend(fontsize=7, ncol=2)

    return _figure(draw, f"Memory held by each cache vs the formula ({preset})")


def churn(profile: Profile, preset: str) -> bytes:
    def draw(a: Any) -> None:
        series = _series(profile.rows, preset)
        names = list(series)
        longest = [series[name][-1] for name in names]
        positions = range(len(names))
        a.bar(
            [p - 0.2 for p in positions],
            [max(r.churn_bytes, 0) / 2**20 for r in longest],
            0.4,
            label="allocated (churn)",
        )
        a.bar([p + 0.2 for p in positions], [r.held_bytes / 2**20 for r in longest], 0.4, label="held at the end")
        a.set_xticks(list(positions), names, rotation=20)
        a.set_yscale("log")
        a.set_ylabel(f"MiB over {longest[0].length if longest else 0} tokens")
        a.legend(fontsize=8)

    return _figure(draw, f"Allocation churn of cache updates over one generation ({preset})")


def bytes_per_token_saved(profile: Profile, preset: str) -> bytes:
    def draw(a: Any) -> None:
        for name, series in _series(profile.rows, preset).items():
            a.plot([r.length for r in series], [r.bytes_per_token_saved / 1024 for r in series], marker="o", label=name)
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("tokens in context")
        a.set_ylabel("KiB held per token not recomputed")
        a.legend(fontsize=8)

    return _figure(draw, f"Memory each cache spends per token saved ({preset})")


#: (file stem, caption, drawing function) of every figure, in report order.
FIGURES: tuple[tuple[str, str, Callable[[Profile, str], bytes]], ...] = (
    ("time_per_token", "Time per generated token vs length, cached (solid) and uncached (dashed)", time_per_token),
    ("speedup", "Speedup of caching vs length", speedup),
    ("memory", "Bytes held vs length, measured (solid) and the formula (dotted)", memory),
    ("churn", "Bytes allocated by cache updates over one generation vs bytes held", churn),
    ("bytes_per_token_saved", "Bytes held per token whose recomputation is saved", bytes_per_token_saved),
)
