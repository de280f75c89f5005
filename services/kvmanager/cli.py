"""`pagemesh kvmanager` (the service) and `pagemesh kv stats` (prefix-cache figures for
operators). Every option of the service can also come from the environment (PAGEMESH_<OPTION>).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from typing import Any

from pagemesh.services.kvmanager.manager import SPILL_AHEAD_MIB, SPILL_AHEAD_WATERMARK

from pagemesh.env import add_option

DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("kvmanager", help="run the block allocator and prefix index")
    add_option(p, "--host", "127.0.0.1", "address to bind (0.0.0.0 to serve other hosts)")
    add_option(p, "--port", DEFAULT_PORT, "gRPC port", int)
    add_option(p, "--redis-url", "", "Redis URL for persistence (empty: state in memory only)")
    add_option(p, "--redis-prefix", "pagemesh:kv:", "prefix of every Redis key")
    add_option(p, "--metrics-port", 9051, "HTTP port of /metrics (0: off)", int)
    add_option(p, "--flush-interval-ms", 2.0, "write-behind period", float)
    add_option(
        p,
        "--executor-timeout",
        10.0,
        "seconds without a call after which an executor is down (routed around)",
        float,
    )
    add_option(
        p,
        "--spill-ahead-watermark",
        SPILL_AHEAD_WATERMARK,
        "host tier: fraction of an executor's GPU pool kept free or already copied to host"
        " memory, so that evictions move no bytes (0: spill only on eviction)",
        float,
    )
    add_option(
        p,
        "--spill-ahead-mib",
        SPILL_AHEAD_MIB,
        "host tier: MiB at most copied ahead of eviction per Step call (0: none)",
        float,
    )
    add_option(p, "--log-level", "info", "debug, info, warning or error")
    p.set_defaults(func=run_service)

    kv = subparsers.add_parser("kv", help="kvmanager tools")
    kv_sub = kv.add_subparsers(dest="kv_command", required=True)
    s = kv_sub.add_parser("stats", help="prefix-cache hit rates, pool and Redis state")
    add_option(s, "--address", DEFAULT_ADDRESS, "kvmanager gRPC address HOST:PORT")
    s.add_argument("--executor", default="", help="only this executor")
    s.add_argument("--json", action="store_true", help="print the GetStats reply as JSON")
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until interrupted",
    )
    s.set_defaults(func=run_stats)


# -- the service ----------------------------------------------------------------------------------
def run_service(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from pagemesh.services.kvmanager.server import start_server

    from pagemesh.exits import config_error, port_taken_message
    from pagemesh.heap import freeze_startup_heap
    from pagemesh.instance import port_in_use

    if args.port and port_in_use(args.host, args.port):  # permanent: not retried (exits.py)
        return config_error(port_taken_message("kvmanager", args.host, args.port, "--port"))

    if not 0.0 <= args.spill_ahead_watermark <= 1.0:
        return config_error(
            f"--spill-ahead-watermark must be in [0, 1], got {args.spill_ahead_watermark}"
        )
    if args.spill_ahead_mib < 0:
        return config_error(f"--spill-ahead-mib must be >= 0, got {args.spill_ahead_mib}")
    server = await start_server(
        host=args.host,
        port=args.port,
        redis_url=args.redis_url or None,
        metrics_port=args.metrics_port or None,
        redis_prefix=args.redis_prefix,
        flush_interval=args.flush_interval_ms / 1000,
        executor_timeout=args.executor_timeout,
        spill_ahead_watermark=args.spill_ahead_watermark,
        spill_ahead_mib=args.spill_ahead_mib,
    )
    freeze_startup_heap()
    # Printed for whoever started us (tests, `pagemesh up`): the port actually bound.
    print(f"kvmanager listening on {args.host}:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("pagemesh.kvmanager").info("shutting down (flushing to Redis)")
    await server.stop()
    return 0


# -- kv stats -------------------------------------------------------------------------------------
def run_stats(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_stats(args))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (`| head`): not an error. Point stdout at /dev/null so that the
        # interpreter's final flush does not raise again, as Python's docs advise.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def message_to_json(msg: Any) -> dict[str, Any]:
    """A message as JSON with numbers as numbers: protobuf's JSON mapping writes 64-bit integers
    as strings ("query_tokens": "161"), which scripts would have to convert. Field names as in
    the .proto, fields at their default value included (a 0 is a figure, not an absence)."""
    from google.protobuf.descriptor import FieldDescriptor

    def value(field: Any, v: Any) -> Any:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return message_to_json(v)
        if field.type == FieldDescriptor.TYPE_ENUM:
            enum = field.enum_type.values_by_number.get(v)
            return enum.name if enum is not None else v
        if field.type == FieldDescriptor.TYPE_BYTES:
            return v.hex()
        return v

    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        v = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            vf = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): value(vf, x) for k, x in v.items()}
        elif field.is_repeated:
            out[field.name] = [value(field, x) for x in v]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = value(field, v)
    return out


async def _stats(args: argparse.Namespace) -> int:
    import grpc
    from pagemesh.proto import kvmanager_pb2 as pb
    from pagemesh.proto import kvmanager_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = pb_grpc.KVManagerStub(channel)
        while True:
            try:
                r = await stub.GetStats(pb.GetStatsRequest(executor_id=args.executor), timeout=5)
            except grpc.aio.AioRpcError as e:
                print(_rpc_failure(args.address, e), file=sys.stderr, flush=True)
                if args.watch is None:
                    return 1
            else:
                if args.json:
                    d = message_to_json(r)
                    print(json.dumps(d, indent=None if args.watch else 2), flush=True)
                else:
                    if args.watch is not None:
                        print("\x1b[2J\x1b[H", end="")  # clear the screen
                    print(format_stats(r, args.address), flush=True)
            if args.watch is None:
                return 0
            await asyncio.sleep(args.watch)


def _rpc_failure(address: str, e: Any) -> str:
    """One line for an operator: no gRPC debug string (it carries addresses and internals)."""
    import grpc

    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return (
            f"error: no kvmanager answers at {address}: is pagemesh running? (another"
            " address: --address HOST:PORT)"
        )
    return f"error: kvmanager {address}: {e.code().name}: {e.details()}"


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first `left` columns (names) left-aligned, the
    rest (figures) right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _age(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}min"


def _since_start(windows: Any) -> Any:
    """The since-start HitStats of a reply's windows (None if absent)."""
    return next((w.hits for w in windows if w.name == "since_start"), None)


