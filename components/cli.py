"""`m1`, the project's command line. Each group of commands registers itself from components/commands/;
bad input (M1Error) is printed as one line and exits 2, never as a traceback."""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import signal
import sys

from components.errors import M1Error

# Modules that expose register(subparsers); each adds its subcommands with a `func(args)` default.
COMMAND_MODULES = [
    "components.commands.model",
    "components.commands.data",
    "components.commands.train",
    "components.commands.grpo",
    "components.commands.evaluate",
    "components.commands.pipeline",
    "components.commands.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m1", description="Hybrid Mamba/attention reasoning-model pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default", help="config profile overlaying params.yaml")
    p.add_argument("--params", default=None, help="params file (default: the repo's params.yaml)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and hasattr(signal, "SIGUSR1"):  # the `m1` process itself, not a caller of main()
        # `kill -USR1 <pid>` prints every thread's stack to stderr and the run goes on: for a run that seems stuck
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        out = args.func(args)
    except M1Error as e:
        print(f"m1: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m1: interrupted", file=sys.stderr)
        return 130
    return int(out or 0)


if __name__ == "__main__":
    sys.exit(main())
