"""The coordinator's HTTP API: health, model downloads, predictions, Prometheus metrics.

Its own port, bound to 127.0.0.1 unless configured otherwise. Authentication
(`server/http_auth.py`) is off by default, and then the server refuses to bind
beyond loopback; with `--http-auth mtls|token|any` it serves HTTPS and every
route but /healthz needs an enrolled device's certificate or a bearer token
with the route's scope (`read`, or `predict` for predictions).

- `GET /healthz`: liveness, and the current version.
- `GET /v1/models`: the registry, newest last.
- `GET /v1/models/{version}?format=fp32|fp16|int8|int4|onnx|onnx-int8`: an
  export file (`version` may be `current` or a unique prefix); ETag is the
  file's SHA-256. The ONNX formats are built from the fp32 / int8 export
  (`common/onnx_export.py`) and need the `onnx` package on the coordinator.
- `POST /v1/predict`: `{"inputs": [...]}`, one example or a batch, predicted
  with the current model. Every bad request gets a 4xx JSON body
  `{"error": code, "detail": message}`; the server keeps serving.
- `GET /metrics`: Prometheus text from `server/metrics.py`.
- `POST /v1/enroll`: enrollment over HTTPS, for devices without gRPC
  (`server/http_enroll.py`); the body and the answer are protobuf.

Predictions use the same loader as devices (`common/inference.py`) on an
export of the current version (fp32 by default), rebuilt when `current`
changes. Parsing and the model run in a worker thread, so a large request
does not stall the event loop; one lock serialises model calls, which keeps
latency predictable on a small CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedge.common.contract import ENROLL_HTTP_PATH, PROTOBUF_MEDIA_TYPE
from fedge.common.export import EXPORT_FORMATS, ModelFileError, parse_model_file
from fedge.common.inference import InputError, Predictor, load_predictor
from fedge.common.onnx_file import ONNX_FORMATS, ONNX_SOURCE_FORMAT, OnnxFileError
from fedge.server.enrollment_service import MAX_REQUEST_BYTES as MAX_ENROLL_BYTES
from fedge.server.enrollment_service import Enroller
from fedge.server.http_auth import AuthRefused, HttpAuth, Principal, check_bind, require
from fedge.server.http_enroll import EnrollHttpError, enroll_over_http
from fedge.server.metrics import Metrics
from fedge.server.registry import Registry, RegistryError

log = logging.getLogger(__name__)

DEFAULT_PREDICT_CAP = 256
"""Examples per predict request."""
DEFAULT_MAX_BODY_BYTES = 8 << 20
"""Bytes of a predict request body (256 Fashion-MNIST images as JSON are about 2 MB)."""
DEFAULT_HOST = "127.0.0.1"
DOWNLOAD_FORMATS = (*EXPORT_FORMATS, *ONNX_FORMATS)
PEER_CERT_EXTENSION = "fedge.peer_cert"
"""Where `_PeerCertH11` puts the TLS client certificate (DER) in a request's ASGI scope."""
_ONNX_CACHE_ENTRIES = 4

_STATUS_BY_REASON = {
    "not_found": 404,
    "missing_file": 404,
    "no_current": 404,
    "bad_ref": 400,
    "ambiguous": 400,
    "bad_format": 400,
}


