"""gateway: the OpenAI-compatible HTTP API (aiohttp) in front of an executor. It validates,
applies the chat template, tokenizes, sends each request up its process's one Serve stream and
turns the step messages that come down into SSE chunks or one JSON body. It reaches the executor
and kvmanager over gRPC only, never by importing them.

Modules, one job each:
  app.py             routes, auth, limits and one request's lifecycle (read to answer or abort)
  validation.py      request bodies to typed requests, or a 400 naming the parameter
  beam.py            beam search parameters in the API (vLLM's extension) and their checks
  chat.py            prompts to token ids: the model's tokenizer and chat template
  turnstile.py       one request's ingest per event-loop iteration, so a burst's first
                     requests go up the Serve stream while the rest are tokenized
  executor_client.py the Serve stream to the executor: submit, abort, reconnect, batching
  request_stream.py  one request's outputs (RequestStream) and a step message's fan-out to them
  outputs.py         what a consumer reads per output: SequenceOutput or ColumnToken
  generation.py      one request's outputs to per-choice text deltas, stops, finish and usage
  detokenizer.py     token ids to text incrementally: whole UTF-8 characters, stop strings
  responses.py       OpenAI response objects (chat.completion(.chunk), text_completion)
  sse.py             server-sent events as OpenAI writes them
  errors.py          OpenAI-style error bodies (APIError)
  kvmanager_link.py  kvmanager's stats and health, read for /metrics and /health
  metrics.py         /metrics (Prometheus), kvmanager's pool and hit-rate figures included
  trace.py           --trace-requests: a JSON line of timings per request
  cli.py             `pagemesh gateway`
"""
