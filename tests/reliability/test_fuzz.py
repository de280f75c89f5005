"""Bad input, generated: the HTTP API fuzzed with hypothesis (random JSON bodies, wrong types,
odd sizes, raw bytes), the gRPC services fed malformed messages (random bytes, invalid field
values). Never a 5xx, never a crash, no change in block counts.

Every generated request is bounded: `max_tokens` is always present and either tiny or invalid,
so a body that happens to be valid costs a token or two, never a long generation.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagemesh.proto import executor_pb2, kvmanager_pb2, packed_ids

from tests.support.mesh import LOOPBACK, Mesh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

EXAMPLES = int(os.environ.get("PAGEMESH_FUZZ_EXAMPLES", "120"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # CI reproducible; run with a different seed locally to explore more
    suppress_health_check=list(HealthCheck),
    database=None,
)

# ----- JSON values -----

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
small_or_bad_count = st.sampled_from([1, 2]) | st.sampled_from(
    [0, -1, 2**31, 2**64, 1.5, "2", None, True, [], {}, float("nan")]
)
roles = st.sampled_from(["system", "user", "assistant", "developer", "tool", "robot", "", 7])
message = st.fixed_dictionaries(
    {"role": roles},
    optional={
        "content": st.text(max_size=120)
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}))
        | json_values,
        "name": json_values,
    },
)
messages = st.lists(message, max_size=4) | json_values
prompts = (
    st.text(max_size=200)
    | st.lists(st.integers(min_value=-5, max_value=2**33), max_size=40)
    | st.lists(st.text(max_size=20), max_size=3)
    | json_values
)
OPTIONAL_PARAMS = {
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | json_values,
    "top_p": st.floats(allow_nan=True, allow_infinity=True) | json_values,
    "top_k": st.integers(min_value=-(2**40), max_value=2**40) | json_values,
    "min_p": st.floats() | json_values,
    "n": small_or_bad_count,
    "stop": st.text(max_size=300) | st.lists(st.text(max_size=20), max_size=6) | json_values,
    "seed": st.integers(min_value=-(2**70), max_value=2**70) | json_values,
    "presence_penalty": st.floats() | json_values,
    "frequency_penalty": st.floats() | json_values,
    "logprobs": json_values,
    "top_logprobs": st.integers(min_value=-5, max_value=2**40) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values})
    | json_values,
    "cache_salt": st.text(max_size=64) | json_values,
    "ignore_eos": st.booleans() | json_values,
    "user": json_values,
    "echo": json_values,
    "max_completion_tokens": small_or_bad_count,
}
chat_bodies = st.fixed_dictionaries(
    {
        "model": st.just("smollm2") | json_values,
        "messages": messages,
        "max_tokens": small_or_bad_count,
    },
    optional={**OPTIONAL_PARAMS, "junk": json_values},
)


@st.composite
def mutated_chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with one or two fields replaced: most of the input space a real client
    reaches (and valid ones do run, a token or two each)."""
    body: dict[str, Any] = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": draw(st.text(max_size=60))}],
        "max_tokens": draw(st.sampled_from([1, 2])),
        "temperature": 0,
    }
    fields = {**OPTIONAL_PARAMS, "messages": messages, "model": json_values}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2)):
        body[name] = draw(fields[name])
    return body


completion_bodies = st.fixed_dictionaries(
    {
        "model": st.just("smollm2") | json_values,
        "prompt": prompts,
        "max_tokens": small_or_bad_count,
    },
    optional={**OPTIONAL_PARAMS, "junk": json_values},
)


