"""``kvverify long-context [TARGET] [--length N] [--prompt N] [--seed N]``: one strict generation of N tokens
through the cache, compared bit for bit with the uncached logits of every step (one teacher-forced forward).

Exit 0 when the logits are identical, 1 when they differ (with the report: where the cache went wrong) or the
cache ended, crashed or hung the process running it, 2 when the command is wrong or the target unusable. The
target runs in a child process, as ``kvverify verify`` runs it (``--in-process``: in this one): the command
itself never imports it, so a target whose import ends the process is answered with exit 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

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
    parser.add_argument("--in-process", action="store_true",
                        help="run the target in this process instead of a child (a crash then ends the command)")


def run(args: argparse.Namespace) -> int:
    from kvverify.checks import TargetError, long_case
    from kvverify.runs import long_context_in_child, run_isolated

    try:
        case = long_case(args.length, prompt=args.prompt, seed=args.seed, sliding_window=args.window,
                         dtype=args.dtype)
    except ValueError as error:
        print(f"kvverify long-context: {error}", file=sys.stderr)
        return EXIT_USAGE
    name = args.target  # imported where it runs: in the child, unless --in-process
    print(f"kvverify long-context: {name}, {args.length} tokens ({args.prompt} prompt), {args.dtype}, "
          f"seed {args.seed}" + ("" if args.in_process else ", in a child process"), flush=True)
    started = time.perf_counter()
    work = functools.partial(long_context_in_child, name, case, args.seed, args.time_limit)
    try:
        if args.in_process:
            (result,) = work(properties=["long_context"]).results
        else:
            (result,) = run_isolated(work, target=name, properties=["long_context"],
                                     time_limit=args.time_limit).results
    except TargetError as error:
        print(f"kvverify long-context: {error}", file=sys.stderr)
        return EXIT_USAGE
    seconds = time.perf_counter() - started
    print(f"{result.verdict.upper()} in {seconds:.1f} s")
    if result.verdict != "passed":
        print(result.detail)
    return EXIT_OK if result.verdict == "passed" else EXIT_FAILED
