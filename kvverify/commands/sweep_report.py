"""``kvverify profile --preset NAME``: run a preset's sweep (:mod:`kvverify.profiling.sweep`) and write
sweep.json and sweep.md into ``--out``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kvverify.profiling.presets import PresetError, sweep_for
from kvverify.profiling.sweep import SweepReport, run_sweep
from kvverify.runs import markdown_table

EXIT_OK, EXIT_USAGE = 0, 2


def run_preset(args: argparse.Namespace, device: torch.device) -> int:
    try:
        sweep = sweep_for(args.preset, device, quick=args.quick)
    except PresetError as error:
        print(f"kvverify profile: {error}", file=sys.stderr)
        return EXIT_USAGE
    report = run_sweep(sweep, args.engine, lambda what: print(what, file=sys.stderr, flush=True),
                       transformers=not args.no_transformers)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(report.as_dict(), indent=2), encoding="utf-8")
    (out / "sweep.md").write_text("\n".join(markdown(report)) + "\n", encoding="utf-8")
    print("\n".join(markdown(report)))
    print(f"wrote sweep.json and sweep.md to {out} in {report.seconds:.1f} s")
    return EXIT_OK


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def markdown(report: SweepReport) -> list[str]:
    """The sweep as markdown: the device, the decode table, the uncached path, batch 1 against transformers."""
    floor = report.weight_floor_s
    lines = [
        f"# Preset {report.preset}, {report.engine} engine, on {report.device}",
        "",
        f"capacity {_gib(report.capacity_bytes)} GiB, free with the weights loaded {_gib(report.free_bytes)} GiB; "
        f"weights read per token {_gib(report.weight_bytes)} GiB; read bandwidth (copy) "
        f"{report.read_bandwidth_bytes_s / 1e9:.0f} GB/s, so a weight-read floor of {1e3 * floor:.3f} ms/token; "
        f"attention outweighs the rest of an uncached forward from {report.quadratic_from} tokens",
        "",
    ]
    rows = [[str(r.batch), str(r.context), "yes" if r.fits else "no (cache > free memory)",
             "-" if r.step_s is None else f"{1e3 * r.step_s:.3f}",
             "-" if r.step_s is None else f"{r.step_s / floor:.2f}",
             _gib(r.kv_formula_bytes),
             "-" if r.kv_held_bytes is None else f"{r.kv_held_bytes / r.kv_formula_bytes:.3f}"]
            for r in report.decode]
    lines += [*markdown_table(("batch", "context", "fits", "ms/step", "x weight floor", "KV GiB (formula)",
                      "held / formula"), rows), ""]
    uncached = [[str(r.context), f"{1e3 * r.uncached_s:.2f}", f"{1e6 * r.per_token_s:.2f}", f"{r.attention_share:.2f}"]
                for r in report.uncached]
    header = ("context", "uncached forward ms", "µs per token", "attention share of FLOPs")
    lines += [*markdown_table(header, uncached), ""]
    batch_1 = [[name, f"{1e3 * s:.3f}", f"{s / floor:.2f}"] for name, s in report.batch_1.items()]
    lines += [*markdown_table(("batch 1, prompt 512, greedy loop", "ms/token", "x weight floor"), batch_1)]
    return lines
