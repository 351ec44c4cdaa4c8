from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SparseIndices(_message.Message):
    __slots__ = ("count", "delta_varint")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DELTA_VARINT_FIELD_NUMBER: _ClassVar[int]
    count: int
    delta_varint: bytes
    def __init__(self, count: _Optional[int] = ..., delta_varint: _Optional[bytes] = ...) -> None: ...

class QuantizedTensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "bits", "block_size", "scales", "scale_dtype", "values", "indices", "codebook")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    SCALE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    CODEBOOK_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    bits: int
    block_size: int
    scales: bytes
    scale_dtype: DType
    values: bytes
    indices: SparseIndices
    codebook: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., bits: _Optional[int] = ..., block_size: _Optional[int] = ..., scales: _Optional[bytes] = ..., scale_dtype: _Optional[_Union[DType, str]] = ..., values: _Optional[bytes] = ..., indices: _Optional[_Union[SparseIndices, _Mapping]] = ..., codebook: _Optional[bytes] = ...) -> None: ...

class EncodedTensor(_message.Message):
    __slots__ = ("dense", "quantized")
    DENSE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    dense: Tensor
    quantized: QuantizedTensor
    def __init__(self, dense: _Optional[_Union[Tensor, _Mapping]] = ..., quantized: _Optional[_Union[QuantizedTensor, _Mapping]] = ...) -> None: ...
