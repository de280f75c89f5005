"""The checked-in gRPC stubs are exactly what grpc_tools.protoc generates from proto/*.proto."""

from pathlib import Path

from proto.generate import PROTOS, ROOT, generate


def test_checked_in_stubs_match_generated(tmp_path: Path) -> None:
    (tmp_path / "proto").mkdir()
    generate(tmp_path)
    for name in PROTOS:
        stem = name.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            fresh = (tmp_path / "proto" / f"{stem}{suffix}").read_text()
            checked_in = (ROOT / "proto" / f"{stem}{suffix}").read_text()
            assert fresh == checked_in, (
                f"proto/{stem}{suffix} is stale: run python -m proto.generate"
            )
