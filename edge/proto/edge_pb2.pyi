from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Dim(_message.Message):
    __slots__ = ("size", "symbol")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    size: int
    symbol: str
    def __init__(self, size: _Optional[int] = ..., symbol: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedCompositeFieldContainer[Dim]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[_Union[Dim, _Mapping]]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "queue_ms", "compute_ms", "send_ms", "received_unix_ns")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    SEND_MS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    queue_ms: float
    compute_ms: float
    send_ms: float
    received_unix_ns: int
    def __init__(self, stage: _Optional[int] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., send_ms: _Optional[float] = ..., received_unix_ns: _Optional[int] = ...) -> None: ...

class Activation(_message.Message):
    __slots__ = ("request_id", "tensors", "timings", "epoch", "step", "tokens", "rows", "reply_to")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    epoch: int
    step: Step
    tokens: _containers.RepeatedScalarFieldContainer[int]
    rows: _containers.RepeatedCompositeFieldContainer[Step]
    reply_to: str
    def __init__(self, request_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., epoch: _Optional[int] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., tokens: _Optional[_Iterable[int]] = ..., rows: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., reply_to: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("sequence_id", "position", "release", "sampling", "partial", "length")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    position: int
    release: bool
    sampling: Sampling
    partial: bool
    length: int
    def __init__(self, sequence_id: _Optional[str] = ..., position: _Optional[int] = ..., release: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., partial: _Optional[bool] = ..., length: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardRef(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class ShardPresence(_message.Message):
    __slots__ = ("present", "size")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    present: bool
    size: int
    def __init__(self, present: _Optional[bool] = ..., size: _Optional[int] = ...) -> None: ...

class ShardHeader(_message.Message):
    __slots__ = ("sha256", "size", "name")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    name: str
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ShardHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ShardHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ShardFileRef(_message.Message):
    __slots__ = ("name", "sha256", "random_access")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RANDOM_ACCESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    random_access: bool
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., random_access: _Optional[bool] = ...) -> None: ...

class StageConfig(_message.Message):
    __slots__ = ("stage", "num_stages", "shard_sha256", "inputs", "outputs", "next_address", "epoch", "plan_id", "predicted_memory_mb", "data_files", "mode", "protocol", "max_request_bytes", "coordinator_id", "take_over", "state", "max_sequences", "context", "prefill_chunk", "kv_dtype")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    SHARD_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    DATA_FILES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    TAKE_OVER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    stage: int
    num_stages: int
    shard_sha256: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    next_address: str
    epoch: int
    plan_id: str
    predicted_memory_mb: float
    data_files: _containers.RepeatedCompositeFieldContainer[ShardFileRef]
    mode: str
    protocol: int
    max_request_bytes: int
    coordinator_id: str
    take_over: bool
    state: _containers.RepeatedCompositeFieldContainer[StatePair]
    max_sequences: int
    context: int
    prefill_chunk: int
    kv_dtype: str
    def __init__(self, stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., shard_sha256: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., next_address: _Optional[str] = ..., epoch: _Optional[int] = ..., plan_id: _Optional[str] = ..., predicted_memory_mb: _Optional[float] = ..., data_files: _Optional[_Iterable[_Union[ShardFileRef, _Mapping]]] = ..., mode: _Optional[str] = ..., protocol: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., coordinator_id: _Optional[str] = ..., take_over: _Optional[bool] = ..., state: _Optional[_Iterable[_Union[StatePair, _Mapping]]] = ..., max_sequences: _Optional[int] = ..., context: _Optional[int] = ..., prefill_chunk: _Optional[int] = ..., kv_dtype: _Optional[str] = ...) -> None: ...

class StatePair(_message.Message):
    __slots__ = ("input", "output")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    input: str
    output: str
    def __init__(self, input: _Optional[str] = ..., output: _Optional[str] = ...) -> None: ...

class ConfigureReply(_message.Message):
    __slots__ = ("load_ms", "rss_bytes")
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    load_ms: float
    rss_bytes: int
    def __init__(self, load_ms: _Optional[float] = ..., rss_bytes: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceFacts(_message.Message):
    __slots__ = ("hostname", "machine", "system", "cpu_count", "cpu_freq_mhz", "memory_total_bytes", "memory_available_bytes", "python", "onnxruntime")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    CPU_FREQ_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PYTHON_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    machine: str
    system: str
    cpu_count: int
    cpu_freq_mhz: float
    memory_total_bytes: int
    memory_available_bytes: int
    python: str
    onnxruntime: str
    def __init__(self, hostname: _Optional[str] = ..., machine: _Optional[str] = ..., system: _Optional[str] = ..., cpu_count: _Optional[int] = ..., cpu_freq_mhz: _Optional[float] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., python: _Optional[str] = ..., onnxruntime: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("device", "version", "configured", "stage", "shard_sha256", "plan_id", "epoch", "rss_bytes", "peak_rss_bytes", "memory_budget_mb", "requests_done", "requests_failed", "mean_compute_ms", "queue_depth", "facts", "rss_anon_bytes", "rss_file_bytes", "memory_warning", "mode", "coordinator_id", "sequences", "kv_cache_bytes", "batched_runs", "batched_rows")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_MB_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DONE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    MEAN_COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    RSS_ANON_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WARNING_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_RUNS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_ROWS_FIELD_NUMBER: _ClassVar[int]
    device: str
    version: str
    configured: bool
    stage: int
    shard_sha256: str
    plan_id: str
    epoch: int
    rss_bytes: int
    peak_rss_bytes: int
    memory_budget_mb: float
    requests_done: int
    requests_failed: int
    mean_compute_ms: float
    queue_depth: int
    facts: DeviceFacts
    rss_anon_bytes: int
    rss_file_bytes: int
    memory_warning: str
    mode: str
    coordinator_id: str
    sequences: int
    kv_cache_bytes: int
    batched_runs: int
    batched_rows: int
    def __init__(self, device: _Optional[str] = ..., version: _Optional[str] = ..., configured: _Optional[bool] = ..., stage: _Optional[int] = ..., shard_sha256: _Optional[str] = ..., plan_id: _Optional[str] = ..., epoch: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., memory_budget_mb: _Optional[float] = ..., requests_done: _Optional[int] = ..., requests_failed: _Optional[int] = ..., mean_compute_ms: _Optional[float] = ..., queue_depth: _Optional[int] = ..., facts: _Optional[_Union[DeviceFacts, _Mapping]] = ..., rss_anon_bytes: _Optional[int] = ..., rss_file_bytes: _Optional[int] = ..., memory_warning: _Optional[str] = ..., mode: _Optional[str] = ..., coordinator_id: _Optional[str] = ..., sequences: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., batched_runs: _Optional[int] = ..., batched_rows: _Optional[int] = ...) -> None: ...

class CalibrateRequest(_message.Message):
    __slots__ = ("seconds", "payload")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    payload: bytes
    def __init__(self, seconds: _Optional[float] = ..., payload: _Optional[bytes] = ...) -> None: ...

class CalibrateReply(_message.Message):
    __slots__ = ("gflops", "startup_rss_bytes", "threads", "runs", "facts")
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    STARTUP_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    gflops: float
    startup_rss_bytes: int
    threads: int
    runs: int
    facts: DeviceFacts
    def __init__(self, gflops: _Optional[float] = ..., startup_rss_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., runs: _Optional[int] = ..., facts: _Optional[_Union[DeviceFacts, _Mapping]] = ...) -> None: ...

class MemorySample(_message.Message):
    __slots__ = ("time", "rss_bytes", "rss_anon_bytes", "rss_file_bytes", "peak_rss_bytes", "heap_bytes", "cpu_percent", "requests_done", "queue_depth")
    TIME_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_ANON_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DONE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    time: float
    rss_bytes: int
    rss_anon_bytes: int
    rss_file_bytes: int
    peak_rss_bytes: int
    heap_bytes: int
    cpu_percent: float
    requests_done: int
    queue_depth: int
    def __init__(self, time: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., rss_anon_bytes: _Optional[int] = ..., rss_file_bytes: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., heap_bytes: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., requests_done: _Optional[int] = ..., queue_depth: _Optional[int] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("since",)
    SINCE_FIELD_NUMBER: _ClassVar[int]
    since: float
    def __init__(self, since: _Optional[float] = ...) -> None: ...

class WorkerProfile(_message.Message):
    __slots__ = ("samples", "interval_s", "memory_budget_mb", "rss_at_load_bytes", "load_ms")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_MB_FIELD_NUMBER: _ClassVar[int]
    RSS_AT_LOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[MemorySample]
    interval_s: float
    memory_budget_mb: float
    rss_at_load_bytes: int
    load_ms: float
    def __init__(self, samples: _Optional[_Iterable[_Union[MemorySample, _Mapping]]] = ..., interval_s: _Optional[float] = ..., memory_budget_mb: _Optional[float] = ..., rss_at_load_bytes: _Optional[int] = ..., load_ms: _Optional[float] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("coordinator_id", "client_id", "release")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    client_id: str
    release: bool
    def __init__(self, coordinator_id: _Optional[str] = ..., client_id: _Optional[str] = ..., release: _Optional[bool] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("request_id", "stage", "code", "message", "epoch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    stage: int
    code: int
    message: str
    epoch: int
    def __init__(self, request_id: _Optional[str] = ..., stage: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("result", "failure", "delivered")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    result: Activation
    failure: Failure
    delivered: int
    def __init__(self, result: _Optional[_Union[Activation, _Mapping]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., delivered: _Optional[int] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("inputs",)
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("request_id", "outputs", "timings", "latency_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    latency_ms: float
    def __init__(self, request_id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "chat", "prompt_tokens", "max_tokens", "sampling", "stop")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: bool
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: Sampling
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[bool] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "ttft_ms", "tokens_per_s", "finish_reason")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    tokens_per_s: float
    finish_reason: str
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("tokens", "text", "usage")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    text: str
    usage: Usage
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("stage", "device", "address", "healthy", "worker", "planned_memory_mb", "planned_kv_cache_mb")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PLANNED_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    PLANNED_KV_CACHE_MB_FIELD_NUMBER: _ClassVar[int]
    stage: int
    device: str
    address: str
    healthy: bool
    worker: WorkerStatus
    planned_memory_mb: float
    planned_kv_cache_mb: float
    def __init__(self, stage: _Optional[int] = ..., device: _Optional[str] = ..., address: _Optional[str] = ..., healthy: _Optional[bool] = ..., worker: _Optional[_Union[WorkerStatus, _Mapping]] = ..., planned_memory_mb: _Optional[float] = ..., planned_kv_cache_mb: _Optional[float] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("plan_id", "stages", "requests_done", "requests_failed", "in_flight", "model_inputs", "bindings", "model", "not_serving", "coordinator_id", "requests_direct")
    class BindingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DONE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_INPUTS_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NOT_SERVING_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DIRECT_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    requests_done: int
    requests_failed: int
    in_flight: int
    model_inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    bindings: _containers.ScalarMap[str, int]
    model: str
    not_serving: str
    coordinator_id: str
    requests_direct: int
    def __init__(self, plan_id: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., requests_done: _Optional[int] = ..., requests_failed: _Optional[int] = ..., in_flight: _Optional[int] = ..., model_inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., bindings: _Optional[_Mapping[str, int]] = ..., model: _Optional[str] = ..., not_serving: _Optional[str] = ..., coordinator_id: _Optional[str] = ..., requests_direct: _Optional[int] = ...) -> None: ...

class StageProfile(_message.Message):
    __slots__ = ("stage", "device", "address", "profile", "shard", "planned_memory_mb", "budget_mb", "profile_data", "error")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PLANNED_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MB_FIELD_NUMBER: _ClassVar[int]
    PROFILE_DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    stage: int
    device: str
    address: str
    profile: str
    shard: str
    planned_memory_mb: float
    budget_mb: float
    profile_data: WorkerProfile
    error: str
    def __init__(self, stage: _Optional[int] = ..., device: _Optional[str] = ..., address: _Optional[str] = ..., profile: _Optional[str] = ..., shard: _Optional[str] = ..., planned_memory_mb: _Optional[float] = ..., budget_mb: _Optional[float] = ..., profile_data: _Optional[_Union[WorkerProfile, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ClusterProfile(_message.Message):
    __slots__ = ("stages",)
    STAGES_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageProfile]
    def __init__(self, stages: _Optional[_Iterable[_Union[StageProfile, _Mapping]]] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Route(_message.Message):
    __slots__ = ("epoch", "first_address", "last_address", "stages", "unavailable")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    first_address: str
    last_address: str
    stages: int
    unavailable: str
    def __init__(self, epoch: _Optional[int] = ..., first_address: _Optional[str] = ..., last_address: _Optional[str] = ..., stages: _Optional[int] = ..., unavailable: _Optional[str] = ...) -> None: ...
