"""The checked-in gRPC stubs are exactly what grpc_tools.protoc generates from proto/*.proto."""

from pathlib import Path

from pagemesh.proto.generate import PROTO_DIR, PROTOS, SUFFIXES, generate


def test_checked_in_stubs_match_generated(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in PROTOS:
        stem = name.removesuffix(".proto")
        for suffix in SUFFIXES:
            fresh = (tmp_path / f"{stem}{suffix}").read_text()
            checked_in = (PROTO_DIR / f"{stem}{suffix}").read_text()
            assert fresh == checked_in, (
                f"proto/{stem}{suffix} is stale: run python -P -m pagemesh.proto.generate"
            )
    # The gRPC modules import their messages through the installed package, never `proto`.
    for name in PROTOS:
        grpc_module = (PROTO_DIR / f"{name.removesuffix('.proto')}_pb2_grpc.py").read_text()
        assert "\nfrom pagemesh.proto import " in grpc_module
