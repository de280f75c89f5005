"""Redis for tests: a testcontainers container when a Docker engine answers, else a local
redis-server process on a free port. Never a mock."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pagemesh.redis_process import RedisProcess


def docker_engine_answers() -> bool:
    try:
        import docker  # type: ignore[import-not-found]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """A Redis URL for a fresh server, for tests that need no control over the process."""
    if docker_engine_answers():
        try:
            from testcontainers.redis import RedisContainer  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            with RedisContainer("redis:7-alpine") as container:
                host = container.get_container_host_ip()
                port = container.get_exposed_port(6379)
                yield f"redis://{host}:{port}/0"
                return
    proc = RedisProcess().start()
    try:
        yield proc.url
    finally:
        proc.cleanup()