class RequestError(Exception):
    """A request the API refuses: HTTP status, stable code, message for the caller."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(detail)


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


class _Serving:
    """The predictor of the current version, rebuilt when `current` changes."""

    def __init__(self, registry: Registry, fmt: str, kernels: str) -> None:
        self.registry = registry
        self.fmt = fmt
        self.kernels = kernels
        self.lock = threading.Lock()
        self.version: str | None = None
        self.predictor: Predictor | None = None

    def get(self) -> tuple[str, Predictor]:
        """(version, predictor) for the current version; call with `lock` held."""
        version = self.registry.current()
        if version is None:
            raise RequestError(503, "no_model", "no model has been promoted to current yet")
        if version != self.version or self.predictor is None:
            data = self.registry.export(version, self.fmt)
            task = self.registry.task(version)
            self.predictor = load_predictor(data, task=task, kernels=self.kernels)
            self.version = version
        return version, self.predictor


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_inputs(body: bytes) -> Any:
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        detail = str(e) if isinstance(e, ValueError) else "nested too deeply"
        raise RequestError(400, "not_json", f"the body is not valid JSON: {detail}") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "bad_request", 'the body must be a JSON object {"inputs": [...]}')
    if "inputs" not in doc:
        raise RequestError(400, "bad_request", 'missing "inputs": a list of examples')
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise RequestError(400, "bad_request", '"inputs" must be a list (one example or a batch)')
    return inputs


def make_http_app(
    registry: Registry,
    metrics: Metrics,
    *,
    predict_cap: int = DEFAULT_PREDICT_CAP,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    predict_format: str = "fp32",
    kernels: str = "auto",
    batch_size: int = 64,
    auth: HttpAuth | None = None,
    enroller: Enroller | None = None,
) -> FastAPI:
    """The FastAPI app over a registry and a metrics object (serve it with `HttpServer`).

    `predict_cap` bounds examples per request and `max_body_bytes` the request
    body; `predict_format` is the export the endpoint predicts with (fp32,
    or int8 to serve exactly what int8 devices run). `auth` (default: none)
    says who may call what; `HttpServer` refuses to expose an app without it.
    `enroller` (the coordinator's, shared with its gRPC enrollment port) turns
    on `POST /v1/enroll`.
    """
    if predict_format not in EXPORT_FORMATS:
        raise ValueError(f"predict_format must be one of {EXPORT_FORMATS}, not {predict_format!r}")
    if predict_cap < 1 or max_body_bytes < 1:
        raise ValueError("predict_cap and max_body_bytes must be positive")
    app = FastAPI(title="fedge coordinator", docs_url=None, redoc_url=None, openapi_url=None)
    serving = _Serving(registry, predict_format, kernels)
    policy = auth or HttpAuth("none")
    app.state.auth = policy
    onnx_cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()
    onnx_lock = threading.Lock()

    @app.exception_handler(AuthRefused)
    async def refused(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, AuthRefused)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"error": e.code, "detail": e.detail}, status_code=e.status,
                            headers=headers)

    def guard(request: Request, scope: str) -> Principal:
        """The caller, if it holds `scope`; raises AuthRefused (401/403) otherwise."""
        der = request.scope.get("extensions", {}).get(PEER_CERT_EXTENSION)
        principal = policy.authenticate(request.headers, der)
        require(principal, scope)
        return principal

    def export_bytes(version: str, fmt: str) -> bytes:
        """The file served for `?format=`: a registry export, or ONNX built from one."""
        if fmt not in ONNX_FORMATS:
            return registry.export(version, fmt)
        source = registry.export(version, ONNX_SOURCE_FORMAT[fmt])
        key = (hashlib.sha256(source).hexdigest(), fmt)
        with onnx_lock:
            if key in onnx_cache:
                onnx_cache.move_to_end(key)
                return onnx_cache[key]
        try:
            from fedge.common.onnx_export import to_onnx
        except ImportError:
            raise RequestError(501, "no_onnx", "this coordinator has no `onnx` package: "
                               "pip install 'fedge[onnx]'") from None
        try:
            data = to_onnx(parse_model_file(source), fmt)
        except (OnnxFileError, ModelFileError) as e:
            raise RequestError(422 if e.reason == "unsupported" else 500, e.reason,
                               str(e)) from None
        with onnx_lock:
            onnx_cache[key] = data
            while len(onnx_cache) > _ONNX_CACHE_ENTRIES:
                onnx_cache.popitem(last=False)
        return data

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "current": registry.current()}

    @app.get("/v1/models")
    def list_models(request: Request) -> Any:
        guard(request, "read")
        try:
            records = registry.list_models()
        except RegistryError as e:
            return _error(500, e.reason, str(e))
        return {"current": registry.current(), "models": [r.to_dict() for r in records]}

    @app.get("/v1/models/{version}")
    def download(version: str, request: Request, format: str = "fp32") -> Response:
        guard(request, "read")
        if format not in DOWNLOAD_FORMATS:
            return _error(400, "bad_format", f"format must be one of {', '.join(DOWNLOAD_FORMATS)}")
        try:
            full = registry.resolve(version)
            data = export_bytes(full, format)
        except RequestError as e:
            return _error(e.status, e.code, e.detail)
        except RegistryError as e:
            status = _STATUS_BY_REASON.get(e.reason, 500)
            if status == 500:
                log.error("export of %s failed: %s", version, e)
            return _error(status, e.reason, str(e))
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        suffix = "onnx" if format in ONNX_FORMATS else "pb"
        headers = {
            "ETag": etag,
            "X-Fedge-Version": full,
            "X-Fedge-Format": format,
            "Content-Disposition": f'attachment; filename="fedge-{full[:12]}-{format}.{suffix}"',
        }
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        media = "application/octet-stream" if suffix == "onnx" else PROTOBUF_MEDIA_TYPE
        return Response(data, media_type=media, headers=headers)

    def run_predict(body: bytes) -> dict[str, Any]:
        inputs = _parse_inputs(body)
        with serving.lock:
            version, predictor = serving.get()
            try:
                x = predictor.prepare(inputs)
            except InputError as e:
                raise RequestError(400, "bad_inputs", str(e)) from None
            if len(x) > predict_cap:
                raise RequestError(
                    413, "too_large", f"{len(x)} examples; at most {predict_cap} per request"
                )
            if len(x) == 0:
                raise RequestError(400, "bad_inputs", '"inputs" holds no examples')
            result = predictor.predict(x, batch_size=batch_size)
        return {
            "version": version,
            "format": predictor.info.format,
            "count": len(x),
            "predictions": [
                {"class": int(c), "label": predictor.label(int(c)), "score": float(s)}
                for c, s in zip(result.classes, result.scores, strict=True)
            ],
        }

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        await run_in_threadpool(guard, request, "predict")  # a device lookup reads SQLite
        start = time.perf_counter()
        outcome, examples = "ok", 0
        try:
            body = await _read_capped(request, max_body_bytes)
            answer = await run_in_threadpool(run_predict, body)
            examples = answer["count"]
            return JSONResponse(answer)
        except RequestError as e:
            outcome = {413: "too_large", 503: "no_model"}.get(e.status, "bad_request")
            return _error(e.status, e.code, e.detail)
        except (RegistryError, ModelFileError) as e:
            outcome = "error"
            log.error("predict: cannot load the current model: %s", e)
            return _error(500, "model_error", f"the current model cannot be loaded: {e}")
        finally:
            metrics.observe_predict(time.perf_counter() - start, examples=examples, outcome=outcome)

    @app.post(ENROLL_HTTP_PATH)
    async def enroll(request: Request) -> Response:
        # no guard: the one-time token in the body is the credential (the device has no
        # certificate yet); enroll_over_http refuses plain HTTP
        try:
            body = await _read_capped(request, MAX_ENROLL_BYTES)
            client_host = request.client.host if request.client is not None else ""
            reply = await run_in_threadpool(enroll_over_http, enroller, tls=policy.tls,
                                            body=body, client_host=client_host)
        except (RequestError, EnrollHttpError) as e:
            return _error(e.status, e.code, e.detail)
        return Response(reply, media_type=PROTOBUF_MEDIA_TYPE)

    @app.get("/metrics")
    def scrape(request: Request) -> Response:
        guard(request, "read")
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app


async def _read_capped(request: Request, cap: int) -> bytes:
    """The request body, refusing (413) more than `cap` bytes before holding them."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > cap:
            raise RequestError(413, "too_large", f"body of {declared} bytes; at most {cap}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise RequestError(413, "too_large", f"body over {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _PeerCertH11(H11Protocol):
    """uvicorn's h11 protocol that hands the TLS client certificate to the app.

    uvicorn gives ASGI apps no TLS details; asyncio completes the handshake
    before `connection_made`, so the certificate is read once per connection
    and put in each request's scope (`PEER_CERT_EXTENSION`, DER or None).
    """

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        inner = self.app

        async def with_cert(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})[PEER_CERT_EXTENSION] = der
            await inner(scope, receive, send)

        self.app = with_cert


@dataclass
class HttpServer:
    """uvicorn serving an app in a background thread; `start()` returns the bound port.

    The app's `HttpAuth` (from `make_http_app(auth=...)`) decides TLS and
    client certificates; `start()` refuses (`BindRefused`) a host beyond
    loopback without authentication before anything binds.
    """

    app: FastAPI
    host: str = DEFAULT_HOST
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def auth(self) -> HttpAuth:
        return getattr(self.app.state, "auth", None) or HttpAuth("none")

    @property
    def scheme(self) -> str:
        return "https" if self.auth.tls else "http"

    def start(self, timeout: float = 10.0) -> int:
        auth = self.auth
        check_bind(self.host, auth.mode, tls=auth.tls)
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            http=_PeerCertH11,
            **auth.ssl_options(),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fedge-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP API did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self.port

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None
