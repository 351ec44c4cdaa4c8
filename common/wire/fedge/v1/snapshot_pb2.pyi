from fedge.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelSnapshot(_message.Message):
    __slots__ = ("version", "tensors", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    version: str
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.EncodedTensor]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, version: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.EncodedTensor, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
