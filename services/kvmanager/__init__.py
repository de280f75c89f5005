"""kvmanager: the logical side of the paged KV cache (block tables, ref counts, copy-on-write,
the prefix-hash index), persisted in Redis and served over gRPC. It never touches tensors.

Modules, one job each:
  api.py            the BlockAllocator contract the executor codes against, and its errors
  hashing.py        the block hash chain (canonical encoding, pinned by test vectors)
  events.py         the change events the core records for whoever mirrors its state
  block_pool.py     one executor's blocks: ref counts, free queue, LRU cached queue, prefix index,
                    and its host-memory tier (spills on eviction, restores on a hit, its own LRU)
  load.py           an executor's load as routing counts it: its last report plus pending routes
  manager.py        the core: executors and epochs, tables, allocate/extend/commit/fork/release
  step.py           one Step call (commit, release, extend, admit, load) over the core: the only one
  fleet.py          executors' liveness (down after --executor-timeout) and WatchFleet's watchers
  router.py         the router: Route's policies (kv, least_loaded, round_robin) over the index
  stats.py          hit counts over windows, residency ages
  changes.py        the core's events folded into what the write-behind still has to write
  redis_records.py  the Redis key layout, record encodings and the RESP write batch
  persistence.py    write-behind to Redis (MULTI/EXEC batches) and restore on start
  metrics.py        /metrics (Prometheus) read from the core at scrape time
  wire.py           every message's one wire form and the error status codes, both ends
  fleet_service.py  the Fleet gRPC service (Route, RouteStream, WatchFleet; proto/fleet.proto)
  server.py         the grpc.aio server: KVManager and Fleet, health, reflection
  client.py         the gRPC BlockAllocator (Session stream for the hot calls)
  local.py          the in-process BlockAllocator (the same core, no network)
  cli.py            `pagemesh kvmanager` and `pagemesh kv stats`
"""
