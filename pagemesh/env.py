"""Command-line options that can also come from the environment (PAGEMESH_*)."""

from __future__ import annotations

import argparse
import os
from typing import Any


def env_default(name: str, default: Any, cast: type = str) -> Any:
    """The value of $PAGEMESH_<NAME> cast to `cast`, else `default`."""
    raw = os.environ.get(f"PAGEMESH_{name}")
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    return cast(raw)


def add_option(
    parser: argparse.ArgumentParser, flag: str, default: Any, help: str, cast: type = str
) -> None:
    """Adds `--flag` whose default comes from $PAGEMESH_FLAG (dashes become underscores)."""
    env_name = flag.lstrip("-").replace("-", "_").upper()
    if cast is bool:
        parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=env_default(env_name, default, bool),
            help=f"{help} (env PAGEMESH_{env_name})",
        )
        return
    parser.add_argument(
        flag,
        type=cast,
        default=env_default(env_name, default, cast),
        help=f"{help} (env PAGEMESH_{env_name}, default {default!r})",
    )
