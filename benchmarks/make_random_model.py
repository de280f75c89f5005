"""Writes a random-weight ~1B Llama-architecture model directory (the benchmark model of issues 4
and 7: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192) with a real tokenizer, so
the whole mesh can serve it through the chat API.

    python benchmarks/make_random_model.py OUT_DIR --tokenizer TOKENIZER_DIR [--device cuda]

The vocabulary is the tokenizer's (SmolLM2's has 49152 entries, against the 32000 of
benchmarks/throughput.py's token-id-only model): every id the tokenizer emits must exist.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import transformers

ARCH = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def make(out: Path, tokenizer_dir: Path, device: str, seed: int = 0) -> Path:
    if (out / "config.json").exists():
        return out
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        **ARCH,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="bfloat16",
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for f in tokenizer_dir.glob("chat_template*"):
        shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(make(args.out, args.tokenizer, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
