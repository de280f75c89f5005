"""Regenerates the checked-in stubs: `python -m proto.generate`.

The stubs are generated with `-I <repo root>` so that the gRPC modules import their messages as
`from proto import kvmanager_pb2`. tests/test_proto_stubs.py fails when the checked-in files
differ from what this produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
PROTOS = sorted(p.name for p in PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency; imported here so serving does not need it

    include = Path(protoc.__file__).resolve().parent / "_proto"
    for name in PROTOS:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"proto/{name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {name}")


if __name__ == "__main__":
    generate(ROOT)
    sys.exit(0)
