"""One `pagemesh up` per data directory and per port set, checked before anything starts.

A second copy started beside a running one used to check the first copy's services, report
them healthy, and register its executor with the first copy's kvmanager under the same id. So
`pagemesh up` now, before it starts anything:
- takes an exclusive lock on its data directory (`up.lock`, flock: released by the kernel when
  the process dies, so a crash never leaves a stale lock behind), and
- binds each port it is about to give a service, the way that service will bind it.
Either failing is one line that names the running instance when it is a pagemesh one (every
running `pagemesh up` leaves a record of its ports under the cache directory's `instances/`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = "up.lock"


class InstanceConflict(RuntimeError):
    """Another program holds a port or the data directory we need; the message says which and
    what to do."""


def instances_dir() -> Path:
    """Where running instances leave their records (beside converted models and downloads)."""
    root = os.environ.get("PAGEMESH_CACHE_DIR") or str(Path.home() / ".cache" / "pagemesh")
    return Path(root).expanduser() / "instances"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe(record: dict[str, Any]) -> str:
    """'pagemesh up (pid 123, http://127.0.0.1:8000/v1, data dir /x)' from an instance record."""
    parts = [f"pid {record.get('pid', '?')}"]
    if record.get("url"):
        parts.append(f"{record['url']}/v1")
    if record.get("data_dir"):
        parts.append(f"data dir {record['data_dir']}")
    return f"pagemesh up ({', '.join(parts)})"


def running_instances() -> list[dict[str, Any]]:
    """The records of the `pagemesh up` processes alive now (stale ones are removed)."""
    found = []
    folder = instances_dir()
    for path in sorted(folder.glob("up-*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid):
            found.append(record)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return found


def port_in_use(host: str, port: int) -> bool:
    """True when `host:port` cannot be bound for listening. SO_REUSEADDR, as aiohttp, gRPC and
    redis-server set it, so a port held only by TIME_WAIT connections counts as free; no
    SO_REUSEPORT, so a listener of any program counts as in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def check_ports(ports: list[tuple[str, str, int, str]]) -> None:
    """Raises InstanceConflict for the first of `ports` (service, host, port, the option that
    sets it) that is taken, naming the pagemesh instance that holds it when there is one."""
    for service, host, port, option in ports:
        if not port or not port_in_use(host, port):
            continue
        others = [r for r in running_instances() if r.get("pid") != os.getpid()]
        holder = next((r for r in others if port in r.get("ports", {}).values()), None)
        who = describe(holder) if holder else "another program"
        raise InstanceConflict(
            f"port {port} ({service}, {host}) is in use by {who}: stop it, or choose another"
            f" port with {option}"
        )


@dataclass
class InstanceLock:
    """Held while `pagemesh up` runs: the data directory's lock and the instance record."""

    fd: int
    record_path: Path | None

    def release(self) -> None:
        if self.record_path is not None:
            with contextlib.suppress(OSError):
                self.record_path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)  # closing the descriptor drops the flock


def acquire(data_dir: Path, record: dict[str, Any]) -> InstanceLock:
    """Locks `data_dir` for this process and records `record` (pid, url, ports, data_dir) for
    the instances that come later; InstanceConflict when another `pagemesh up` holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    # O_CLOEXEC (Python's default): the services we start do not inherit the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        try:
            holder = json.loads(os.read(fd, 1 << 16) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = describe(holder) if holder else "another pagemesh up"
        raise InstanceConflict(
            f"{who} is already running on the data directory {data_dir}: stop it first, or"
            " start this one with its own --data-dir and ports"
        ) from None
    body = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, body, 0)
    record_path: Path | None = instances_dir() / f"up-{record['pid']}.json"
    assert record_path is not None
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_suffix(".tmp")
        tmp.write_bytes(body)
        tmp.replace(record_path)
    except OSError:  # the record only improves messages: run without it
        record_path = None
    return InstanceLock(fd, record_path)
