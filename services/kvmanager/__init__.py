"""kvmanager: the logical side of the paged KV cache (block tables, ref counts, copy-on-write,
the prefix-hash index), persisted in Redis and served over gRPC. It never touches tensors.

Modules, one job each:
  api.py          the BlockAllocator contract the executor codes against, and its errors
  hashing.py      the block hash chain (canonical encoding, pinned by test vectors)
  block_pool.py   one executor's blocks: ref counts, free queue, LRU cached queue, prefix index
  manager.py      the core: executors and epochs, tables, allocate/extend/commit/fork/release
  stats.py        hit counts over windows, residency ages
  persistence.py  write-behind to Redis (MULTI/EXEC batches) and restore on start
  metrics.py      /metrics (Prometheus) read from the core at scrape time
  server.py       the grpc.aio service, health, reflection
  client.py       the gRPC BlockAllocator (Session stream for the hot calls)
  local.py        the in-process BlockAllocator (the same core, no network)
  cli.py          `pagemesh kvmanager` and `pagemesh kv stats`
"""