def _post(
    mesh: Mesh, path: str, payload: bytes, content_type: str = "application/json"
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, mesh.gateway_port, timeout=60)
    try:
        headers = {"Content-Type": content_type, **mesh.headers}
        conn.request("POST", path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()  # reads a stream to its end too
    finally:
        conn.close()


def _encode(body: Any) -> bytes:
    # allow_nan: NaN/Infinity literals are not JSON, which is exactly what a fuzzer should send.
    return json.dumps(body, allow_nan=True).encode()


def _check_response(status: int, raw: bytes, what: str) -> None:
    assert status < 500, f"{status} for {what[:300]}: {raw[:300]!r}"
    if status >= 400:
        error = json.loads(raw)["error"]
        assert isinstance(error.get("message"), str) and error["message"], raw[:200]


def _pool_counts(mesh: Mesh) -> tuple[int, int, int, int]:
    pool = mesh.pool()
    return pool.free, pool.in_use, pool.cached, pool.live_sequences


def _assert_alive(mesh: Mesh, pids: dict[str, int]) -> None:
    assert mesh.pids() == pids, f"a service died: {pids} -> {mesh.pids()}\n{mesh.tails(30)}"


def test_http_fuzz_chat_and_completions(mesh: Mesh, figures) -> None:
    pids = mesh.pids()
    baseline = mesh.wait_idle(30)
    statuses: dict[int, int] = {}

    @FUZZ_SETTINGS
    @given(body=chat_bodies | mutated_chat_bodies())
    def chat(body: dict) -> None:
        status, raw = _post(mesh, "/v1/chat/completions", _encode(body))
        statuses[status] = statuses.get(status, 0) + 1
        _check_response(status, raw, repr(body))

    @FUZZ_SETTINGS
    @given(body=completion_bodies)
    def completions(body: dict) -> None:
        status, raw = _post(mesh, "/v1/completions", _encode(body))
        statuses[status] = statuses.get(status, 0) + 1
        _check_response(status, raw, repr(body))

    t0 = time.monotonic()
    chat()
    completions()
    _assert_alive(mesh, pids)
    pool = mesh.wait_idle(30, baseline.in_use)
    assert pool.in_use == baseline.in_use and pool.live_sequences == 0
    figures.record(
        "HTTP fuzz (JSON bodies)",
        examples=2 * EXAMPLES,
        statuses=statuses,
        seconds=round(time.monotonic() - t0, 1),
    )


def test_http_fuzz_raw_bytes(mesh: Mesh, figures) -> None:
    """Bodies that are not valid requests at all: nothing may be allocated or counted."""
    pids = mesh.pids()
    before = _pool_counts(mesh)
    queries_before = _queries(mesh)
    statuses: dict[int, int] = {}

    @FUZZ_SETTINGS
    @given(
        path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
        payload=st.binary(max_size=3000)
        | st.text(max_size=500).map(str.encode)
        | st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1, 100_000))
        | st.builds(lambda n: b'{"messages": ' * n, st.integers(1, 50_000)),
        content_type=st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded", "", "\u00e9"]
        ),
    )
    def raw(path: str, payload: bytes, content_type: str) -> None:
        try:
            body = json.loads(payload)
            if isinstance(body, dict):
                return  # possibly a valid request: not this test's business
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
        status, reply = _post(
            mesh, path, payload, content_type.encode("latin-1", "replace").decode("latin-1")
        )
        statuses[status] = statuses.get(status, 0) + 1
        _check_response(status, reply, repr(payload[:200]))
        assert status >= 400

    raw()
    _assert_alive(mesh, pids)
    assert _pool_counts(mesh) == before, "an invalid body changed the block counts"
    assert _queries(mesh) == queries_before, "an invalid body reached kvmanager"
    figures.record("HTTP fuzz (raw bytes)", examples=EXAMPLES, statuses=statuses)


def _queries(mesh: Mesh) -> int:
    return sum(w.hits.query_requests for w in mesh.stats().windows if w.name == "since_start")


# ----- gRPC -----

KV_METHODS = {
    name: (getattr(kvmanager_pb2, f"{name}Request"), "unary")
    for name in (
        "RegisterExecutor",
        "Allocate",
        "Extend",
        "Commit",
        "Fork",
        "Release",
        "Match",
        "GetStats",
    )
}
EXECUTOR_METHODS = {
    "Generate": (executor_pb2.GenerateRequest, "stream"),
    "Abort": (executor_pb2.AbortRequest, "unary"),
    "GetInfo": (executor_pb2.GetInfoRequest, "unary"),
}
# What a malformed request may get back. For well-formed messages with bad values, only these:
# UNKNOWN (an unhandled exception in a handler) is never fine there.
REJECTIONS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}


def _call_raw(
    channel: grpc.Channel, service: str, method: str, kind: str, payload: bytes
) -> tuple[grpc.StatusCode, list[bytes]]:
    path = f"/pagemesh.v1.{service}/{method}"
    try:
        if kind == "unary":
            reply = channel.unary_unary(path)(payload, timeout=20)
            return grpc.StatusCode.OK, [reply]
        replies = list(channel.unary_stream(path)(payload, timeout=20))
        return grpc.StatusCode.OK, replies
    except grpc.RpcError as exc:
        return exc.code(), []


