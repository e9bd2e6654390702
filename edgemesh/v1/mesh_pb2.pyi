from edgemesh.v1 import errors_pb2 as _errors_pb2
from edgemesh.v1 import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttemptOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTEMPT_OUTCOME_UNSPECIFIED: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_OK: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_UNAVAILABLE: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_TIMEOUT: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_OVERLOADED: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_ERROR: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_CANCELLED: _ClassVar[AttemptOutcome]
ATTEMPT_OUTCOME_UNSPECIFIED: AttemptOutcome
ATTEMPT_OUTCOME_OK: AttemptOutcome
ATTEMPT_OUTCOME_UNAVAILABLE: AttemptOutcome
ATTEMPT_OUTCOME_TIMEOUT: AttemptOutcome
ATTEMPT_OUTCOME_OVERLOADED: AttemptOutcome
ATTEMPT_OUTCOME_ERROR: AttemptOutcome
ATTEMPT_OUTCOME_CANCELLED: AttemptOutcome

class SubmitRequest(_message.Message):
    __slots__ = ("task_id", "idempotency_key", "agent", "model", "prompt", "messages", "sampling", "deadline_s", "labels", "tier")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    idempotency_key: str
    agent: str
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_node_pb2.ChatMessage]
    sampling: _node_pb2.Sampling
    deadline_s: float
    labels: _containers.ScalarMap[str, str]
    tier: str
    def __init__(self, task_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., agent: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_node_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_node_pb2.Sampling, _Mapping]] = ..., deadline_s: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., tier: _Optional[str] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("node_id", "node_name", "outcome", "duration_ms", "detail", "completion_tokens")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_name: str
    outcome: AttemptOutcome
    duration_ms: float
    detail: str
    completion_tokens: int
    def __init__(self, node_id: _Optional[str] = ..., node_name: _Optional[str] = ..., outcome: _Optional[_Union[AttemptOutcome, str]] = ..., duration_ms: _Optional[float] = ..., detail: _Optional[str] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("task_id", "text", "finish_reason", "node_id", "node_name", "model", "agent", "usage", "attempts", "failed_over", "total_ms", "time_to_first_token_ms", "steps", "tier", "escalation_reason", "routed_by")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_OVER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_REASON_FIELD_NUMBER: _ClassVar[int]
    ROUTED_BY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    text: str
    finish_reason: str
    node_id: str
    node_name: str
    model: str
    agent: str
    usage: _node_pb2.Usage
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    failed_over: bool
    total_ms: float
    time_to_first_token_ms: float
    steps: _containers.RepeatedCompositeFieldContainer[_node_pb2.AgentStep]
    tier: str
    escalation_reason: str
    routed_by: str
    def __init__(self, task_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., node_id: _Optional[str] = ..., node_name: _Optional[str] = ..., model: _Optional[str] = ..., agent: _Optional[str] = ..., usage: _Optional[_Union[_node_pb2.Usage, _Mapping]] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., failed_over: _Optional[bool] = ..., total_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., steps: _Optional[_Iterable[_Union[_node_pb2.AgentStep, _Mapping]]] = ..., tier: _Optional[str] = ..., escalation_reason: _Optional[str] = ..., routed_by: _Optional[str] = ...) -> None: ...

class SubmitChunk(_message.Message):
    __slots__ = ("text", "index", "result", "step", "error")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    text: str
    index: int
    result: SubmitResponse
    step: _node_pb2.AgentStep
    error: _errors_pb2.ErrorDetail
    def __init__(self, text: _Optional[str] = ..., index: _Optional[int] = ..., result: _Optional[_Union[SubmitResponse, _Mapping]] = ..., step: _Optional[_Union[_node_pb2.AgentStep, _Mapping]] = ..., error: _Optional[_Union[_errors_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeEntry(_message.Message):
    __slots__ = ("node_id", "name", "address", "state", "source", "models", "agents", "load", "capacity", "labels", "ewma_ms_per_token", "cooling_down", "hardware", "decode_tokens_per_s")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class DecodeTokensPerSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EWMA_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COOLING_DOWN_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    address: str
    state: str
    source: str
    models: _containers.RepeatedScalarFieldContainer[str]
    agents: _containers.RepeatedScalarFieldContainer[str]
    load: _node_pb2.Load
    capacity: _node_pb2.Capacity
    labels: _containers.ScalarMap[str, str]
    ewma_ms_per_token: float
    cooling_down: bool
    hardware: _node_pb2.Hardware
    decode_tokens_per_s: _containers.ScalarMap[str, float]
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., source: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., agents: _Optional[_Iterable[str]] = ..., load: _Optional[_Union[_node_pb2.Load, _Mapping]] = ..., capacity: _Optional[_Union[_node_pb2.Capacity, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., ewma_ms_per_token: _Optional[float] = ..., cooling_down: _Optional[bool] = ..., hardware: _Optional[_Union[_node_pb2.Hardware, _Mapping]] = ..., decode_tokens_per_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeEntry]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeEntry, _Mapping]]] = ...) -> None: ...

class DescribeTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class TaskRecord(_message.Message):
    __slots__ = ("task_id", "state", "result", "error", "attempts")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: str
    result: SubmitResponse
    error: str
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[str] = ..., result: _Optional[_Union[SubmitResponse, _Mapping]] = ..., error: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ...) -> None: ...
