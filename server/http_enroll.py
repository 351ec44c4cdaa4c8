"""`POST /v1/enroll` on the HTTP API: enrollment for devices without gRPC.

An inference-only device fetches its models over HTTPS with its certificate
(client/inference_device.py); with enrollment here too it needs no gRPC at
all, which keeps grpcio (18 MB on arm64) out of its install. The call is the
gRPC `Enroll`: the body is an `EnrollRequest`, the answer an `EnrollReply`
(`application/x-protobuf` both ways), and the same `Enroller` checks it, so
both ports share one rate limit, one token book and one audit trail.

Only over HTTPS: the token would otherwise travel in plaintext, so on a plain
HTTP API (no `--http-auth`) the route answers 403 and says how to turn TLS
on. The caller needs no certificate (it has none yet); the token is its
credential. Refusals are JSON `{"error", "detail"}` with the status the gRPC
code maps to (400, 401, 429), as on the API's other routes.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from fedge.server.enrollment_service import MAX_REQUEST_BYTES, Enroller, EnrollmentRefused
from fedge.server.rate_limit import source_of_address
from fedge.v1 import enrollment_pb2

HTTP_STATUS_BY_CODE = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429}


class EnrollHttpError(Exception):
    """A refused HTTP enrollment: status, stable code, message for the caller."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(detail)


def enroll_over_http(enroller: Enroller | None, *, tls: bool, body: bytes,
                     client_host: str) -> bytes:
    """The serialized `EnrollReply` for one request body; raises `EnrollHttpError`."""
    if enroller is None:
        raise EnrollHttpError(404, "no_enrollment",
                              "this coordinator enrolls devices only on its gRPC port")
    if not tls:
        raise EnrollHttpError(403, "needs_https", "enrollment sends a token: the HTTP API "
                              "must serve HTTPS (start the coordinator with --http-auth "
                              "mtls|token|any)")
    if len(body) > MAX_REQUEST_BYTES:
        raise EnrollHttpError(413, "too_large", f"body over {MAX_REQUEST_BYTES} bytes")
    request = enrollment_pb2.EnrollRequest()
    try:
        request.ParseFromString(body)
    except DecodeError:
        raise EnrollHttpError(400, "bad_request",
                              "the body is not a fedge.v1.EnrollRequest") from None
    try:
        reply = enroller.enroll(request, source_of_address(client_host))
    except EnrollmentRefused as e:
        raise EnrollHttpError(HTTP_STATUS_BY_CODE.get(e.code, 400), e.code.lower(),
                              e.message) from None
    return reply.SerializeToString()
