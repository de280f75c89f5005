"""`pagemesh gateway`: the OpenAI-compatible HTTP API in front of one executor, a static list of
them (`--executor`, repeatable), or kvmanager's whole fleet (`--kvmanager` without `--executor`:
the executors of every model, followed as they join and leave, each request routed by kvmanager's
prefix index and load)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pagemesh.services.gateway.tool_parsers import PARSERS
from pagemesh.services.gateway.validation import Limits

from pagemesh.env import add_option, env_default

DEFAULT_EXECUTOR = "127.0.0.1:50052"  # neither --executor nor --kvmanager: one executor here
# router.POLICIES, spelled here so that parsing the command line imports no gRPC (every
# `pagemesh` command builds this parser); tests/gateway/test_fleet.py checks they agree.
ROUTING_POLICIES = ("kv", "least_loaded", "round_robin")
# How long a worker that replaces a dead one may wait for a servable model before it listens
# (GatewayConfig.listen_when_ready_s): an executor restarting at the same time fits.
REPLACEMENT_READY_WAIT_S = 60.0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    add_option(p, "--host", "127.0.0.1", "address to bind (0.0.0.0 to serve other hosts)")
    add_option(p, "--port", 8000, "HTTP port", int)
    p.add_argument(
        "--executor",
        action="append",
        default=None,
        help="executor gRPC address, repeatable or comma-separated (env PAGEMESH_EXECUTOR): "
        "static mode, these executors only. None and a --kvmanager: fleet mode, every executor "
        f"registered with kvmanager. Neither: {DEFAULT_EXECUTOR}",
    )
    add_option(
        p,
        "--kvmanager",
        "",
        "kvmanager gRPC address: hit rates on /metrics; without --executor, the fleet to serve",
    )
    p.add_argument(
        "--routing-policy",
        choices=ROUTING_POLICIES,
        default=env_default("ROUTING_POLICY", "kv"),
        help="fleet mode: how kvmanager picks each request's executor: kv (cached prefix "
        "against load), least_loaded or round_robin (env PAGEMESH_ROUTING_POLICY, default 'kv')",
    )
    add_option(p, "--model-name", "", "model id clients send (default: the executor's model)")
    add_option(p, "--tokenizer", "", "tokenizer directory (default: the executor's model path)")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted API key, repeatable or comma-separated (env PAGEMESH_API_KEY, which"
        " unlike the command line is not visible to other users in `ps`); none: no"
        " authentication",
    )
    add_option(
        p,
        "--api-key-file",
        "",
        "file of accepted API keys, one per line ('#' comments), added to --api-key's",
    )
    add_option(p, "--max-body-bytes", 4 << 20, "largest accepted request body", int)
    add_option(p, "--max-concurrent", 1024, "generations in flight before 429s", int)
    add_option(p, "--max-n", 8, "largest accepted n (parallel samples)", int)
    add_option(p, "--max-stop", 4, "most stop strings per request", int)
    add_option(p, "--max-tokens-limit", 1 << 20, "largest accepted max_tokens", int)
    add_option(
        p,
        "--migration-limit",
        3,
        "times a request whose executor fails under it is sent on to another executor (or the "
        "same one, back), its stream unbroken; 0: never (the request fails)",
        int,
    )
    add_option(
        p,
        "--migration-wait",
        60.0,
        "seconds a migrating request waits for an executor of its model to take it",
        float,
    )
    add_option(p, "--log-level", "info", "debug, info, warning or error")
    add_option(p, "--trace-requests", "", "append a JSON line per request's timings here")
    add_option(
        p,
        "--tool-call-parser",
        "",
        "tool-call syntax parsed out of the model's text: hermes, llama3_json or mistral "
        "(default: the one the chat template teaches)",
    )
    add_option(
        p,
        "--workers",
        1,
        "gateway processes sharing the port (SO_REUSEPORT), each with its own Serve stream: "
        "detokenizing and writing SSE is per-token CPU work, so a busy GPU needs several",
        int,
    )
    # A worker's own flags (run_workers): share the port; a replacement listens once ready.
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--listen-when-ready", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _executors(args: argparse.Namespace) -> list[str]:
    """The --executor addresses; none given and no --kvmanager: the default one."""
    raw = args.executor or [env_default("EXECUTOR", "")]
    addresses = [a.strip() for item in raw for a in item.split(",") if a.strip()]
    if not addresses and not args.kvmanager:
        addresses = [DEFAULT_EXECUTOR]
    return addresses


class ApiKeyError(ValueError):
    """An --api-key-file that cannot be used; the message says what to do."""


def read_api_key_file(path: str) -> list[str]:
    """The keys of an API key file: one per line (or comma-separated), blank lines and '#'
    comments ignored. An unreadable or empty file is an error: starting without
    authentication because a secret did not mount would open the server to everyone."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise ApiKeyError(
            f"cannot read --api-key-file {path}: {exc.strerror or exc}: check the path"
        ) from None
    keys = [
        k.strip()
        for line in text.splitlines()
        if not line.lstrip().startswith("#")
        for k in line.split(",")
        if k.strip()
    ]
    if not keys:
        raise ApiKeyError(f"--api-key-file {path} holds no key: write one key per line")
    return keys


