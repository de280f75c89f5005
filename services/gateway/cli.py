"""`pagemesh gateway`: the OpenAI-compatible HTTP API in front of one executor."""

from __future__ import annotations

import argparse
import logging

from pagemesh.env import add_option, env_default
from services.gateway.validation import Limits

DEFAULT_EXECUTOR = "127.0.0.1:50052"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    add_option(p, "--host", "127.0.0.1", "address to bind (0.0.0.0 to serve other hosts)")
    add_option(p, "--port", 8000, "HTTP port", int)
    add_option(p, "--executor", DEFAULT_EXECUTOR, "executor gRPC address")
    add_option(p, "--kvmanager", "", "kvmanager gRPC address, for hit rates on /metrics")
    add_option(p, "--model-name", "", "model id clients send (default: the executor's model)")
    add_option(p, "--tokenizer", "", "tokenizer directory (default: the executor's model path)")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted API key, repeatable or comma-separated (env PAGEMESH_API_KEY); "
        "none: no authentication",
    )
    add_option(p, "--max-body-bytes", 4 << 20, "largest accepted request body", int)
    add_option(p, "--max-concurrent", 1024, "generations in flight before 429s", int)
    add_option(p, "--max-n", 8, "largest accepted n (parallel samples)", int)
    add_option(p, "--max-stop", 4, "most stop strings per request", int)
    add_option(p, "--max-tokens-limit", 1 << 20, "largest accepted max_tokens", int)
    add_option(p, "--log-level", "info", "debug, info, warning or error")
    p.set_defaults(func=run)


def _api_keys(args: argparse.Namespace) -> list[str]:
    raw = args.api_key or [env_default("API_KEY", "")]
    return [k.strip() for item in raw for k in item.split(",") if k.strip()]


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from services.gateway.app import GatewayConfig, create_app

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = GatewayConfig(
        executor=args.executor,
        kvmanager=args.kvmanager or None,
        model_name=args.model_name or None,
        tokenizer=args.tokenizer or None,
        api_keys=_api_keys(args),
        max_body_bytes=args.max_body_bytes,
        max_concurrent=args.max_concurrent,
        limits=Limits(max_n=args.max_n, max_stop=args.max_stop, max_tokens=args.max_tokens_limit),
    )
    logging.getLogger("pagemesh.gateway").info(
        "gateway on http://%s:%d (executor %s, auth %s)",
        args.host,
        args.port,
        args.executor,
        "on" if config.api_keys else "off",
    )
    # handler_cancellation: a client that disconnects cancels its handler, whose `finally`
    # aborts the request at the executor, even while it is still queued or in prefill.
    web.run_app(
        create_app(config),
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        access_log=None,
        print=None,
    )
    return 0
