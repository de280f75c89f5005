"""gateway: the OpenAI-compatible HTTP API (aiohttp) in front of executors: one, a static list
(`--executor`), or kvmanager's whole fleet (`--kvmanager` alone), serving one or several models.
It validates, applies the model's chat template, tokenizes, has each request routed to one
executor of its model (kvmanager's Fleet.RouteStream: its exact prefix index and load), sends it
up that executor's Serve stream (one per executor per process) and turns the step messages that
come down into SSE chunks or one JSON body. It reaches the executors and kvmanager over gRPC only,
never by importing them.

Modules, one job each:
  app.py             routes, auth, limits and one request's lifecycle (read to answer or abort)
  served_models.py   the served models and their member executors: 404/503 per model, each
                     model's tokenizer and limits, members admitted (GetInfo, tokenizer, stream)
  fleet.py           which executors exist: the static --executor list, or Fleet.WatchFleet
                     followed (snapshots mirrored, reconnect with backoff)
  router.py          each request's executor: kvmanager's decision, or the fewest in flight
                     locally (static mode, or while kvmanager does not answer)
  route_stream.py    the routing calls as messages on one Fleet.RouteStream (about half a
                     unary Route's cost; unary Route with a kvmanager that lacks it)
  validation.py      request bodies to typed requests, or a 400 naming the parameter
  beam.py            beam search parameters in the API (vLLM's extension) and their checks
  chat.py            prompts to token ids: the model's tokenizer and chat template
  turnstile.py       one request's ingest per event-loop iteration, so a burst's first
                     requests go up the Serve stream while the rest are tokenized
  executor_client.py the Serve stream to one executor: submit, abort, reconnect, batching
  migration.py       a request whose executor fails under it sent on as its continuation
  request_stream.py  one request's outputs (RequestStream) and a step message's fan-out to them
  outputs.py         what a consumer reads per output: SequenceOutput or ColumnToken
  generation.py      one request's outputs to per-choice text deltas, stops, finish and usage
  detokenizer.py     token ids to text incrementally: whole UTF-8 characters, stop strings
  responses.py       OpenAI response objects (chat.completion(.chunk), text_completion)
  sse.py             server-sent events as OpenAI writes them
  errors.py          OpenAI-style error bodies (APIError) and what a client may read
  kvmanager_link.py  kvmanager's stats and health, read for /metrics and /health
  metrics.py         /metrics (Prometheus): requests routed per executor and reason, and
                     kvmanager's pool and hit-rate figures
  trace.py           --trace-requests: a JSON line of timings (and executor, reason) per request
  cli.py             `pagemesh gateway`
"""
