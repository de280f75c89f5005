"""executor: the model engine behind gRPC. It holds the weights and the physical KV pool, runs
the scheduler's continuous batches, and reaches kvmanager (the logical side of the pool) through
one link.

Modules, one job each (a step: engine -> scheduler -> model_runner -> scheduler.postprocess):
  engine_api.py      the public types (SamplingParams, SequenceOutput, ...) and the Protocols the
                     gRPC service codes against (EngineClient, EngineLoad), PackedIds
  engine.py          LLMEngine: requests and aborts, the step loop (schedule, launch, land)
  scheduler.py       the only writer of queues, rows and block tables: admission, chunking,
                     preemption, forks (n > 1 and beams), a step's postprocess, check()
  rows.py            rows of the device tables: take, free, reserve, unreserve
  allocator_link.py  every kvmanager call: batched Step calls (look-ahead Extends, commits,
                     releases and their retry), admissions, synchronous Extends, forks, register
  model_runner.py    the device side: KV pool, device tables, staging, CUDA graphs, batch
                     inputs, launch and collect, the memory-profiling run
  sequence.py        Request, Sequence, Fork, BeamState: the state the scheduler changes
  beam_engine.py     beam search in the engine's batches: rounds decided, beams forked
  beam_search.py     beam search scoring, HF-compatible (pure, host arrays)
  sampler.py         batched sampling on the device (penalties, top-k/p, min-p, logprobs)
  prompt_ids.py      prompt ids as the engine keeps them (list, packed bytes, range)
  validation.py      what add_request refuses, with a clear message
  config.py          EngineConfig
  kv_pool.py         the physical KV tensors and their sizing
  host_tier.py       the prefix cache's host-memory tier: kvmanager's spills and restores,
                     copied in its order (a side stream on CUDA) before the step that needs them
  cuda_graphs.py     decode and prefill CUDA graphs
  staging.py         pinned host memory for a step's copies
  prefix_caching.py  prefix caching off: an allocator wrapper that publishes nothing
  trace.py           per-step times and the --trace-steps JSON lines
  server.py          the grpc.aio Executor service around one engine
  cli.py             `pagemesh executor`
  model/             the model (Llama family), its loader and ops
"""
