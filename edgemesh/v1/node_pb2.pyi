from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADED: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_STATE_UNLOADED: ModelState

class DescribeRequest(_message.Message):
    __slots__ = ("task_counts",)
    TASK_COUNTS_FIELD_NUMBER: _ClassVar[int]
    task_counts: bool
    def __init__(self, task_counts: _Optional[bool] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("node", "hardware", "models", "load", "capacity", "agents", "task_counts", "task_counts_evicted")
    NODE_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    TASK_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TASK_COUNTS_EVICTED_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    hardware: Hardware
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    load: Load
    capacity: Capacity
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    task_counts: _containers.RepeatedCompositeFieldContainer[TaskCount]
    task_counts_evicted: int
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ..., task_counts: _Optional[_Iterable[_Union[TaskCount, _Mapping]]] = ..., task_counts_evicted: _Optional[int] = ...) -> None: ...

class TaskCount(_message.Message):
    __slots__ = ("task_id", "generations_started", "generations_completed", "agent_runs_started", "agent_runs_completed", "side_effect_tool_runs", "last_completed_unix_s")
    class SideEffectToolRunsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_STARTED_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    AGENT_RUNS_STARTED_FIELD_NUMBER: _ClassVar[int]
    AGENT_RUNS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    SIDE_EFFECT_TOOL_RUNS_FIELD_NUMBER: _ClassVar[int]
    LAST_COMPLETED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    generations_started: int
    generations_completed: int
    agent_runs_started: int
    agent_runs_completed: int
    side_effect_tool_runs: _containers.ScalarMap[str, int]
    last_completed_unix_s: float
    def __init__(self, task_id: _Optional[str] = ..., generations_started: _Optional[int] = ..., generations_completed: _Optional[int] = ..., agent_runs_started: _Optional[int] = ..., agent_runs_completed: _Optional[int] = ..., side_effect_tool_runs: _Optional[_Mapping[str, int]] = ..., last_completed_unix_s: _Optional[float] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "cluster", "version", "protocol_version", "labels", "started_at_unix_s")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    cluster: str
    version: str
    protocol_version: int
    labels: _containers.ScalarMap[str, str]
    started_at_unix_s: float
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., cluster: _Optional[str] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., started_at_unix_s: _Optional[float] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("cpu_model", "physical_cores", "logical_cores", "cpu_max_mhz", "architecture", "memory_total_bytes", "memory_available_bytes", "os", "gpus", "onnx_providers")
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_CORES_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_CORES_FIELD_NUMBER: _ClassVar[int]
    CPU_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ONNX_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    cpu_model: str
    physical_cores: int
    logical_cores: int
    cpu_max_mhz: float
    architecture: str
    memory_total_bytes: int
    memory_available_bytes: int
    os: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    onnx_providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cpu_model: _Optional[str] = ..., physical_cores: _Optional[int] = ..., logical_cores: _Optional[int] = ..., cpu_max_mhz: _Optional[float] = ..., architecture: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., os: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., onnx_providers: _Optional[_Iterable[str]] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("vendor", "name", "memory_total_bytes", "memory_used_bytes")
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    vendor: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    def __init__(self, vendor: _Optional[str] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "backend", "source", "state", "size_bytes", "context_length", "is_default", "error", "family", "quantization", "task", "inputs", "outputs", "labels", "sha256", "on_demand", "prompt_tokens_per_s", "decode_tokens_per_s")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    backend: str
    source: str
    state: ModelState
    size_bytes: int
    context_length: int
    is_default: bool
    error: str
    family: str
    quantization: str
    task: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    labels: _containers.RepeatedScalarFieldContainer[str]
    sha256: str
    on_demand: bool
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    def __init__(self, model_id: _Optional[str] = ..., backend: _Optional[str] = ..., source: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., size_bytes: _Optional[int] = ..., context_length: _Optional[int] = ..., is_default: _Optional[bool] = ..., error: _Optional[str] = ..., family: _Optional[str] = ..., quantization: _Optional[str] = ..., task: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., sha256: _Optional[str] = ..., on_demand: _Optional[bool] = ..., prompt_tokens_per_s: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "dim_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DIM_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dim_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dim_names: _Optional[_Iterable[str]] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("in_flight", "queued", "cpu_percent", "memory_percent", "completed", "rejected")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    queued: int
    cpu_percent: float
    memory_percent: float
    completed: int
    rejected: int
    def __init__(self, in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., memory_percent: _Optional[float] = ..., completed: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("max_concurrent", "max_queued")
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    max_concurrent: int
    max_queued: int
    def __init__(self, max_concurrent: _Optional[int] = ..., max_queued: _Optional[int] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("name", "model_id", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    description: str
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "name", "tool_call_id")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    name: str
    tool_call_id: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., name: _Optional[str] = ..., tool_call_id: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskContext(_message.Message):
    __slots__ = ("task_id", "idempotency_key", "attempt", "deadline_unix_ms", "agent", "key_name", "subject")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    idempotency_key: str
    attempt: int
    deadline_unix_ms: int
    agent: str
    key_name: str
    subject: str
    def __init__(self, task_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., attempt: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., agent: _Optional[str] = ..., key_name: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "sampling", "task", "continuation", "raw", "continuation_token_ids", "json_schema", "report_waiting_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REPORT_WAITING_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    sampling: Sampling
    task: TaskContext
    continuation: str
    raw: bool
    continuation_token_ids: _containers.RepeatedScalarFieldContainer[int]
    json_schema: str
    report_waiting_ms: int
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., task: _Optional[_Union[TaskContext, _Mapping]] = ..., continuation: _Optional[str] = ..., raw: _Optional[bool] = ..., continuation_token_ids: _Optional[_Iterable[int]] = ..., json_schema: _Optional[str] = ..., report_waiting_ms: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "time_to_first_token_ms", "total_ms", "tokens_per_second")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    tokens_per_second: float
    def __init__(self, queue_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "timing", "model", "node_id", "task")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: str
    usage: Usage
    timing: Timing
    model: str
    node_id: str
    task: TaskContext
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., model: _Optional[str] = ..., node_id: _Optional[str] = ..., task: _Optional[_Union[TaskContext, _Mapping]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "index", "final", "tokens", "token_ids", "waiting")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    text: str
    index: int
    final: GenerateResponse
    tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    waiting: bool
    def __init__(self, text: _Optional[str] = ..., index: _Optional[int] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ..., tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., waiting: _Optional[bool] = ...) -> None: ...

class AgentRequest(_message.Message):
    __slots__ = ("agent", "input", "history", "task", "completed_steps", "model", "max_steps", "report_waiting_ms")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    REPORT_WAITING_MS_FIELD_NUMBER: _ClassVar[int]
    agent: str
    input: str
    history: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    task: TaskContext
    completed_steps: _containers.RepeatedCompositeFieldContainer[AgentStep]
    model: str
    max_steps: int
    report_waiting_ms: int
    def __init__(self, agent: _Optional[str] = ..., input: _Optional[str] = ..., history: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., task: _Optional[_Union[TaskContext, _Mapping]] = ..., completed_steps: _Optional[_Iterable[_Union[AgentStep, _Mapping]]] = ..., model: _Optional[str] = ..., max_steps: _Optional[int] = ..., report_waiting_ms: _Optional[int] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("tool", "arguments_json")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    tool: str
    arguments_json: str
    def __init__(self, tool: _Optional[str] = ..., arguments_json: _Optional[str] = ...) -> None: ...

class AgentStep(_message.Message):
    __slots__ = ("index", "kind", "call", "result_json", "idempotent", "tokens", "duration_ms", "model", "error", "node_id", "tool_ms")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_MS_FIELD_NUMBER: _ClassVar[int]
    index: int
    kind: str
    call: ToolCall
    result_json: str
    idempotent: bool
    tokens: int
    duration_ms: float
    model: str
    error: str
    node_id: str
    tool_ms: float
    def __init__(self, index: _Optional[int] = ..., kind: _Optional[str] = ..., call: _Optional[_Union[ToolCall, _Mapping]] = ..., result_json: _Optional[str] = ..., idempotent: _Optional[bool] = ..., tokens: _Optional[int] = ..., duration_ms: _Optional[float] = ..., model: _Optional[str] = ..., error: _Optional[str] = ..., node_id: _Optional[str] = ..., tool_ms: _Optional[float] = ...) -> None: ...

class AgentResult(_message.Message):
    __slots__ = ("agent", "answer", "finish_reason", "steps", "usage", "total_ms", "model", "node_id", "tier", "escalation_reason")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_REASON_FIELD_NUMBER: _ClassVar[int]
    agent: str
    answer: str
    finish_reason: str
    steps: _containers.RepeatedCompositeFieldContainer[AgentStep]
    usage: Usage
    total_ms: float
    model: str
    node_id: str
    tier: str
    escalation_reason: str
    def __init__(self, agent: _Optional[str] = ..., answer: _Optional[str] = ..., finish_reason: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[AgentStep, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., total_ms: _Optional[float] = ..., model: _Optional[str] = ..., node_id: _Optional[str] = ..., tier: _Optional[str] = ..., escalation_reason: _Optional[str] = ...) -> None: ...

class AgentEvent(_message.Message):
    __slots__ = ("step", "text", "result", "waiting")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    step: AgentStep
    text: str
    result: AgentResult
    waiting: bool
    def __init__(self, step: _Optional[_Union[AgentStep, _Mapping]] = ..., text: _Optional[str] = ..., result: _Optional[_Union[AgentResult, _Mapping]] = ..., waiting: _Optional[bool] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "text")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("label", "confidence", "scores", "model", "latency_ms")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    label: str
    confidence: float
    scores: _containers.RepeatedCompositeFieldContainer[LabelScore]
    model: str
    latency_ms: float
    def __init__(self, label: _Optional[str] = ..., confidence: _Optional[float] = ..., scores: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., model: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "raw", "strings")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw: bytes
    strings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., raw: _Optional[bytes] = ..., strings: _Optional[_Iterable[str]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "inputs", "outputs")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.MessageMap[str, Tensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("outputs", "model", "latency_ms")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, Tensor]
    model: str
    latency_ms: float
    def __init__(self, outputs: _Optional[_Mapping[str, Tensor]] = ..., model: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class HeartbeatBeat(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class GetTraceRequest(_message.Message):
    __slots__ = ("trace_id",)
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    trace_id: str
    def __init__(self, trace_id: _Optional[str] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("name", "trace_id", "span_id", "parent_span_id", "start_unix_nanos", "end_unix_nanos", "process", "attributes", "error")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_unix_nanos: int
    end_unix_nanos: int
    process: str
    attributes: _containers.ScalarMap[str, str]
    error: bool
    def __init__(self, name: _Optional[str] = ..., trace_id: _Optional[str] = ..., span_id: _Optional[str] = ..., parent_span_id: _Optional[str] = ..., start_unix_nanos: _Optional[int] = ..., end_unix_nanos: _Optional[int] = ..., process: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., error: _Optional[bool] = ...) -> None: ...

class GetTraceResponse(_message.Message):
    __slots__ = ("spans",)
    SPANS_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...
