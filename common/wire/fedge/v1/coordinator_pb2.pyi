from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_STATE_UNSPECIFIED: _ClassVar[DeviceState]
    DEVICE_STATE_IDLE: _ClassVar[DeviceState]
    DEVICE_STATE_WORKING: _ClassVar[DeviceState]
    DEVICE_STATE_UPLOADING: _ClassVar[DeviceState]
DEVICE_STATE_UNSPECIFIED: DeviceState
DEVICE_STATE_IDLE: DeviceState
DEVICE_STATE_WORKING: DeviceState
DEVICE_STATE_UPLOADING: DeviceState

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DeviceCapabilities(_message.Message):
    __slots__ = ("torch_threads", "memory_budget_bytes", "cpu_count", "platform", "fedge_version", "flower_version", "codecs", "inference_only")
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    FEDGE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLOWER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ONLY_FIELD_NUMBER: _ClassVar[int]
    torch_threads: int
    memory_budget_bytes: int
    cpu_count: int
    platform: str
    fedge_version: str
    flower_version: str
    codecs: _containers.RepeatedScalarFieldContainer[str]
    inference_only: bool
    def __init__(self, torch_threads: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., cpu_count: _Optional[int] = ..., platform: _Optional[str] = ..., fedge_version: _Optional[str] = ..., flower_version: _Optional[str] = ..., codecs: _Optional[_Iterable[str]] = ..., inference_only: _Optional[bool] = ...) -> None: ...

class DataSummary(_message.Message):
    __slots__ = ("num_train_examples", "num_eval_examples", "dataset")
    NUM_TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    num_train_examples: int
    num_eval_examples: int
    dataset: str
    def __init__(self, num_train_examples: _Optional[int] = ..., num_eval_examples: _Optional[int] = ..., dataset: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("device_id", "device_name", "capabilities", "data", "protocol_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_name: str
    capabilities: DeviceCapabilities
    data: DataSummary
    protocol_version: int
    def __init__(self, device_id: _Optional[str] = ..., device_name: _Optional[str] = ..., capabilities: _Optional[_Union[DeviceCapabilities, _Mapping]] = ..., data: _Optional[_Union[DataSummary, _Mapping]] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("device_id", "node_id", "session_token", "heartbeat_interval_s", "chunk_size", "max_result_bytes", "model_version", "protocol_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    node_id: int
    session_token: str
    heartbeat_interval_s: float
    chunk_size: int
    max_result_bytes: int
    model_version: str
    protocol_version: int
    def __init__(self, device_id: _Optional[str] = ..., node_id: _Optional[int] = ..., session_token: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., chunk_size: _Optional[int] = ..., max_result_bytes: _Optional[int] = ..., model_version: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_token", "state", "task_id", "model_version")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    state: DeviceState
    task_id: str
    model_version: str
    def __init__(self, session_token: _Optional[str] = ..., state: _Optional[_Union[DeviceState, str]] = ..., task_id: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("heartbeat_interval_s", "task_available", "model_version", "task_cancelled")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    TASK_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    task_available: bool
    model_version: str
    task_cancelled: bool
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., task_available: _Optional[bool] = ..., model_version: _Optional[str] = ..., task_cancelled: _Optional[bool] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("session_token", "wait_s", "max_chunk_bytes", "task_id", "offset")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    wait_s: float
    max_chunk_bytes: int
    task_id: str
    offset: int
    def __init__(self, session_token: _Optional[str] = ..., wait_s: _Optional[float] = ..., max_chunk_bytes: _Optional[int] = ..., task_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class TaskEnvelope(_message.Message):
    __slots__ = ("task_id", "run_id", "round", "message_type", "total_size", "sha256", "payload_format", "offset", "timeout_s", "base_model_version", "max_result_bytes", "run_config_json")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    run_id: int
    round: int
    message_type: str
    total_size: int
    sha256: str
    payload_format: str
    offset: int
    timeout_s: float
    base_model_version: str
    max_result_bytes: int
    run_config_json: str
    def __init__(self, task_id: _Optional[str] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ..., message_type: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., payload_format: _Optional[str] = ..., offset: _Optional[int] = ..., timeout_s: _Optional[float] = ..., base_model_version: _Optional[str] = ..., max_result_bytes: _Optional[int] = ..., run_config_json: _Optional[str] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: TaskEnvelope
    data: Chunk
    def __init__(self, header: _Optional[_Union[TaskEnvelope, _Mapping]] = ..., data: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("session_token", "task_id", "run_id", "round", "total_size", "sha256", "offset", "payload_format", "signature")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    task_id: str
    run_id: int
    round: int
    total_size: int
    sha256: str
    offset: int
    payload_format: str
    signature: bytes
    def __init__(self, session_token: _Optional[str] = ..., task_id: _Optional[str] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ..., payload_format: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ResultChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    data: Chunk
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., data: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PushResultReply(_message.Message):
    __slots__ = ("accepted", "offset", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    offset: int
    duplicate: bool
    def __init__(self, accepted: _Optional[bool] = ..., offset: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class GetUploadOffsetRequest(_message.Message):
    __slots__ = ("session_token", "task_id")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    task_id: str
    def __init__(self, session_token: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class GetUploadOffsetReply(_message.Message):
    __slots__ = ("offset", "total_size", "sha256", "complete")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    total_size: int
    sha256: str
    complete: bool
    def __init__(self, offset: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., complete: _Optional[bool] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("session_token", "if_none_match", "version", "offset", "max_chunk_bytes")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IF_NONE_MATCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    if_none_match: str
    version: str
    offset: int
    max_chunk_bytes: int
    def __init__(self, session_token: _Optional[str] = ..., if_none_match: _Optional[str] = ..., version: _Optional[str] = ..., offset: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("version", "total_size", "sha256", "run_id", "round", "not_modified", "offset", "payload_format")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    version: str
    total_size: int
    sha256: str
    run_id: int
    round: int
    not_modified: bool
    offset: int
    payload_format: str
    def __init__(self, version: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ..., not_modified: _Optional[bool] = ..., offset: _Optional[int] = ..., payload_format: _Optional[str] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: Chunk
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...
