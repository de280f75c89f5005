"""EngineConfig: everything the engine needs to know that is not in the model's own config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# CPU pools are small: 4096 blocks x 16 tokens = 64k tokens (SmolLM2-135M: ~0.75 GiB in float32).
DEFAULT_CPU_NUM_BLOCKS = 4096


@dataclass(slots=True)
class EngineConfig:
    model: str  # HF directory, hub id or GGUF file (resolved by model.loader.resolve_model)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    block_size: int = 16
    # KV pool size. None: profiled on CUDA (gpu_memory_utilization), DEFAULT_CPU_NUM_BLOCKS on CPU.
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    # The host-memory tier of the prefix cache (host_tier.py): blocks, or GiB of host memory
    # (pinned on CUDA) when host_kv_blocks is 0. Both 0: no tier, evicted blocks are dropped.
    host_kv_blocks: int = 0
    host_kv_gib: float = 0.0
    # CUDA: the device staging buffer spills and restores go through (MiB, at most what one
    # step can move; set aside from the GPU pool's budget). Smaller: a burst of spills waits
    # for its earlier pieces' copies to host.
    host_kv_staging_mib: int = 256
    max_num_seqs: int = 256  # sequences (choices) running at once
    max_num_batched_tokens: int = 8192  # per-step token budget (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True  # off: no block is published, every prompt runs cold
    # Tokens of table coverage reserved ahead of need, so the batched Extend issued while step t
    # computes has slack and step t+1 never waits on the allocator.
    num_lookahead_tokens: int = 8
    use_cuda_graphs: bool = True
    # Prefill and mixed steps replay graphs too, by token bucket (cuda_graphs.py); needs
    # use_cuda_graphs. Off: those steps launch their kernels eagerly (A/B).
    use_prefill_cuda_graphs: bool = True
    # Launch step t before landing step t-1, so the host's bookkeeping hides behind the device
    # (outputs come one step later). None: on for CUDA.
    async_scheduling: bool | None = None
    max_cuda_graph_batch_size: int = 256
    max_beam_width: int = 8
    max_n: int = 64  # parallel samples per request
    executor_id: str = "executor-0"
    # What the fleet knows this executor by (kvmanager's registry, routing): the gRPC address
    # gateways reach it on, and the model name requests ask for. Empty: not routed to.
    advertise: str = ""
    served_model_name: str = ""
    seed: int = 0  # the generator of unseeded requests
    # Seconds kvmanager may stay unreachable before the requests fail (retryably); until then
    # running sequences go on with the blocks they hold and the others wait (allocator_link.py).
    kvmanager_outage_timeout: float = 30.0
    # Structured output (grammar.py): the tokenizer its grammars are compiled for (empty: the
    # model's directory), and how long a guide may take to compile before its request is
    # refused (a pathological schema must not hold a request, or a step, hostage).
    tokenizer: str = ""
    grammar_compile_timeout_s: float = 10.0
    # Threads filling a step's token masks (xgrammar's C++ threads; 0: grammar.py's default).
    grammar_fill_threads: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode each)")
        if self.async_scheduling is None:
            self.async_scheduling = self.device.startswith("cuda")
        if self.kvmanager_outage_timeout < 0:
            raise ValueError("kvmanager_outage_timeout must be >= 0")
        if self.grammar_compile_timeout_s <= 0:
            raise ValueError("grammar_compile_timeout_s must be positive")
        if self.grammar_fill_threads < 0:
            raise ValueError("grammar_fill_threads must be >= 0")
        if self.num_lookahead_tokens < 0:
            raise ValueError("num_lookahead_tokens must be >= 0")
        if self.host_kv_blocks < 0 or self.host_kv_gib < 0:
            raise ValueError("host_kv_blocks and host_kv_gib must be >= 0")
        if self.host_kv_staging_mib <= 0:
            raise ValueError("host_kv_staging_mib must be positive")
        if self.host_kv_blocks and self.host_kv_gib:
            raise ValueError("give the host KV tier's size once: host_kv_blocks or host_kv_gib")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return {
            "float32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
        }[self.dtype]
