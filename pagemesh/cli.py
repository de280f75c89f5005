"""The `pagemesh` command. Each service owns its subcommands: this module only gathers them.

pagemesh up           the whole mesh on one machine (pagemesh.up)
pagemesh kvmanager    the block allocator and prefix index (pagemesh.services.kvmanager.cli)
pagemesh kv stats     prefix-cache hit rates for operators (pagemesh.services.kvmanager.cli)
pagemesh executor     the model engine (pagemesh.services.executor.cli)
pagemesh gateway      the OpenAI-compatible HTTP API (pagemesh.services.gateway.cli)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing `add_commands(subparsers)`; each subcommand sets `func(args) -> int`.
COMMAND_MODULES = (
    "pagemesh.up",
    "pagemesh.services.kvmanager.cli",
    "pagemesh.services.executor.cli",
    "pagemesh.services.gateway.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagemesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