def format_fleet(r: Any) -> str:
    """One row per executor: where it is, what it serves, whether it is live, its load, its
    pool, its hit rate and the requests routed to it and why; then the fleet-wide hit rate."""
    rows = []
    for e in r.executors:
        hits = _since_start(e.windows)
        routed = sum(c.count for c in e.routed)
        why: dict[str, int] = {}
        for c in e.routed:
            why[c.reason] = why.get(c.reason, 0) + c.count
        x = e.load
        rows.append(
            [
                e.executor_id,
                e.address or "-",
                e.model or "-",
                str(e.epoch),
                "yes" if e.live else f"DOWN {e.seconds_since_seen:.0f}s",
                f"{x.running}/{x.waiting}/{x.queued_prompt_tokens}",
                f"{e.pool.in_use + e.pool.cached}/{e.pool.num_blocks}",
                _pct(hits.token_hit_rate) if hits is not None else "-",
                str(routed),
                ", ".join(f"{k} {n}" for k, n in sorted(why.items(), key=lambda kv: -kv[1])) or "-",
            ]
        )
    live = sum(1 for e in r.executors if e.live)
    total = _since_start(r.windows)
    routed_all = sum(c.count for e in r.executors for c in e.routed)
    line = f"fleet: {len(r.executors)} executor(s), {live} live, {routed_all} requests routed"
    if total is not None:
        line += (
            f"; prefix-cache hit rate {_pct(total.token_hit_rate)} of tokens,"
            f" {_pct(total.request_hit_rate)} of requests (since start)"
        )
    return "\n".join(
        [
            _table(
                [
                    "executor",
                    "address",
                    "model",
                    "epoch",
                    "live",
                    "run/wait/queued tok",
                    "blocks held",
                    "tok hit",
                    "routed",
                    "why",
                ],
                rows,
                left=3,
            ),
            line,
        ]
    )


