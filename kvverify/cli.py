"""The ``kvverify`` command line: one subcommand per module in :mod:`kvverify.commands`.

Each command module defines ``configure(parser)`` and ``run(args) -> int``, and :data:`COMMANDS` its one-line
help; the module is imported only when its command runs, so ``kvverify --help`` stays fast.
Exit codes: 0 everything held, 1 a property or contract failed, 2 usage error or unusable target.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("kvverify.commands.verify", "run the property suite against the built-in caches or MODULE:FACTORY"),
    "verify-hf": ("kvverify.commands.verify_hf", "compare cached and uncached generation of transformers' models"),
    "verify-libs": ("kvverify.commands.verify_libs", "run the suite against real libraries' caches: one table"),
    "verify-engine": ("kvverify.commands.verify_engine",
                      "run a serving engine's requests against each request alone, bit for bit"),
    "long-context": ("kvverify.commands.long_context", "one strict generation of thousands of tokens, bit for bit"),
    "mutants": ("kvverify.commands.mutants", "run the suite against the catalogue of buggy caches: a kill table"),
    "measure-tolerance": ("kvverify.commands.measure_tolerance",
                          "measure how far cached and uncached logits drift where a tolerance is used"),
    "profile": ("kvverify.commands.profile", "measure time and memory of every cache: report.html, .md, .json"),
}



def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvverify",
        description="Property-based correctness and profiling for LLM KV caches.",
        epilog="Exit codes: 0 everything held, 1 a property or the contract failed, 2 usage error or unusable target.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # configure only the command that runs: its module may import torch
            importlib.import_module(module_name).configure(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:  # argparse exits 2 on usage errors and 0 on --help
        return int(exit_.code or 0)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