def _api_keys(args: argparse.Namespace) -> list[str]:
    """--api-key (else $PAGEMESH_API_KEY) and --api-key-file (or $PAGEMESH_API_KEY_FILE)."""
    raw = args.api_key or [env_default("API_KEY", "")]
    keys = [k.strip() for item in raw for k in item.split(",") if k.strip()]
    if args.api_key_file:
        keys += read_api_key_file(args.api_key_file)
    if args.api_key:
        logging.getLogger("pagemesh.gateway").warning(
            "an API key given with --api-key is visible to every user of this machine in `ps`:"
            " prefer PAGEMESH_API_KEY or --api-key-file"
        )
    return list(dict.fromkeys(keys))


def run_workers(args: argparse.Namespace) -> int:
    """Starts `args.workers` copies of this command on one port and keeps them running: a worker
    that dies is replaced while the others serve on (workers.py). Signals are passed on."""
    from pagemesh.services.gateway.workers import WorkerPool

    from pagemesh.children import set_pdeathsig

    argv = [
        sys.executable,
        "-P",
        "-m",
        "pagemesh.cli",
        *sys.argv[1:],
        "--workers",
        "1",
        "--reuse-port",
    ]
    pool = WorkerPool(
        argv,
        args.workers,
        preexec_fn=set_pdeathsig,
        replacement_args=["--listen-when-ready", str(REPLACEMENT_READY_WAIT_S)],
    )

    def forward(signum: int, _frame: object) -> None:
        pool.stop(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return pool.run()


def run(args: argparse.Namespace) -> int:
    from pagemesh.exits import config_error, port_taken_message
    from pagemesh.instance import port_in_use

    # A port in use is permanent (exits.py): one line, and a supervisor does not retry it.
    # Workers bind beside each other on purpose (SO_REUSEPORT): their parent checked for them.
    if not args.reuse_port and args.port and port_in_use(args.host, args.port):
        return config_error(port_taken_message("gateway", args.host, args.port, "--port"))
    try:
        keys = _api_keys(args)
    except ApiKeyError as exc:
        return config_error(exc)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.workers > 1:
        return run_workers(args)
    from aiohttp import web
    from pagemesh.services.gateway.app import GatewayConfig, create_app
    from pagemesh.services.gateway.migration import MigrationPolicy

    if args.tool_call_parser and args.tool_call_parser not in PARSERS:
        raise SystemExit(
            f"--tool-call-parser must be one of {', '.join(PARSERS)}, not {args.tool_call_parser!r}"
        )
    executors = _executors(args)
    config = GatewayConfig(
        executors=executors,
        kvmanager=args.kvmanager or None,
        model_name=args.model_name or None,
        tokenizer=args.tokenizer or None,
        routing_policy=args.routing_policy,
        api_keys=keys,
        max_body_bytes=args.max_body_bytes,
        max_concurrent=args.max_concurrent,
        limits=Limits(max_n=args.max_n, max_stop=args.max_stop, max_tokens=args.max_tokens_limit),
        trace_requests=args.trace_requests,
        migration=MigrationPolicy(limit=args.migration_limit, wait_s=args.migration_wait),
        tool_call_parser=args.tool_call_parser,
        listen_when_ready_s=args.listen_when_ready,
    )
    serving = (
        f"kvmanager {args.kvmanager}'s fleet, routing policy {args.routing_policy}"
        if config.fleet_mode
        else "executor " + ", ".join(executors)
    )
    logging.getLogger("pagemesh.gateway").info(
        "gateway on http://%s:%d (%s, auth %s)",
        args.host,
        args.port,
        serving,
        "on" if config.api_keys else "off",
    )
    # handler_cancellation: a client that disconnects cancels its handler, whose `finally`
    # aborts the request at the executor, even while it is still queued or in prefill.
    web.run_app(
        create_app(config),
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        reuse_port=args.reuse_port or None,
        access_log=None,
        print=None,
    )
    return 0
