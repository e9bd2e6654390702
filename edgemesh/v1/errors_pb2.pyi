from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorDetail(_message.Message):
    __slots__ = ("kind", "task_id", "attempts", "omitted_attempts")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OMITTED_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    task_id: str
    attempts: _containers.RepeatedCompositeFieldContainer[AttemptDetail]
    omitted_attempts: int
    def __init__(self, kind: _Optional[str] = ..., task_id: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[AttemptDetail, _Mapping]]] = ..., omitted_attempts: _Optional[int] = ...) -> None: ...

class AttemptDetail(_message.Message):
    __slots__ = ("node_id", "node_name", "outcome", "duration_ms", "detail", "completion_tokens")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_name: str
    outcome: str
    duration_ms: float
    detail: str
    completion_tokens: int
    def __init__(self, node_id: _Optional[str] = ..., node_name: _Optional[str] = ..., outcome: _Optional[str] = ..., duration_ms: _Optional[float] = ..., detail: _Optional[str] = ..., completion_tokens: _Optional[int] = ...) -> None: ...