def _parses(message_type: type, payload: bytes) -> bool:
    try:
        message_type.FromString(payload)
        return True
    except Exception:
        return False


def test_grpc_fuzz_random_bytes(mesh: Mesh, figures) -> None:
    pids = mesh.pids()
    before = _pool_counts(mesh)
    kv = mesh._channel("kvmanager")
    ex = mesh._channel("executor")
    codes: dict[str, int] = {}

    targets = [("KVManager", m, k, t, kv) for m, (t, k) in KV_METHODS.items()]
    targets += [("Executor", m, k, t, ex) for m, (t, k) in EXECUTOR_METHODS.items()]

    @FUZZ_SETTINGS
    @given(target=st.sampled_from(targets), payload=st.binary(max_size=512))
    def fuzz(target, payload: bytes) -> None:
        service, method, kind, message_type, channel = target
        parses = _parses(message_type, payload)
        if parses and method in ("RegisterExecutor", "Generate"):
            return  # a message that parses may be a valid registration or generation
        code, _ = _call_raw(channel, service, method, kind, payload)
        codes[code.name] = codes.get(code.name, 0) + 1
        # A payload that does not parse is INVALID_ARGUMENT like any bad input
        # (pagemesh/grpc_decode.py), not grpc.aio's UNKNOWN for a decode error.
        allowed = (
            REJECTIONS | {grpc.StatusCode.OK} if parses else {grpc.StatusCode.INVALID_ARGUMENT}
        )
        assert code in allowed, f"{service}.{method}({payload[:64]!r}) -> {code}"

    fuzz()
    _assert_alive(mesh, pids)
    assert _pool_counts(mesh) == before
    figures.record("gRPC fuzz (random bytes)", examples=EXAMPLES, codes=codes)


def _bad_kv_requests(mesh: Mesh) -> st.SearchStrategy:
    ex_id = mesh.executor_id
    epoch = mesh.executor_stats().epoch
    ids = st.sampled_from([ex_id, "", "nope", ex_id + "x", "\x00", "é" * 300])
    epochs = st.sampled_from([epoch + 1, epoch + 1000, 0, 2**64 - 1]) | st.integers(0, 2**64 - 1)
    seqs = st.text(max_size=40)
    tokens = st.lists(st.integers(0, 2**32 - 1), max_size=64)
    u32 = st.integers(0, 2**32 - 1)
    return st.one_of(
        st.builds(
            kvmanager_pb2.RegisterExecutorRequest,
            executor_id=st.sampled_from(["", ex_id]),
            num_blocks=st.sampled_from([0, 2**32 - 1, 1 << 25]),
            block_size=st.sampled_from([0, 2**32 - 1, 4097]),
            model_fingerprint=st.text(max_size=10),
        ).map(lambda r: ("RegisterExecutor", r)),
        st.builds(
            kvmanager_pb2.AllocateRequest,
            executor_id=ids,
            epoch=epochs,
            seq_id=seqs,
            # The packed prompt: whole u32 ids, or a byte count no id list has.
            token_data=tokens.map(packed_ids.pack) | st.binary(max_size=64),
            cache_salt=st.text(max_size=20),
            num_lookahead_tokens=u32,
        ).map(lambda r: ("Allocate", r)),
        st.builds(
            kvmanager_pb2.ExtendRequest,
            executor_id=ids,
            epoch=epochs,
            seq_ids=st.lists(seqs, max_size=4),
            num_computed_tokens=st.lists(u32, max_size=4),
            num_tokens=st.lists(u32, max_size=4),
        ).map(lambda r: ("Extend", r)),
        st.builds(
            kvmanager_pb2.CommitRequest,
            executor_id=ids,
            epoch=epochs,
            seq_ids=st.lists(seqs, max_size=3),
            block_indices=st.lists(u32, max_size=3),
            token_ids=tokens,
        ).map(lambda r: ("Commit", r)),
        st.builds(
            kvmanager_pb2.ForkRequest,
            executor_id=ids,
            epoch=epochs,
            parent_seq_id=seqs,
            child_seq_ids=st.lists(seqs, max_size=3),
            num_tokens=u32,
        ).map(lambda r: ("Fork", r)),
        st.builds(
            kvmanager_pb2.ReleaseRequest,
            executor_id=ids,
            epoch=epochs,
            seq_ids=st.lists(seqs, max_size=3),
        ).map(lambda r: ("Release", r)),
    )


