"""gRPC keepalive agreed between clients and servers (pagemesh/grpc_keepalive.py), over real
loopback gRPC: with a short keepalive, the executor's kvmanager channel (KVManagerClient's
options) stays connected to kvmanager's real server through many idle pings, while against a
server with gRPC's default ping policy (kvmanager's before) the same channel gets GOAWAY
"too_many_pings". Each side runs in a child process whose stderr (gRPC's log) is read whole."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.mesh import REPO_ROOT

KEEPALIVE_MS = 1000  # gRPC clients ping at most once a second
IDLE_S = 8.0  # pings the default policy answers with GOAWAY after three strikes

CLIENT = r"""
import asyncio, os, sys, time
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def main(mode: str, idle: float) -> None:
    from pagemesh.services.kvmanager.client import CHANNEL_OPTIONS
    if mode == "kvmanager":
        from pagemesh.services.kvmanager.server import start_server
        server = await start_server(port=0)
        port = server.port
    else:  # gRPC's default ping policy, as kvmanager's server had
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    stub = health_pb2_grpc.HealthStub(channel)
    await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    states = [channel.get_state().name]
    deadline = time.monotonic() + idle
    while (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(channel.wait_for_state_change(channel.get_state()), left)
        except asyncio.TimeoutError:
            break
        states.append(channel.get_state().name)
    await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    print("STATES", " ".join(states), flush=True)
    # gRPC's core logs to fd 2 unbuffered: the marker splits the idle window's log from the
    # shutdown's, whose "Cancelling all calls" GOAWAY the client may log as the server stops.
    os.write(2, b"\nIDLE_WINDOW_END\n")
    await channel.close()
    await server.stop(None)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


def _run(mode: str) -> tuple[list[str], str]:
    env = {
        **os.environ,
        "PAGEMESH_GRPC_KEEPALIVE_MS": str(KEEPALIVE_MS),
        "GRPC_VERBOSITY": "info",  # the GOAWAY line is logged at info or above
    }
    result = subprocess.run(
        [sys.executable, "-P", "-c", CLIENT, mode, str(IDLE_S)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("STATES"))
    idle_log, marker, _ = result.stderr.partition("IDLE_WINDOW_END")
    assert marker, result.stderr[-3000:]
    return line.split()[1:], idle_log


@pytest.mark.parametrize("mode", ["kvmanager", "default_policy"])
def test_keepalive_pings_are_accepted_by_kvmanager(mode: str) -> None:
    states, log = _run(mode)
    if mode == "kvmanager":
        assert "too_many_pings" not in log, log[-3000:]
        assert "GOAWAY" not in log.upper(), log[-3000:]
        assert states == ["READY"], states  # never dropped while idle
    else:  # the check can fail: the old server policy shows what the issue saw
        assert "too_many_pings" in log or states != ["READY"], (states, log[-3000:])
