"""Security: loopback by default, API keys, tenant isolation by cache_salt, bounded request size,
and what Redis holds (one key prefix, no prompt text, no token ids, no salt)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import select
import socket
import struct
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from pagemesh.proto import kvmanager_pb2

from pagemesh.cli import build_parser
from tests.reliability.client import COMPLETED, chat_body, session, stream_request
from tests.reliability.workload import SYSTEM, chat_url, completions_url, wait_redis_synced
from tests.support.mesh import LOOPBACK, Mesh, http_get

pytestmark = pytest.mark.timeout(180)

KEY_PREFIX = b"pagemesh:kv:"  # kvmanager's default --redis-prefix


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _listening(pid: int) -> list[str]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return [f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN]


def test_internal_services_default_to_loopback(mesh: Mesh) -> None:
    # The mesh starts kvmanager and the executor without --host: these are their defaults.
    assert mesh.config.internal_host is None
    for name in ("kvmanager", "executor", "gateway"):
        sockets = _listening(mesh.services[name].pid)
        assert sockets, f"{name} listens on nothing"
        exposed = [s for s in sockets if not _is_loopback(s.rsplit(":", 1)[0])]
        assert not exposed, f"{name} listens beyond loopback: {exposed}"
    # And the documented defaults agree, for every service started by hand.
    parser = build_parser()
    for argv in (["kvmanager"], ["executor"], ["gateway"]):
        host = parser.parse_args(argv).host
        assert host in {"127.0.0.1", "localhost", "::1"}, f"`pagemesh {argv[0]}` binds {host}"


async def test_api_keys_enforced(mesh: Mesh) -> None:
    assert mesh.config.api_key
    before = mesh.pool()
    chat = chat_body("hi", 1, stream=False)
    completion = {"model": "smollm2", "prompt": "hi", "max_tokens": 1}
    bad_headers = [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {mesh.config.api_key}"},
        {"Authorization": f"Bearer {mesh.config.api_key}x"},
        {"Authorization": "Bearer "},
    ]
    async with session() as http:
        for headers in bad_headers:
            for method, path, body in (
                ("POST", "/v1/chat/completions", chat),
                ("POST", "/v1/completions", completion),
                ("GET", "/v1/models", None),
            ):
                async with http.request(method, mesh.url + path, json=body, headers=headers) as r:
                    payload = await r.json(content_type=None)
                    assert r.status == 401, f"{method} {path} with {headers}: {r.status}"
                    assert payload["error"]["code"] == "invalid_api_key"
        # Rejected requests did no work at all.
        after = mesh.pool()
        assert (after.free, after.in_use, after.cached) == (
            before.free,
            before.in_use,
            before.cached,
        )
        async with http.get(mesh.url + "/v1/models", headers=mesh.headers) as r:
            assert r.status == 200
        ok = await stream_request(
            http, chat_url(mesh), chat_body("hi", 1, stream=False), headers=mesh.headers
        )
        assert ok.outcome == COMPLETED, ok


def _tenant(stats: kvmanager_pb2.GetStatsResponse, tenant_id: str) -> dict[str, int]:
    for tenant in stats.tenants:
        if tenant.cache_salt_id == tenant_id:
            hits = [w.hits for w in tenant.windows if w.name == "since_start"] or [
                w.hits for w in tenant.windows
            ]
            return {"query_tokens": hits[0].query_tokens, "hit_tokens": hits[0].hit_tokens}
    return {"query_tokens": 0, "hit_tokens": 0}


def _global_hits(stats: kvmanager_pb2.GetStatsResponse) -> int:
    return sum(w.hits.hit_tokens for w in stats.windows if w.name == "since_start")


async def test_cache_salt_isolates_tenants(mesh: Mesh) -> None:
    from pagemesh.services.kvmanager.hashing import salt_id

    salt_a, salt_b = f"tenant-a-{uuid.uuid4().hex}", f"tenant-b-{uuid.uuid4().hex}"
    rng = random.Random(7)
    prompt = [rng.randrange(1000, 40000) for _ in range(70)]  # four full blocks and a bit

    def body(salt: str | None) -> dict:
        b = {
            "model": "smollm2",
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if salt is not None:
            b["cache_salt"] = salt
        return b

    async def run(salt: str | None) -> int:
        r = await stream_request(http, completions_url(mesh), body(salt), headers=mesh.headers)
        assert r.outcome == COMPLETED, r
        return r.cached_tokens

    async with session() as http:
        assert await run(salt_a) == 0
        assert await run(salt_a) >= 64, "tenant A does not even hit its own cache"
        mesh.wait_idle(30)
        stats_before = mesh.stats()
        # Tenant B (and the unsalted tenant) probe A's prompt: nothing is shared, nothing is
        # learnt: no cached tokens, no hit in B's stats nor in the global counters.
        assert await run(salt_b) == 0, "tenant B was served tenant A's blocks"
        assert await run(None) == 0, "an unsalted request was served tenant A's blocks"
        mesh.wait_idle(30)
        stats_after = mesh.stats()

    assert _tenant(stats_after, salt_id(salt_b))["hit_tokens"] == 0
    assert _global_hits(stats_after) == _global_hits(stats_before), (
        "a probe by another tenant moved the global hit counters"
    )
    stub = mesh.kv_stub()
    for salt, expected_hit in ((salt_a, True), (salt_b, True), ("", True), ("other", False)):
        reply = stub.Match(kvmanager_pb2.MatchRequest(token_ids=prompt, cache_salt=salt))
        cached = max((m.num_cached_tokens for m in reply.matches), default=0)
        # B and "" have now cached the prompt themselves; "other" has not.
        assert (cached > 0) == expected_hit, f"Match for salt {salt!r}: {cached}"

    # No salt leaks through any stats surface.
    surfaces = {
        "GetStats": stats_after.SerializeToString(),
        "pagemesh kv stats --json": subprocess.run(
            [
                sys.executable,
                "-P",
                "-m",
                "pagemesh.cli",
                "kv",
                "stats",
                "--address",
                mesh.kv_address,
                "--json",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout,
        "gateway /metrics": http_get(mesh.url + "/metrics", mesh.headers)[1],
    }
    for name, raw in surfaces.items():
        for salt in (salt_a, salt_b):
            assert salt.encode() not in raw, f"{name} shows a tenant's salt"


def _raw_http(port: int, head: bytes, body_chunks, timeout: float) -> tuple[int, int, float, bool]:
    """Send a request head, then body chunks until the server answers or stops reading.

    Returns (status or 0, body bytes sent, seconds, whether the server closed or reset the
    connection). A server that bounds the body answers 413 and/or closes long before the end;
    when it closes with our bytes unread, the kernel resets the connection and its 413 may be
    lost, so a reset counts as a refusal too (the bytes sent then show where it stopped)."""
    t0 = time.monotonic()
    sent = 0
    closed = False
    response = b""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.settimeout(2.0)
        for chunk in body_chunks:
            if time.monotonic() - t0 > timeout:
                break
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # an answer (or EOF) before the body ended
            try:
                sock.sendall(chunk)  # blocking: a chunk goes whole or the server stopped reading
                sent += len(chunk)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
        try:
            sock.settimeout(max(0.5, timeout - (time.monotonic() - t0)))
            while b"\r\n" not in response:
                piece = sock.recv(65536)
                if not piece:
                    closed = True
                    break
                response += piece
        except TimeoutError:
            pass
        except OSError:
            closed = True
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
    return status, sent, time.monotonic() - t0, closed


def _head(mesh: Mesh, extra: str) -> bytes:
    auth = mesh.headers.get("Authorization", "")
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
        f"Authorization: {auth}\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


async def test_request_size_bounded_before_work(mesh: Mesh) -> None:
    before = mesh.pool()
    port = mesh.gateway_port
    chunk = b"x" * 65536

    # A declared 256 MiB body: refused on the header, before a byte of it is read.
    status, sent, took, _ = await asyncio.to_thread(
        _raw_http, port, _head(mesh, f"Content-Length: {256 << 20}\r\n"), [chunk] * 4096, 10.0
    )
    assert status == 413, status
    assert took < 5.0 and sent < (16 << 20), f"413 after {sent} bytes in {took:.1f}s"

    # Chunked, no length: refused once the limit is crossed, not after the whole stream.
    def chunks():
        for _ in range(4096):  # 256 MiB at most
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)

    status, sent, took, closed = await asyncio.to_thread(
        _raw_http, port, _head(mesh, "Transfer-Encoding: chunked\r\n"), chunks(), 20.0
    )
    assert status == 413 or (status == 0 and closed), (status, closed)
    assert sent < (32 << 20), f"the gateway read {sent} bytes of an oversized chunked body"
    assert took < 20.0, "the gateway neither answered nor stopped reading"

    async with session() as http:
        # Under the byte limit but far over the context: a fast 400, no block touched.
        t0 = time.monotonic()
        huge = chat_body("train " * 300_000, 1, system=SYSTEM, stream=False)
        r = await stream_request(http, chat_url(mesh), huge, headers=mesh.headers, timeout=60)
        assert r.status in (400, 413) and r.error, r
        assert time.monotonic() - t0 < 30
        # Too many messages: refused on the count.
        many = {
            "model": "smollm2",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}] * 5000,
        }
        r = await stream_request(http, chat_url(mesh), many, headers=mesh.headers, timeout=30)
        assert r.status == 400 and r.error, r
    after = mesh.pool()
    assert (after.free, after.in_use, after.cached) == (before.free, before.in_use, before.cached)


def _redis_dump(mesh: Mesh) -> tuple[list[bytes], bytes]:
    """Every key of every database, and every byte of every value, concatenated."""
    client = mesh.redis_client()
    try:
        keys: list[bytes] = []
        blob = bytearray()
        dbs = [int(name[2:]) for name in client.info("keyspace")] or [0]
        for db in dbs:
            client.execute_command("SELECT", db)
            for key in client.scan_iter(count=1000):
                keys.append(key)
                kind = client.type(key)
                if kind == b"string":
                    blob += client.get(key) or b""
                elif kind == b"hash":
                    for f, v in client.hgetall(key).items():
                        blob += f + b"\0" + v + b"\0"
                elif kind == b"list":
                    blob += b"\0".join(client.lrange(key, 0, -1))
                elif kind == b"set":
                    blob += b"\0".join(client.smembers(key))
                elif kind == b"zset":
                    blob += b"\0".join(client.zrange(key, 0, -1))
                elif kind == b"stream":
                    blob += json.dumps(repr(client.xrange(key))).encode()
        return keys, bytes(blob)
    finally:
        client.close()


async def test_redis_keys_one_prefix_no_prompt_text(mesh: Mesh) -> None:
    secret = f"Quokka marmalade protocol {uuid.uuid4().hex[:8]} at Faversham"
    salt = f"salt-{uuid.uuid4().hex}"
    rng = random.Random(8)
    tokens = [rng.randrange(1000, 40000) for _ in range(40)]
    async with session() as http:
        r = await stream_request(
            http,
            chat_url(mesh),
            chat_body(f"{secret}. {secret}. {secret}.", 2, system=SYSTEM, cache_salt=salt),
            headers=mesh.headers,
        )
        assert r.outcome == COMPLETED, r
        body = {"model": "smollm2", "prompt": tokens, "max_tokens": 2, "stream": False}
        r = await stream_request(http, completions_url(mesh), body, headers=mesh.headers)
        assert r.outcome == COMPLETED, r
        # While the sequences are live too: block tables are in Redis then.
        body = chat_body(f"{secret}, again", 48, system=SYSTEM, ignore_eos=True)
        live = asyncio.create_task(stream_request(http, chat_url(mesh), body, headers=mesh.headers))
        await asyncio.sleep(1.0)
        live_keys, live_blob = await asyncio.to_thread(_redis_dump, mesh)
        await live
    mesh.wait_idle(30)
    await asyncio.to_thread(wait_redis_synced, mesh)
    keys, blob = await asyncio.to_thread(_redis_dump, mesh)
    keys += live_keys
    blob += live_blob

    assert keys
    stray = [k for k in keys if not k.startswith(KEY_PREFIX)]
    assert not stray, f"keys outside the {KEY_PREFIX!r} prefix: {stray[:10]}"
    for needle in (secret, "Quokka marmalade", salt, SYSTEM[:40], "Faversham"):
        assert needle.encode() not in blob and needle.encode() not in b"".join(keys), (
            f"Redis holds prompt text or a salt: {needle!r}"
        )
        assert needle.encode("utf-16-le") not in blob
    # Token ids are the prompt too: no run of 4 of them in any common encoding.
    window = tokens[10:14]
    encodings = [
        struct.pack("<4I", *window),
        struct.pack(">4I", *window),
        struct.pack("<4H", *window),
        ",".join(map(str, window)).encode(),
        ", ".join(map(str, window)).encode(),
        " ".join(map(str, window)).encode(),
    ]
    for enc in encodings:
        assert enc not in blob, f"Redis holds the prompt's token ids ({enc[:16]!r})"
