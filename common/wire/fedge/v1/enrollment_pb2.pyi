from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token", "csr_pem", "device_name")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr_pem: bytes
    device_name: str
    def __init__(self, token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., device_name: _Optional[str] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("device_id", "certificate_pem", "ca_chain_pem", "device_port", "node_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PORT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    certificate_pem: bytes
    ca_chain_pem: bytes
    device_port: int
    node_id: int
    def __init__(self, device_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_chain_pem: _Optional[bytes] = ..., device_port: _Optional[int] = ..., node_id: _Optional[int] = ...) -> None: ...
