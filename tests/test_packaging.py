"""The distribution owns one import name, `pagemesh`: the fixed top-level folders (services/,
kernels/, proto/) install under it, so Hugging Face's `kernels` and proto-plus's `proto` keep
their names in an environment that has pagemesh too."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_pagemesh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-P", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("pagemesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pagemesh"}, top
    for module in (
        "pagemesh/services/executor/engine.py",
        "pagemesh/services/executor/model/llama.py",
        "pagemesh/services/gateway/sse.py",
        "pagemesh/services/kvmanager/block_pool.py",
        "pagemesh/kernels/decode_attention.py",
        "pagemesh/proto/kvmanager_pb2_grpc.py",
        "pagemesh/proto/kvmanager.proto",
    ):
        assert module in names, module
    # The license is an SPDX expression (PEP 639), not the deprecated table that drew
    # setuptools' warning on every install.
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()


# Run in a fresh interpreter from the checkout's root with -P (as the test command runs), so
# the folders there cannot be what an import finds.
_BESIDE = """
import kernels, proto, transformers
from pathlib import Path
assert hasattr(kernels, "get_kernel"), kernels.__file__           # Hugging Face's kernels
assert hasattr(proto, "Message"), proto.__file__                  # proto-plus
import pagemesh.kernels as pk
from pagemesh.proto import kvmanager_pb2_grpc
from pagemesh.services.executor.engine import LLMEngine
from transformers import LlamaConfig, LlamaForCausalLM
assert pk is not kernels and Path(pk.__file__).parent.name == "kernels"
LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
print(transformers.__version__)
"""


def test_hugging_face_kernels_and_proto_plus_keep_their_names() -> None:
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _BESIDE], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
