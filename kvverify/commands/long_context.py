"""``kvverify long-context [TARGET] [--length N] [--prompt N] [--seed N]``: one strict generation of N tokens
through the cache, compared bit for bit with the uncached logits of every step (one teacher-forced forward).

Exit 0 when the logits are identical, 1 when they differ (with the report: where the cache went wrong),
2 when the command is wrong or the target unusable.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from hypothesis import strategies as st

from kvverify.commands.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default="static",
                        help="MODULE:FACTORY or a built-in cache name (default: static)")
    parser.add_argument("--length", type=int, default=4096, help="tokens the cache ends holding (default: 4096)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens; the rest is generated (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default: 0)")
    parser.add_argument("--window", type=int, default=None, help="a sliding window (default: none)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    parser.add_argument("--time-limit", type=float, default=600.0, metavar="SECONDS",
                        help="seconds the run may take before the cache is reported as hanging (default: 600)")


def run(args: argparse.Namespace) -> int:
    from kvverify.checks import LONG_CONTEXT, TargetError, long_case, make_target, resolve_target
    from kvverify.runs import run_property

    try:
        case = long_case(args.length, prompt=args.prompt, seed=args.seed, sliding_window=args.window,
                         dtype=args.dtype)
        name = args.target
        target = make_target(resolve_target(name), name, time_limit=args.time_limit)
    except (ValueError, TargetError) as error:
        print(f"kvverify long-context: {error}", file=sys.stderr)
        return EXIT_USAGE
    prop = dataclasses.replace(LONG_CONTEXT, strategy=lambda _target: st.just(case))
    print(f"kvverify long-context: {name}, {args.length} tokens ({args.prompt} prompt), {args.dtype}, "
          f"seed {args.seed}", flush=True)
    started = time.perf_counter()
    result = run_property(prop, target, profile="dev", seed=args.seed, time_limit=args.time_limit)
    seconds = time.perf_counter() - started
    print(f"{result.verdict.upper()} in {seconds:.1f} s")
    if result.verdict != "passed":
        print(result.detail)
    return EXIT_OK if result.verdict == "passed" else EXIT_FAILED
