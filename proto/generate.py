"""Regenerates the checked-in stubs: `python -P -m pagemesh.proto.generate`.

protoc names a generated module's imports after the .proto file's path under its include root,
so the .proto files are staged as `pagemesh/proto/*.proto` in a scratch folder and compiled with
that folder as the root: the gRPC modules then import their messages as
`from pagemesh.proto import kvmanager_pb2`, the installed name. The wire package (`pagemesh.v1`)
and the service names come from the .proto files and do not depend on where they are staged.
tests/test_proto_stubs.py fails when the checked-in files differ from what this produces.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
PACKAGE_PATH = Path("pagemesh", "proto")  # where the stubs live in the installed package
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Writes `<stem>_pb2.py`, `<stem>_pb2.pyi` and `<stem>_pb2_grpc.py` of every .proto file
    into `out_dir`."""
    from grpc_tools import protoc  # dev dependency; imported here so serving does not need it

    include = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch, PACKAGE_PATH)
        staged.mkdir(parents=True)
        for name in PROTOS:
            shutil.copyfile(PROTO_DIR / name, staged / name)
        for name in PROTOS:
            args = [
                "protoc",
                f"-I{scratch}",
                f"-I{include}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}",
                str(PACKAGE_PATH / name),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {name}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in PROTOS:
            stem = name.removesuffix(".proto")
            for suffix in SUFFIXES:
                shutil.copyfile(staged / f"{stem}{suffix}", out_dir / f"{stem}{suffix}")


if __name__ == "__main__":
    generate(PROTO_DIR)
    sys.exit(0)
