"""How a service says "this will not get better by restarting me".

A permanent start-up error (a model that does not exist, an unsupported architecture, a port in
use) ends the process with EX_CONFIG (78, sysexits.h) after one line on stderr that says what is
wrong and what to do; `pagemesh up` does not retry a service that exits so, and repeats its line.
Any other exit is treated as transient and retried.
"""

from __future__ import annotations

import contextlib
import sys

EXIT_CONFIG = 78
PREFIX = "error: "


def config_error(message: object) -> int:
    """Prints the one line and returns the exit code for `main` to return."""
    print(f"{PREFIX}{message}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


def port_taken_message(service: str, host: str, port: int, option: str) -> str:
    return f"{service}: port {port} on {host} is in use by another program: stop it, or choose another port with {option}"


def quiet_interpreter_exit() -> None:
    """Drops what is written to stderr after the last atexit handler: Triton (loaded by torch
    even on the CPU) makes nanobind list every object it still holds at interpreter teardown,
    about 40 lines of "nanobind: leaked ..." on each executor stop that say nothing about us.
    Registered early, the handler runs after every handler registered later (atexit is LIFO);
    logging's handlers flush on every record, so no log line is lost."""
    import atexit
    import os

    def mute() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)

    atexit.register(mute)