def format_stats(r, address: str) -> str:
    """The GetStats reply as readable tables: the fleet first, then pools, hit rates, ages."""
    redis = "connected" if r.redis_connected else "NOT CONNECTED"
    out = [
        f"kvmanager {address}   up {r.uptime_seconds:.0f}s   redis: {redis},"
        f" {r.redis_pending_writes} pending writes   ({time.strftime('%H:%M:%S')})",
        "",
        format_fleet(r),
        "",
        _table(
            [
                "executor",
                "epoch",
                "blocks",
                "block size",
                "free",
                "in use",
                "cached",
                "evictions",
                "sequences",
            ],
            [
                [
                    e.executor_id,
                    str(e.epoch),
                    str(e.pool.num_blocks),
                    str(e.pool.block_size),
                    str(e.pool.free),
                    str(e.pool.in_use),
                    str(e.pool.cached),
                    str(e.pool.evictions),
                    str(e.pool.live_sequences),
                ]
                for e in r.executors
            ],
        ),
        "",
    ]
    rows = []
    groups = [("all", r.windows)]
    groups += [(f"executor {e.executor_id}", e.windows) for e in r.executors]
    groups += [(f"tenant {t.cache_salt_id or '(no salt)'}", t.windows) for t in r.tenants]
    for who, windows in groups:
        for w in windows:
            h = w.hits
            rows.append(
                [
                    who,
                    w.name,
                    str(h.query_requests),
                    _pct(h.request_hit_rate),
                    str(h.query_tokens),
                    str(h.hit_tokens),
                    _pct(h.token_hit_rate),
                ]
            )
    out.append(
        _table(
            ["prefix cache", "window", "requests", "req hit", "tokens", "hit tokens", "tok hit"],
            rows,
            left=2,
        )
    )
    res = []
    for e in r.executors:
        for what, x in (("at hit", e.age_at_hit), ("at eviction", e.age_at_eviction)):
            res.append(
                [
                    e.executor_id,
                    what,
                    str(x.count),
                    _age(x.mean_seconds),
                    _age(x.p50_seconds),
                    _age(x.p99_seconds),
                ]
            )
    tiered = [e for e in r.executors if e.tier.host_blocks]
    if tiered:
        rows = [
            [
                e.executor_id,
                str(e.tier.host_blocks),
                str(e.tier.host_free),
                str(e.tier.host_cached),
                str(e.tier.gpu_hit_tokens),
                str(e.tier.host_hit_tokens),
                str(e.tier.spills),
                str(e.tier.restores),
                str(e.tier.host_drops),
                _bytes(e.tier.bytes_spilled + e.tier.bytes_restored),
                f"{e.tier.spills_ahead}/{e.tier.evicted_ahead}",
            ]
            for e in tiered
        ]
        head = ["host tier", "blocks", "free", "cached", "gpu hit tok", "host hit tok"]
        head += ["spills", "restores", "dropped", "moved", "ahead/evicted"]
        out += ["", _table(head, rows, left=1)]
        for e in tiered:
            t = e.tier
            for what, x in (("at restore", t.age_at_restore), ("at drop", t.age_at_host_drop)):
                res.append(
                    [
                        e.executor_id,
                        f"host {what}",
                        str(x.count),
                        _age(x.mean_seconds),
                        _age(x.p50_seconds),
                        _age(x.p99_seconds),
                    ]
                )
    if res:
        out += ["", _table(["block age", "when", "count", "mean", "p50", "p99"], res, left=2)]
    return "\n".join(out)


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    x = n / 1024
    for unit in ("KiB", "MiB"):
        if x < 1024:
            return f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    """Only kvmanager's commands (`python -m pagemesh.services.kvmanager.cli ...`), without loading the
    other services' modules."""
    parser = argparse.ArgumentParser(prog="pagemesh")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
