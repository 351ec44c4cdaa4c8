"""`fedge client run --inference-only`: keep the coordinator's current model on this device.

The device does not train. It polls the coordinator's HTTP API,
`GET /v1/models/current?format=F` with `If-None-Match` = the SHA-256 of the
file it holds (the API's ETag), so an unchanged model costs one small 304.
A new file is verified completely before it is installed (a `.pb` export by
`fedge.common.export.parse_model_file`: size cap, hashes, metadata, every
tensor; an `.onnx` export by its seal and by its runtime loading it) and must
be the version the coordinator named (`X-Fedge-Version` = the file's
`source-version`); then it replaces `<data>/model.<F>.pb` (or `.onnx`)
atomically (temporary file, fsync, rename, fsync of the folder). A refused
download (a flipped byte, a truncated body, another version) is logged and
dropped: the previous good model stays, and the next poll tries again.
`fedge predict --model <data>/model.<F>.onnx INPUT...` serves from that file;
with the ONNX formats the device needs no torch at all (`fedge[inference]`:
numpy runs the file; ONNX Runtime does where it is installed).
A `.pb` model is served with the device's personal head
(`<data>/personal-head.npz`, common/personal.py) in place of the global one
when the device keeps one.

Identity: a device enrolled with `fedge enroll` (its `<data>/identity/`)
presents its certificate to an `https://` model URL (mutual TLS, trusting the
coordinator's CA from the enrollment), so the coordinator's HTTP API with
`--http-auth mtls|any` knows which device calls and refuses revoked ones. A
device without an identity may present a bearer token instead, read from
the environment (`FEDGE_HTTP_TOKEN`, never the command line, where `ps`
shows it). Why HTTP and not gRPC `FetchModel`: the HTTP API serves verified,
content-hashed export files in every format (int8 and ONNX are what a small
device runs), with ETags; `FetchModel` serves the store's fp32 training
snapshot. Integrity does not depend on the transport: the file checks itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedge.common.atomic_file import atomic_write
from fedge.common.contract import PROTOBUF_MEDIA_TYPE
from fedge.common.export import DEFAULT_MAX_MODEL_BYTES, ModelFileError, parse_model_file
from fedge.common.onnx_file import ONNX_FORMATS, OnnxFileError

log = logging.getLogger(__name__)

FORMATS = ("fp32", "fp16", "int8", "int4", *ONNX_FORMATS)
TOKEN_ENV = "FEDGE_HTTP_TOKEN"
"""Environment variable holding a bearer token for the HTTP API (a systemd EnvironmentFile)."""


@dataclass(frozen=True)
class CheckResult:
    """One poll: `outcome` is installed, unchanged, refused, none (nothing current) or error."""

    outcome: str
    version: str = ""
    detail: str = ""


def model_path(folder: Path, fmt: str) -> Path:
    """Where the device keeps its model: `<data>/model.<fmt>.pb`, or `.onnx` for ONNX."""
    return Path(folder) / f"model.{fmt}.{'onnx' if fmt in ONNX_FORMATS else 'pb'}"


def verify_model(
    data: bytes, fmt: str, *, max_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> tuple[str, str]:
    """(format, source version) of a model file meant to be `fmt`, verified completely.

    Raises ModelFileError. ONNX files are checked by their seal, then loaded by
    the runtime `fedge predict` will use (ONNX Runtime, or numpy where it is not
    installed), so a graph it cannot run is refused here, not at the first
    prediction.
    """
    if fmt in ONNX_FORMATS:
        try:
            from fedge.common.onnx_runtime import load_onnx_predictor

            info = load_onnx_predictor(data, max_bytes=max_bytes).info
        except OnnxFileError as e:
            raise ModelFileError(e.reason, e.detail) from None
        return info.format, info.source_version
    model = parse_model_file(data, max_bytes=max_bytes)
    return model.format, str(model.metadata.get("source-version", ""))


def device_ssl_context(data: Path) -> ssl.SSLContext | None:
    """Mutual TLS with the enrolled identity in `data` (None if this device has none)."""
    if not (Path(data).expanduser() / "identity" / "enrollment.json").exists():
        return None
    from fedge.client.enroll import load_credentials

    creds = load_credentials(data)  # EnrollError if the identity is damaged
    context = ssl.create_default_context(cafile=str(creds.ca_path))
    context.load_cert_chain(str(creds.cert_path), str(creds.key_path))
    return context


class InferenceDevice:
    """Polls `base_url` for the current model and keeps a verified copy in `folder`."""

    def __init__(
        self,
        base_url: str,
        folder: Path,
        *,
        fmt: str = "int8",
        interval_s: float = 10.0,
        timeout_s: float = 30.0,
        max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        token: str = "",
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"model URL {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.folder = Path(folder)
        self.fmt = fmt
        self.interval_s = float(interval_s)
        self.timeout_s = float(timeout_s)
        self.max_bytes = int(max_bytes)
        self.path = model_path(self.folder, fmt)
        self.ssl_context = ssl_context
        self.token = token
        if (ssl_context is not None or token) and not self.base_url.startswith("https://"):
            raise ValueError(f"model URL {base_url!r}: a certificate or token needs https://")
        self._stop = threading.Event()

    def installed(self) -> tuple[str, str] | None:
        """(file SHA-256, model version) of the installed model, if it is still good."""
        try:
            data = self.path.read_bytes()
            _, source = verify_model(data, self.fmt, max_bytes=self.max_bytes)
        except FileNotFoundError:
            return None
        except (OSError, ModelFileError) as e:
            log.warning("installed model %s is not usable (%s); fetching again", self.path, e)
            return None
        return hashlib.sha256(data).hexdigest(), source

    def check_once(self) -> CheckResult:
        """Ask for the current model once; install it if it changed and verifies."""
        held = self.installed()
        url = f"{self.base_url}/v1/models/current?format={self.fmt}"
        request = urllib.request.Request(url, headers={"Accept": PROTOBUF_MEDIA_TYPE})
        if held is not None:
            request.add_header("If-None-Match", f'"{held[0]}"')
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout_s, context=self.ssl_context
            ) as response:
                version = response.headers.get("X-Fedge-Version", "")
                data = response.read(self.max_bytes + 1)
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return CheckResult("unchanged", held[1] if held else "")
            if e.code in (404, 503):
                return CheckResult("none", detail=f"HTTP {e.code}: no current model yet")
            if e.code in (401, 403):
                return CheckResult("denied", detail=f"HTTP {e.code}: {_error_detail(e)}")
            return CheckResult("error", detail=f"HTTP {e.code}")
        except (OSError, urllib.error.URLError) as e:
            return CheckResult("error", detail=str(e))
        try:
            fmt, source = verify_model(data, self.fmt, max_bytes=self.max_bytes)
            if version and source != version:
                raise ModelFileError(
                    "wrong_version", f"file is {source[:12]}, coordinator named {version[:12]}"
                )
            if fmt != self.fmt:
                raise ModelFileError("bad_format", f"asked for {self.fmt}, got {fmt}")
        except ModelFileError as e:
            log.warning("refused model from %s (%s): %s; keeping the installed one",
                        url, e.reason, e.detail)
            return CheckResult("refused", version, f"{e.reason}: {e.detail}")
        if held is not None and held[0] == hashlib.sha256(data).hexdigest():
            return CheckResult("unchanged", source)
        atomic_write(self.path, data, prefix=".tmp-model-", make_parents=True)
        log.info("installed model %s (%s, %d bytes) at %s", source[:12], self.fmt, len(data),
                 self.path)
        return CheckResult("installed", source)

    def run(self) -> int:
        """Poll until `stop()`; returns an exit code (0)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        last = None
        while not self._stop.is_set():
            result = self.check_once()
            if result.outcome in ("installed", "refused") or result.outcome != last:
                print(f"model: {result.outcome} {result.version[:12]} {result.detail}".rstrip(),
                      flush=True)
            last = result.outcome
            self._stop.wait(self.interval_s)
        return 0

    def stop(self) -> None:
        self._stop.set()


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The API's one-line `detail` from an error body, if it has one."""
    import json

    try:
        return str(json.loads(e.read(4096)).get("detail", ""))[:200]
    except (ValueError, AttributeError, OSError):
        return ""


def run_cli(model_url: str, data: Path, *, fmt: str, interval_s: float) -> int:
    """The `--inference-only` command: poll until SIGTERM/SIGINT.

    An enrolled `data` folder presents its certificate to an https:// URL; a
    bearer token comes from `FEDGE_HTTP_TOKEN`. Raises ValueError (the CLI
    prints it, exit 2) for options that cannot work.
    """
    import signal

    from fedge.client.enroll import EnrollError

    https = model_url.startswith("https://")
    try:
        context = device_ssl_context(data) if https else None
    except (EnrollError, OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot use the identity in {data}: {e}") from None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token and not https:
        raise ValueError(f"{TOKEN_ENV} is set but {model_url} is not https://: "
                         "a token must not travel in plaintext")
    device = InferenceDevice(model_url, data, fmt=fmt, interval_s=interval_s,
                             ssl_context=context, token=token)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: device.stop())
    who = "with this device's certificate" if context else ("with a token" if token else "")
    print(f"inference-only: keeping {device.path} current from {device.base_url} {who}".rstrip(),
          flush=True)
    return device.run()
