"""`fedge client run --inference-only`: keep the coordinator's current model on this device.

The device does not train. It polls the coordinator's HTTP API,
`GET /v1/models/current?format=F` with `If-None-Match` = the SHA-256 of the
file it holds (the API's ETag), so an unchanged model costs one small 304.
A new file is verified completely before it is installed
(`fedge.common.export.parse_model_file`: size cap, hashes, metadata, every
tensor) and must be the version the coordinator named (`X-Fedge-Version` =
the file's `source-version`); then it replaces `<data>/model.<F>.pb`
atomically (temporary file, fsync, rename, fsync of the folder). A refused
download (a flipped byte, a truncated body, another version) is logged and
dropped: the previous good model stays, and the next poll tries again.
`fedge predict --model <data>/model.<F>.pb INPUT...` serves from that file,
with the device's personal head (`<data>/personal-head.npz`, common/personal.py)
in place of the global one when the device keeps one.

Why HTTP and not gRPC `FetchModel`: the HTTP API already serves verified,
content-hashed export files in every format (int8 is what a small device
runs), with ETags; `FetchModel` serves the store's fp32 training snapshot.
The cost: the HTTP API has no device authentication (mTLS identity, issue 5,
covers only the gRPC port), so this device is not a fleet member (it does
not join, and the coordinator does not list it). Integrity does not depend on
the transport: the file checks itself.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedge.common.atomic_file import atomic_write
from fedge.common.export import DEFAULT_MAX_MODEL_BYTES, ModelFileError, parse_model_file

log = logging.getLogger(__name__)

FORMATS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class CheckResult:
    """One poll: `outcome` is installed, unchanged, refused, none (nothing current) or error."""

    outcome: str
    version: str = ""
    detail: str = ""


def model_path(folder: Path, fmt: str) -> Path:
    """Where the device keeps its model: `<data>/model.<fmt>.pb`."""
    return Path(folder) / f"model.{fmt}.pb"


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
        self._stop = threading.Event()

    def installed(self) -> tuple[str, str] | None:
        """(file SHA-256, model version) of the installed model, if it is still good."""
        try:
            data = self.path.read_bytes()
            model = parse_model_file(data, max_bytes=self.max_bytes)
        except FileNotFoundError:
            return None
        except (OSError, ModelFileError) as e:
            log.warning("installed model %s is not usable (%s); fetching again", self.path, e)
            return None
        return hashlib.sha256(data).hexdigest(), str(model.metadata.get("source-version", ""))

    def check_once(self) -> CheckResult:
        """Ask for the current model once; install it if it changed and verifies."""
        held = self.installed()
        url = f"{self.base_url}/v1/models/current?format={self.fmt}"
        request = urllib.request.Request(url, headers={"Accept": "application/x-protobuf"})
        if held is not None:
            request.add_header("If-None-Match", f'"{held[0]}"')
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                version = response.headers.get("X-Fedge-Version", "")
                data = response.read(self.max_bytes + 1)
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return CheckResult("unchanged", held[1] if held else "")
            if e.code in (404, 503):
                return CheckResult("none", detail=f"HTTP {e.code}: no current model yet")
            return CheckResult("error", detail=f"HTTP {e.code}")
        except (OSError, urllib.error.URLError) as e:
            return CheckResult("error", detail=str(e))
        try:
            model = parse_model_file(data, max_bytes=self.max_bytes)
            source = str(model.metadata.get("source-version", ""))
            if version and source != version:
                raise ModelFileError(
                    "wrong_version", f"file is {source[:12]}, coordinator named {version[:12]}"
                )
            if model.format != self.fmt:
                raise ModelFileError("bad_format", f"asked for {self.fmt}, got {model.format}")
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


def run_cli(model_url: str, data: Path, *, fmt: str, interval_s: float) -> int:
    """The `--inference-only` command: poll until SIGTERM/SIGINT."""
    import signal

    device = InferenceDevice(model_url, data, fmt=fmt, interval_s=interval_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: device.stop())
    print(f"inference-only: keeping {device.path} current from {device.base_url}", flush=True)
    return device.run()
