from pagemesh.proto import fleet_pb2 as _fleet_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterExecutorRequest(_message.Message):
    __slots__ = ("executor_id", "num_blocks", "block_size", "model_fingerprint", "address", "model", "max_model_len", "num_host_blocks", "kv_block_bytes")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    num_blocks: int
    block_size: int
    model_fingerprint: str
    address: str
    model: str
    max_model_len: int
    num_host_blocks: int
    kv_block_bytes: int
    def __init__(self, executor_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., num_host_blocks: _Optional[int] = ..., kv_block_bytes: _Optional[int] = ...) -> None: ...

class RegisterExecutorResponse(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("executor_id", "epoch", "seq_id", "cache_salt", "num_lookahead_tokens", "token_data")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    NUM_LOOKAHEAD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DATA_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    epoch: int
    seq_id: str
    cache_salt: str
    num_lookahead_tokens: int
    token_data: bytes
    def __init__(self, executor_id: _Optional[str] = ..., epoch: _Optional[int] = ..., seq_id: _Optional[str] = ..., cache_salt: _Optional[str] = ..., num_lookahead_tokens: _Optional[int] = ..., token_data: _Optional[bytes] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("block_ids", "num_cached_tokens", "spill_src", "spill_dst", "restore_src", "restore_dst")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPILL_SRC_FIELD_NUMBER: _ClassVar[int]
    SPILL_DST_FIELD_NUMBER: _ClassVar[int]
    RESTORE_SRC_FIELD_NUMBER: _ClassVar[int]
    RESTORE_DST_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    spill_src: _containers.RepeatedScalarFieldContainer[int]
    spill_dst: _containers.RepeatedScalarFieldContainer[int]
    restore_src: _containers.RepeatedScalarFieldContainer[int]
    restore_dst: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ..., spill_src: _Optional[_Iterable[int]] = ..., spill_dst: _Optional[_Iterable[int]] = ..., restore_src: _Optional[_Iterable[int]] = ..., restore_dst: _Optional[_Iterable[int]] = ...) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("executor_id", "epoch", "seq_ids", "num_computed_tokens", "num_tokens")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    epoch: int
    seq_ids: _containers.RepeatedScalarFieldContainer[str]
    num_computed_tokens: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, executor_id: _Optional[str] = ..., epoch: _Optional[int] = ..., seq_ids: _Optional[_Iterable[str]] = ..., num_computed_tokens: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class SeqBlocks(_message.Message):
    __slots__ = ("seq_id", "first_index", "block_ids")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    first_index: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[str] = ..., first_index: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ExtendResponse(_message.Message):
    __slots__ = ("updated_seq_ids", "first_indices", "update_counts", "update_block_ids", "copy_src", "copy_dst", "spill_src", "spill_dst")
    UPDATED_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDICES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    COPY_SRC_FIELD_NUMBER: _ClassVar[int]
    COPY_DST_FIELD_NUMBER: _ClassVar[int]
    SPILL_SRC_FIELD_NUMBER: _ClassVar[int]
    SPILL_DST_FIELD_NUMBER: _ClassVar[int]
    updated_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    first_indices: _containers.RepeatedScalarFieldContainer[int]
    update_counts: _containers.RepeatedScalarFieldContainer[int]
    update_block_ids: _containers.RepeatedScalarFieldContainer[int]
    copy_src: _containers.RepeatedScalarFieldContainer[int]
    copy_dst: _containers.RepeatedScalarFieldContainer[int]
    spill_src: _containers.RepeatedScalarFieldContainer[int]
    spill_dst: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, updated_seq_ids: _Optional[_Iterable[str]] = ..., first_indices: _Optional[_Iterable[int]] = ..., update_counts: _Optional[_Iterable[int]] = ..., update_block_ids: _Optional[_Iterable[int]] = ..., copy_src: _Optional[_Iterable[int]] = ..., copy_dst: _Optional[_Iterable[int]] = ..., spill_src: _Optional[_Iterable[int]] = ..., spill_dst: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("executor_id", "epoch", "seq_ids", "block_indices", "token_ids")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDICES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    epoch: int
    seq_ids: _containers.RepeatedScalarFieldContainer[str]
    block_indices: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, executor_id: _Optional[str] = ..., epoch: _Optional[int] = ..., seq_ids: _Optional[_Iterable[str]] = ..., block_indices: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("num_published",)
    NUM_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    num_published: int
    def __init__(self, num_published: _Optional[int] = ...) -> None: ...

class ForkRequest(_message.Message):
    __slots__ = ("executor_id", "epoch", "parent_seq_id", "child_seq_ids", "num_tokens")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PARENT_SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    CHILD_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    epoch: int
    parent_seq_id: str
    child_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    num_tokens: int
    def __init__(self, executor_id: _Optional[str] = ..., epoch: _Optional[int] = ..., parent_seq_id: _Optional[str] = ..., child_seq_ids: _Optional[_Iterable[str]] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class ForkResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[SeqBlocks]
    def __init__(self, tables: _Optional[_Iterable[_Union[SeqBlocks, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("executor_id", "epoch", "seq_ids")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    epoch: int
    seq_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, executor_id: _Optional[str] = ..., epoch: _Optional[int] = ..., seq_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("num_released",)
    NUM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    num_released: int
    def __init__(self, num_released: _Optional[int] = ...) -> None: ...

class MatchRequest(_message.Message):
    __slots__ = ("token_ids", "cache_salt", "executor_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    executor_id: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., executor_id: _Optional[str] = ...) -> None: ...

class ExecutorMatch(_message.Message):
    __slots__ = ("executor_id", "num_cached_tokens")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    num_cached_tokens: int
    def __init__(self, executor_id: _Optional[str] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("matches",)
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[ExecutorMatch]
    def __init__(self, matches: _Optional[_Iterable[_Union[ExecutorMatch, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("executor_id",)
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    def __init__(self, executor_id: _Optional[str] = ...) -> None: ...

class HitStats(_message.Message):
    __slots__ = ("query_tokens", "hit_tokens", "query_requests", "hit_requests", "token_hit_rate", "request_hit_rate")
    QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUERY_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    HIT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    query_tokens: int
    hit_tokens: int
    query_requests: int
    hit_requests: int
    token_hit_rate: float
    request_hit_rate: float
    def __init__(self, query_tokens: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., query_requests: _Optional[int] = ..., hit_requests: _Optional[int] = ..., token_hit_rate: _Optional[float] = ..., request_hit_rate: _Optional[float] = ...) -> None: ...

class Residency(_message.Message):
    __slots__ = ("count", "mean_seconds", "p50_seconds", "p99_seconds")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    count: int
    mean_seconds: float
    p50_seconds: float
    p99_seconds: float
    def __init__(self, count: _Optional[int] = ..., mean_seconds: _Optional[float] = ..., p50_seconds: _Optional[float] = ..., p99_seconds: _Optional[float] = ...) -> None: ...

class PoolStats(_message.Message):
    __slots__ = ("num_blocks", "block_size", "free", "in_use", "cached", "evictions", "live_sequences")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    block_size: int
    free: int
    in_use: int
    cached: int
    evictions: int
    live_sequences: int
    def __init__(self, num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., free: _Optional[int] = ..., in_use: _Optional[int] = ..., cached: _Optional[int] = ..., evictions: _Optional[int] = ..., live_sequences: _Optional[int] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("host_blocks", "host_free", "host_cached", "gpu_hit_tokens", "host_hit_tokens", "spills", "restores", "host_drops", "bytes_spilled", "bytes_restored", "age_at_restore", "age_at_host_drop", "host_copies", "spills_ahead", "evicted_ahead")
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_FREE_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHED_FIELD_NUMBER: _ClassVar[int]
    GPU_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOST_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPILLS_FIELD_NUMBER: _ClassVar[int]
    RESTORES_FIELD_NUMBER: _ClassVar[int]
    HOST_DROPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SPILLED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RESTORED_FIELD_NUMBER: _ClassVar[int]
    AGE_AT_RESTORE_FIELD_NUMBER: _ClassVar[int]
    AGE_AT_HOST_DROP_FIELD_NUMBER: _ClassVar[int]
    HOST_COPIES_FIELD_NUMBER: _ClassVar[int]
    SPILLS_AHEAD_FIELD_NUMBER: _ClassVar[int]
    EVICTED_AHEAD_FIELD_NUMBER: _ClassVar[int]
    host_blocks: int
    host_free: int
    host_cached: int
    gpu_hit_tokens: int
    host_hit_tokens: int
    spills: int
    restores: int
    host_drops: int
    bytes_spilled: int
    bytes_restored: int
    age_at_restore: Residency
    age_at_host_drop: Residency
    host_copies: int
    spills_ahead: int
    evicted_ahead: int
    def __init__(self, host_blocks: _Optional[int] = ..., host_free: _Optional[int] = ..., host_cached: _Optional[int] = ..., gpu_hit_tokens: _Optional[int] = ..., host_hit_tokens: _Optional[int] = ..., spills: _Optional[int] = ..., restores: _Optional[int] = ..., host_drops: _Optional[int] = ..., bytes_spilled: _Optional[int] = ..., bytes_restored: _Optional[int] = ..., age_at_restore: _Optional[_Union[Residency, _Mapping]] = ..., age_at_host_drop: _Optional[_Union[Residency, _Mapping]] = ..., host_copies: _Optional[int] = ..., spills_ahead: _Optional[int] = ..., evicted_ahead: _Optional[int] = ...) -> None: ...

class WindowStats(_message.Message):
    __slots__ = ("name", "hits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    hits: HitStats
    def __init__(self, name: _Optional[str] = ..., hits: _Optional[_Union[HitStats, _Mapping]] = ...) -> None: ...

class ExecutorStats(_message.Message):
    __slots__ = ("executor_id", "epoch", "pool", "windows", "age_at_hit", "age_at_eviction", "address", "model", "max_model_len", "live", "seconds_since_seen", "load", "routed", "tier")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    AGE_AT_HIT_FIELD_NUMBER: _ClassVar[int]
    AGE_AT_EVICTION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    epoch: int
    pool: PoolStats
    windows: _containers.RepeatedCompositeFieldContainer[WindowStats]
    age_at_hit: Residency
    age_at_eviction: Residency
    address: str
    model: str
    max_model_len: int
    live: bool
    seconds_since_seen: float
    load: _fleet_pb2.ExecutorLoad
    routed: _containers.RepeatedCompositeFieldContainer[RouteCount]
    tier: TierStats
    def __init__(self, executor_id: _Optional[str] = ..., epoch: _Optional[int] = ..., pool: _Optional[_Union[PoolStats, _Mapping]] = ..., windows: _Optional[_Iterable[_Union[WindowStats, _Mapping]]] = ..., age_at_hit: _Optional[_Union[Residency, _Mapping]] = ..., age_at_eviction: _Optional[_Union[Residency, _Mapping]] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., live: _Optional[bool] = ..., seconds_since_seen: _Optional[float] = ..., load: _Optional[_Union[_fleet_pb2.ExecutorLoad, _Mapping]] = ..., routed: _Optional[_Iterable[_Union[RouteCount, _Mapping]]] = ..., tier: _Optional[_Union[TierStats, _Mapping]] = ...) -> None: ...

class RouteCount(_message.Message):
    __slots__ = ("policy", "reason", "count")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    policy: str
    reason: str
    count: int
    def __init__(self, policy: _Optional[str] = ..., reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class TenantStats(_message.Message):
    __slots__ = ("cache_salt_id", "windows")
    CACHE_SALT_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    cache_salt_id: str
    windows: _containers.RepeatedCompositeFieldContainer[WindowStats]
    def __init__(self, cache_salt_id: _Optional[str] = ..., windows: _Optional[_Iterable[_Union[WindowStats, _Mapping]]] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("executors", "windows", "tenants", "redis_connected", "redis_pending_writes", "uptime_seconds")
    EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    REDIS_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    REDIS_PENDING_WRITES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    executors: _containers.RepeatedCompositeFieldContainer[ExecutorStats]
    windows: _containers.RepeatedCompositeFieldContainer[WindowStats]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantStats]
    redis_connected: bool
    redis_pending_writes: int
    uptime_seconds: float
    def __init__(self, executors: _Optional[_Iterable[_Union[ExecutorStats, _Mapping]]] = ..., windows: _Optional[_Iterable[_Union[WindowStats, _Mapping]]] = ..., tenants: _Optional[_Iterable[_Union[TenantStats, _Mapping]]] = ..., redis_connected: _Optional[bool] = ..., redis_pending_writes: _Optional[int] = ..., uptime_seconds: _Optional[float] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("commit", "release", "extend", "allocate", "allocate_token_budget", "load")
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    ALLOCATE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATE_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    commit: CommitRequest
    release: ReleaseRequest
    extend: ExtendRequest
    allocate: _containers.RepeatedCompositeFieldContainer[AllocateRequest]
    allocate_token_budget: int
    load: LoadReport
    def __init__(self, commit: _Optional[_Union[CommitRequest, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ..., extend: _Optional[_Union[ExtendRequest, _Mapping]] = ..., allocate: _Optional[_Iterable[_Union[AllocateRequest, _Mapping]]] = ..., allocate_token_budget: _Optional[int] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("executor_id", "epoch", "load")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    epoch: int
    load: _fleet_pb2.ExecutorLoad
    def __init__(self, executor_id: _Optional[str] = ..., epoch: _Optional[int] = ..., load: _Optional[_Union[_fleet_pb2.ExecutorLoad, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("commit", "release", "extend", "commit_error", "release_error", "extend_error", "allocate", "allocate_error", "load_error", "ahead_src", "ahead_dst")
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    COMMIT_ERROR_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ERROR_FIELD_NUMBER: _ClassVar[int]
    EXTEND_ERROR_FIELD_NUMBER: _ClassVar[int]
    ALLOCATE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATE_ERROR_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    AHEAD_SRC_FIELD_NUMBER: _ClassVar[int]
    AHEAD_DST_FIELD_NUMBER: _ClassVar[int]
    commit: CommitResponse
    release: ReleaseResponse
    extend: ExtendResponse
    commit_error: CallError
    release_error: CallError
    extend_error: CallError
    allocate: _containers.RepeatedCompositeFieldContainer[AllocateResponse]
    allocate_error: CallError
    load_error: CallError
    ahead_src: _containers.RepeatedScalarFieldContainer[int]
    ahead_dst: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, commit: _Optional[_Union[CommitResponse, _Mapping]] = ..., release: _Optional[_Union[ReleaseResponse, _Mapping]] = ..., extend: _Optional[_Union[ExtendResponse, _Mapping]] = ..., commit_error: _Optional[_Union[CallError, _Mapping]] = ..., release_error: _Optional[_Union[CallError, _Mapping]] = ..., extend_error: _Optional[_Union[CallError, _Mapping]] = ..., allocate: _Optional[_Iterable[_Union[AllocateResponse, _Mapping]]] = ..., allocate_error: _Optional[_Union[CallError, _Mapping]] = ..., load_error: _Optional[_Union[CallError, _Mapping]] = ..., ahead_src: _Optional[_Iterable[int]] = ..., ahead_dst: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("id", "allocate", "extend", "commit", "fork", "release", "step")
    ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATE_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    FORK_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    id: int
    allocate: AllocateRequest
    extend: ExtendRequest
    commit: CommitRequest
    fork: ForkRequest
    release: ReleaseRequest
    step: StepRequest
    def __init__(self, id: _Optional[int] = ..., allocate: _Optional[_Union[AllocateRequest, _Mapping]] = ..., extend: _Optional[_Union[ExtendRequest, _Mapping]] = ..., commit: _Optional[_Union[CommitRequest, _Mapping]] = ..., fork: _Optional[_Union[ForkRequest, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ..., step: _Optional[_Union[StepRequest, _Mapping]] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("id", "error", "allocate", "extend", "commit", "fork", "release", "step")
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ALLOCATE_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    FORK_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    id: int
    error: CallError
    allocate: AllocateResponse
    extend: ExtendResponse
    commit: CommitResponse
    fork: ForkResponse
    release: ReleaseResponse
    step: StepResponse
    def __init__(self, id: _Optional[int] = ..., error: _Optional[_Union[CallError, _Mapping]] = ..., allocate: _Optional[_Union[AllocateResponse, _Mapping]] = ..., extend: _Optional[_Union[ExtendResponse, _Mapping]] = ..., commit: _Optional[_Union[CommitResponse, _Mapping]] = ..., fork: _Optional[_Union[ForkResponse, _Mapping]] = ..., release: _Optional[_Union[ReleaseResponse, _Mapping]] = ..., step: _Optional[_Union[StepResponse, _Mapping]] = ...) -> None: ...

class ReconcileRequest(_message.Message):
    __slots__ = ("executor_id", "epoch", "seqs", "num_transfers")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    NUM_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    epoch: int
    seqs: _containers.RepeatedCompositeFieldContainer[SeqBlocks]
    num_transfers: int
    def __init__(self, executor_id: _Optional[str] = ..., epoch: _Optional[int] = ..., seqs: _Optional[_Iterable[_Union[SeqBlocks, _Mapping]]] = ..., num_transfers: _Optional[int] = ...) -> None: ...

class ReconcileResponse(_message.Message):
    __slots__ = ("num_released", "lost_seq_ids")
    NUM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    LOST_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    num_released: int
    lost_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, num_released: _Optional[int] = ..., lost_seq_ids: _Optional[_Iterable[str]] = ...) -> None: ...
