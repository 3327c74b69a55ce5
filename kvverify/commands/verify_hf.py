"""``kvverify verify-hf``: transformers' own models, cached against uncached, for each of its cache classes.

The work is :func:`kvverify.adapters.hf.verify.verify_model`; this command parses the names, runs it for each
model and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from rich.table import Table

from kvverify.adapters import INSTALL_HINT, transformers_version
from kvverify.adapters.hf.caches import CACHES
from kvverify.adapters.hf.models import MODELS, WINDOW
from kvverify.adapters.hf.verify import BATCH, NEW_TOKENS, PROMPT_LEN, Row, verify_model
from kvverify.checks import DeviceError, describe_device, resolve_device
from kvverify.commands.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from kvverify.runs import print_table, table


def format_table(rows: list[Row]) -> Table:
    """One row per (model, cache) pair: the largest logit difference, the tolerance, the tokens, the verdict."""
    pairs = table("model", "cache", "max |Δ|", "tol", "tokens", "verdict")
    for row in rows:
        c = row.comparison
        if c is None:
            verdict = f"FAIL: {row.reason}" if row.error else f"n/a: {row.reason}"
            pairs.add_row(row.model, row.cache, "-", "-", "-", verdict)
        else:
            pairs.add_row(row.model, row.cache, f"{c.max_error:.2g}", f"{c.atol:g}", c.tokens, row.verdict)
    return pairs


def _names(value: str, valid: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or repr(value)}; valid {what}s: {', '.join(valid)}")
    return names


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--caches", default=",".join(CACHES), help=f"comma-separated, from: {', '.join(CACHES)}")
    parser.add_argument("--seed", type=int, default=0, help="draws the weights and the prompts (default 0)")
    parser.add_argument("--bitwise", action="store_true",
                        help="fixed-order CPU kernels and eager attention: exact caches must match bit for bit")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the models run (default: cpu)")


def run(args: argparse.Namespace) -> int:
    try:
        models = _names(args.models, tuple(MODELS), "model")
        caches = _names(args.caches, tuple(CACHES), "cache")
    except ValueError as error:
        print(f"kvverify verify-hf: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        device = resolve_device(args.device, option="--device")
    except DeviceError as error:
        print(f"kvverify verify-hf: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.bitwise and device.type != "cpu":
        print(f"kvverify verify-hf: --bitwise swaps the CPU's kernels for fixed-order ones and runs on the CPU "
              f"only; got --device {device}. Drop --bitwise, or use --device cpu.", file=sys.stderr)
        return EXIT_USAGE
    version = transformers_version()
    if version is None:
        print(f"kvverify verify-hf needs transformers: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_USAGE
    started = time.perf_counter()
    print(f"transformers {version}, torch {torch.__version__}, float32, batch {BATCH} "
          f"(one row left-padded), prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, sliding window {WINDOW}, "
          f"seed {args.seed}, device {describe_device(device)}"
          + (", batch-invariant kernels (bitwise)" if args.bitwise else ""))
    rows = [row for model in models for row in verify_model(model, caches, args.seed, args.bitwise, device)]
    print_table(format_table(rows))
    print("caches: " + "; ".join(f"{name} = {CACHES[name].what}" for name in caches))
    failed = [row for row in rows if row.verdict == "FAIL"]
    ran = sum(row.comparison is not None or row.error for row in rows)
    print(f"{ran} pairs compared, {len(failed)} failed, {len(rows) - ran} not applicable "
          f"in {time.perf_counter() - started:.1f} s")
    return EXIT_FAILED if failed else EXIT_OK
