"""Write a :class:`~kvverify.profiling.results.Profile` as report.html (self-contained), report.md and results.json."""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

import jinja2

from kvverify.profiling.folder import staged
from kvverify.profiling.plots import FIGURES
from kvverify.profiling.results import CacheRow, Profile
from kvverify.runs.tables import markdown_table

WITHOUT_CACHE_NOTE = (
    "The usual estimate puts the memory of generation without a cache at `2 * hidden_size * 1 * decoder_length` "
    "elements. "
    "No K/V survives between uncached steps, but each step recomputes the whole prefix: it materializes the "
    "activations of every prefix position in every layer and, in eager attention, a heads × t × t score matrix "
    "(and its softmax), so its transient peak grows with t² and passes the cache's bytes within a few hundred "
    "tokens (the dash-dotted line in the memory plot is that estimate, from "
    "`kvverify.profiling.analysis.uncached_peak_bytes`)."
)


def _mib(value: int | None) -> str:
    return "n/a" if value is None or value < 0 else f"{value / 2**20:.3f}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{1e3 * value:.3f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


ROW_HEADER = (
    "preset",
    "cache",
    "length",
    "cached ms/token",
    "uncached ms/token",
    "speedup",
    "held MiB",
    "formula MiB",
    "held/formula",
    "held/layout",
    "memray peak MiB",
    "churn MiB",
    "GFLOP/token cached",
    "GFLOP/token uncached",
)


def row_cells(row: CacheRow) -> list[str]:
    name = row.cache if row.window is None else f"{row.cache} (W={row.window})"
    return [
        row.preset,
        name,
        str(row.length),
        _ms(row.cached_step_s),
        _ms(row.uncached_step_s),
        _ratio(row.speedup),
        _mib(row.held_bytes),
        _mib(row.formula_bytes),
        _ratio(row.held_over_formula),
        _ratio(row.held_over_predicted),
        _mib(row.memray_peak_bytes),
        _mib(row.churn_bytes),
        f"{row.flops_cached / 1e9:.4f}",
        f"{row.flops_uncached / 1e9:.3f}",
    ]


RATIO_HEADER = (
    "engine",
    "loop",
    "reference cache",
    "transformers cache",
    "prompt",
    "new tokens",
    "rounds",
    "reference ms/token",
    "transformers ms/token",
    "reference / transformers",
)


_LOOPS = {"forward": "one greedy loop over both forwards", "generate": "each library's generate()"}


def ratio_cells(profile: Profile) -> list[list[str]]:
    return [
        [
            r.engine,
            _LOOPS[r.loop],
            r.reference_cache,
            r.transformers_cache,
            str(r.prompt),
            str(r.new_tokens),
            str(r.rounds),
            _ms(r.reference_s_per_token),
            _ms(r.transformers_s_per_token),
            _ratio(r.ratio),
        ]
        for r in profile.ratios
    ]


def _environment_lines(profile: Profile) -> list[str]:
    return [f"{key}: {value}" for key, value in profile.environment.items()]


def _presets(profile: Profile) -> list[str]:
    return list(dict.fromkeys(row.preset for row in profile.rows))


def render_figures(profile: Profile) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG) for every figure of every preset."""
    return [
        (f"{stem}_{preset}", f"{caption} ({preset})", draw(profile, preset))
        for preset in _presets(profile)
        for stem, caption, draw in FIGURES
    ]


def markdown(profile: Profile, figures: list[tuple[str, str, bytes]]) -> str:
    lines = ["# kvverify profile", "", *[f"- {line}" for line in _environment_lines(profile)], ""]
    lines += [f"Measured in {profile.seconds:.1f} s. Numerics: fast. Batch 1.", ""]
    lines += ["## Reference vs transformers, cached decode, alternating in one process", ""]
    lines += [*markdown_table(RATIO_HEADER, ratio_cells(profile)), ""]
    lines += ["## Every cache at every length", ""]
    lines += [*markdown_table(ROW_HEADER, [row_cells(row) for row in profile.rows]), ""]
    lines += [
        "held/formula: bytes the cache's tensors hold over `kvverify.profiling.analysis.kv_bytes` for the tokens "
        "it holds; held/layout: over the prediction for its layout (capacity for preallocated and paged "
        "caches). Churn: every byte memray saw allocated while the cache was built and took the tokens "
        "(its own updates, replayed without the model).",
        "",
    ]
    lines += ["## Without a cache", "", WITHOUT_CACHE_NOTE, ""]
    lines += [
        f"tracemalloc saw {profile.tracemalloc_bytes} bytes and memray {profile.memray_bytes} bytes while "
        "one 8 MiB torch tensor was allocated: torch's CPU allocations are invisible to tracemalloc.",
        "",
    ]
    if profile.cuda:
        lines += ["## CUDA", "", *[f"- {key}: {value}" for key, value in profile.cuda.items()], ""]
    if profile.skipped:
        lines += ["## Not measured", "", *[f"- {reason}" for reason in profile.skipped], ""]
    lines += ["## Figures", ""] + [f"![{caption}]({stem}.png)" for stem, caption, _ in figures] + [""]
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    """The report's templates (``kvverify/profiling/templates``), every value HTML-escaped."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("kvverify.profiling", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def html_page(profile: Profile, figures: list[tuple[str, str, bytes]]) -> str:
    """report.html: self-contained, the figures embedded as base64 PNGs."""
    return _templates().get_template("report.html.j2").render(
        profile=profile,
        environment=_environment_lines(profile),
        ratio_header=RATIO_HEADER,
        ratio_rows=ratio_cells(profile),
        row_header=ROW_HEADER,
        rows=[row_cells(row) for row in profile.rows],
        figures=[{"caption": caption, "base64": base64.b64encode(png).decode()} for _, caption, png in figures],
        without_cache_note=WITHOUT_CACHE_NOTE,
    )


#: The files of a report that do not depend on what was measured.
REPORT_FILES = ("report.html", "report.md", "results.json", "cuda_snapshot.pickle")


def is_report_file(name: str) -> bool:
    """Whether a file of this name is one a report writes (the fixed files, or a figure ``STEM_PRESET.png``)."""
    return name in REPORT_FILES or (name.endswith(".png") and any(name.startswith(f"{s}_") for s, _, _ in FIGURES))


def write_report(profile: Profile, out_dir: Path) -> list[Path]:
    """Write report.html, report.md (with its PNGs beside it) and results.json into ``out_dir``, all at once
    (see :mod:`kvverify.profiling.folder`): the earlier report's files there are replaced or removed (but the
    CUDA snapshot ``profile`` names), and nothing is written when rendering fails."""
    snapshot = str((profile.cuda or {}).get("snapshot", ""))
    with staged(out_dir, is_report_file, keep=[snapshot] if snapshot else []) as stage:
        names = [path.name for path in write_files(profile, stage)]
    return [out_dir / name for name in names]


def write_files(profile: Profile, out_dir: Path) -> list[Path]:
    """Write the report's files into ``out_dir`` as they are rendered (:func:`write_report` writes them all at
    once)."""
    figures = render_figures(profile)
    written = []
    for stem, _, png in figures:
        path = out_dir / f"{stem}.png"
        path.write_bytes(png)
        written.append(path)
    for name, text in (
        ("report.html", html_page(profile, figures)),
        ("report.md", markdown(profile, figures)),
        ("results.json", json.dumps(profile.as_dict(), indent=2, default=str)),
    ):
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