def test_grpc_fuzz_invalid_fields(mesh: Mesh, figures) -> None:
    """Well-formed messages with invalid values: a rejection code each, nothing changes."""
    pids = mesh.pids()
    before = _pool_counts(mesh)
    stats_before = mesh.executor_stats()
    kv = mesh._channel("kvmanager")
    ex = mesh._channel("executor")
    info = mesh.executor_info()
    codes: dict[str, int] = {}

    @FUZZ_SETTINGS
    @given(call=_bad_kv_requests(mesh))
    def kv_fuzz(call) -> None:
        method, request = call
        code, _ = _call_raw(kv, "KVManager", method, "unary", request.SerializeToString())
        codes[f"kv.{code.name}"] = codes.get(f"kv.{code.name}", 0) + 1
        assert code in REJECTIONS, f"KVManager.{method}({request}) -> {code}"

    bad_params = st.builds(
        executor_pb2.SamplingParams,
        n=st.sampled_from([1, 2**32 - 1]),
        temperature=st.sampled_from([-1.0, math.nan, 0.0]),
        top_p=st.sampled_from([-0.5, 0.0, 2.0, math.nan, 1.0]),
        top_k=st.sampled_from([-5, 0, 2**31 - 1]),
        min_p=st.sampled_from([-1.0, 2.0, math.nan, 0.0]),
        repetition_penalty=st.sampled_from([-1.0, math.nan, math.inf, 1.0]),
        max_tokens=st.sampled_from([1, 2, 2**32 - 1]),
        logprobs=st.sampled_from([0, 2**32 - 1]),
        stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=3),
        use_beam_search=st.booleans(),
        beam_width=st.sampled_from([0, 2**32 - 1]),
    )
    bad_prompts = st.one_of(
        st.just([]),
        st.lists(st.integers(info.vocab_size, 2**32 - 1), min_size=1, max_size=8),
        st.just([1] * (info.max_model_len + 1)),
    )
    good_params = executor_pb2.SamplingParams(max_tokens=1, n=1, temperature=0, top_p=1)

    @FUZZ_SETTINGS
    @given(
        request=st.one_of(
            st.builds(
                executor_pb2.GenerateRequest,
                request_id=st.text(max_size=20),
                prompt_token_ids=bad_prompts,
                params=st.just(good_params) | bad_params,
            ),
            st.builds(
                executor_pb2.GenerateRequest,
                request_id=st.text(max_size=20),
                prompt_token_ids=st.just([1, 2, 3]),
                params=bad_params.filter(_invalid_params),
            ),
        )
    )
    def executor_fuzz(request: executor_pb2.GenerateRequest) -> None:
        code, replies = _call_raw(ex, "Executor", "Generate", "stream", request.SerializeToString())
        codes[f"executor.{code.name}"] = codes.get(f"executor.{code.name}", 0) + 1
        if code == grpc.StatusCode.OK:
            outputs = [o for r in replies for o in executor_pb2.StepOutput.FromString(r).outputs]
            refused = [o for o in outputs if o.rejected or o.error]
            assert refused, f"Generate accepted invalid input: {request} -> {outputs[:2]}"
        else:
            assert code in REJECTIONS, f"Executor.Generate({request}) -> {code}"

    kv_fuzz()
    executor_fuzz()
    _assert_alive(mesh, pids)
    after = mesh.executor_stats()
    assert after.epoch == stats_before.epoch, "a fuzzed RegisterExecutor changed the epoch"
    assert _pool_counts(mesh) == before, "a rejected request changed the block counts"
    figures.record("gRPC fuzz (invalid fields)", examples=2 * EXAMPLES, codes=codes)


def _invalid_params(p: executor_pb2.SamplingParams) -> bool:
    """True when at least one value is outside its domain, so the request must be refused.
    Proto3 zeros mean "unset" (n 0 = 1, top_p 0 = 1, repetition_penalty 0 = 1): those are valid."""

    def bad(x: float, lo: float, hi: float) -> bool:
        return not math.isfinite(x) or not lo <= x <= hi

    return (
        p.n > 1024
        or bad(p.temperature, 0, 1e6)
        or bad(p.top_p, 0, 1)
        or p.top_k < -1
        or bad(p.min_p, 0, 1)
        or bad(p.repetition_penalty, 0, 1e6)
        or p.logprobs > 1024
        or (p.use_beam_search and p.beam_width > 1024)
    )
