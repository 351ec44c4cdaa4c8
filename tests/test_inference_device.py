"""Inference-only devices against a real coordinator on 127.0.0.1 (processes, digits).

A short run (2 devices, 2 rounds, HTTP API on), then `fedge client run
--inference-only` keeps the current model in its data folder, follows a
rollback, and `fedge predict` serves from that file. A download with one
byte flipped is refused and the previous good model stays installed.

With TLS and `--http-auth mtls`, an inference-only device enrolls like any
other (`fedge enroll`, over the HTTP API), fetches the ONNX int8 model with
its certificate and predicts with numpy in processes where torch, Flower,
ONNX Runtime, rich and gRPC cannot be imported; revoked, it is refused on its
next poll.
"""

from __future__ import annotations

import http.server
import json
import re
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedge.client.inference_device import InferenceDevice, model_path
from fedge.common.export import parse_model_file
from fedge.demo import _Proc, child_env, enroll_devices, fedge_command, start, stop, wait_for_line

LISTEN = re.compile(r"^listening on (\S+):(\d+)$")
HTTP = re.compile(r"^HTTP API on (http://\S+)$")
INSTALLED = re.compile(r"^model: installed ([0-9a-f]{12})")
CA = re.compile(r"^TLS on: devices need --ca (.+)$")
ENROLL = re.compile(r"^enrollment on (\S+):(\d+)$")
HTTPS = re.compile(r"^HTTP API on (https://\S+) \(auth: mtls\)$")
NO_TORCH = """import sys
for name in ("torch", "flwr", "ray"):  # as if not installed: imports raise, find_spec is None
    sys.modules[name] = None
"""
SMALL_INSTALL = NO_TORCH.replace('"ray")', '"ray", "onnxruntime", "rich", "grpc")')
"""What `fedge[inference]` leaves out too: ONNX Runtime (numpy runs the .onnx file), rich
(typer-slim) and gRPC (it enrolls over HTTPS)."""

pytestmark = pytest.mark.timeout(240)


class _FlippingProxy:
    """Serves the coordinator's answer with one byte flipped (ignores If-None-Match)."""

    def __init__(self, upstream: str, offset: int) -> None:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                r = httpx.get(upstream + self.path, timeout=10)
                body = bytearray(r.content)
                body[proxy.offset % len(body)] ^= 0x01
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("X-Fedge-Version", r.headers["X-Fedge-Version"])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(bytes(body))

            def log_message(self, *args: object) -> None:
                pass

        self.offset = offset
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_inference_only_device_follows_current_and_refuses_a_flipped_byte(
    tmp_path: Path,
) -> None:
    procs: list[_Proc] = []
    state = tmp_path / "state"
    try:
        coord = start("coordinator", fedge_command(
            "coordinator", "run", "--state", str(state), "--port", "0", "--insecure",
            "--heartbeat-interval", "1", "--task", "digits", "--codec", "int8",
            "--rounds", "2", "--min-devices", "2", "--round-timeout", "60",
            "--keep-serving", "--http-port", "0", "--run-config", "local-epochs=1",
        ), echo=False, log_path=tmp_path / "coordinator.log")
        procs.append(coord)
        listen = wait_for_line(coord, LISTEN, 90)
        target = f"{listen.group(1)}:{listen.group(2)}"
        api = wait_for_line(coord, HTTP, 30).group(1)
        for i in range(2):
            procs.append(start(f"dev{i}", fedge_command(
                "client", "run", "--coordinator", target, "--insecure",
                "--data", str(tmp_path / f"dev{i}"), "--partition-id", str(i),
                "--num-partitions", "2", "--max-backoff", "1",
            ), echo=False, log_path=tmp_path / f"dev{i}.log"))
        wait_for_line(coord, re.compile(r"^serving on"), 150)
        current = httpx.get(f"{api}/healthz", timeout=10).json()["current"]
        assert current
        scrape = {s.name: s.value for f in text_string_to_metric_families(
            httpx.get(f"{api}/metrics", timeout=10).text) for s in f.samples}
        assert scrape["fedge_rounds_completed_total"] == 2  # the rounds just run
        assert scrape["fedge_round_duration_seconds_count"] == 2
        assert scrape["fedge_bytes_in_total"] > 0 and scrape["fedge_bytes_out_total"] > 0

        # the inference-only device installs current
        data = tmp_path / "viewer"
        viewer = start("viewer", fedge_command(
            "client", "run", "--inference-only", "--model-url", api, "--data", str(data),
            "--poll-interval", "0.3",
        ), echo=False, log_path=tmp_path / "viewer.log")
        procs.append(viewer)
        assert wait_for_line(viewer, INSTALLED, 60).group(1) == current[:12]
        installed = model_path(data, "int8")
        first = parse_model_file(installed.read_bytes())
        assert first.metadata["source-version"] == current and first.format == "int8"

        # it follows a change of current (a rollback) within a few polls
        rollback = subprocess.run(
            fedge_command("coordinator", "models", "rollback", "--state", str(state)),
            capture_output=True, text=True, env=child_env(), timeout=120,
        )
        assert rollback.returncode == 0, rollback.stderr
        previous = httpx.get(f"{api}/healthz", timeout=10).json()["current"]
        assert previous and previous != current
        deadline = time.monotonic() + 120  # guards a hang only: it follows within a few polls
        while not any(line.startswith(f"model: installed {previous[:12]}")
                      for line in viewer.lines):
            assert time.monotonic() < deadline, viewer.lines
            time.sleep(0.2)
        good = installed.read_bytes()
        assert parse_model_file(good).metadata["source-version"] == previous

        # `fedge predict` serves from the device's file, no training
        from sklearn.datasets import load_digits

        x = (load_digits().images[:5] / 16.0).astype(np.float32).reshape(5, 1, 8, 8)
        inputs = tmp_path / "x.json"
        inputs.write_text(json.dumps({"inputs": x.tolist()}))
        predicted = subprocess.run(
            fedge_command("predict", "--model", str(installed), "--json", str(inputs)),
            capture_output=True, text=True, env=child_env(), timeout=120,
        )
        assert predicted.returncode == 0, predicted.stderr
        assert len(json.loads(predicted.stdout)["predictions"]) == 5

        # one byte flipped in transit: refused, the previous good model stays
        viewer.popen.terminate()
        assert viewer.popen.wait(15) == 0
        size = len(good)
        for offset in (size // 3, size - 7):
            proxy = _FlippingProxy(api, offset)
            try:
                device = InferenceDevice(proxy.url, data, fmt="int8")
                result = device.check_once()
            finally:
                proxy.close()
            assert result.outcome == "refused", result
            assert installed.read_bytes() == good
        # ... and a device without a model installs nothing
        proxy = _FlippingProxy(api, 100)
        try:
            fresh = InferenceDevice(proxy.url, tmp_path / "fresh", fmt="int8")
            assert fresh.check_once().outcome == "refused"
        finally:
            proxy.close()
        assert not model_path(tmp_path / "fresh", "int8").exists()
        # the genuine file passes again (304: nothing to download)
        assert InferenceDevice(api, data, fmt="int8").check_once().outcome == "unchanged"
    finally:
        stop(procs)


def test_enrolled_inference_only_device_fetches_onnx_with_its_certificate(
    tmp_path: Path,
) -> None:
    procs: list[_Proc] = []
    state = tmp_path / "state"
    (tmp_path / "no-torch").mkdir()
    (tmp_path / "no-torch" / "sitecustomize.py").write_text(SMALL_INSTALL)
    no_torch = {"PYTHONPATH": str(tmp_path / "no-torch")}
    try:
        coord = start("coordinator", fedge_command(
            "coordinator", "run", "--state", str(state), "--port", "0", "--enroll-port", "0",
            "--heartbeat-interval", "1", "--task", "digits", "--codec", "int8",
            "--rounds", "1", "--min-devices", "2", "--round-timeout", "60",
            "--keep-serving", "--http-port", "0", "--http-auth", "mtls",
            "--run-config", "local-epochs=1",
        ), echo=False, log_path=tmp_path / "coordinator.log")
        procs.append(coord)
        ca = wait_for_line(coord, CA, 90).group(1)
        wait_for_line(coord, LISTEN, 90)
        api = wait_for_line(coord, HTTPS, 30).group(1)
        enroll_at = wait_for_line(coord, ENROLL, 30)
        enroll_target = f"{enroll_at.group(1)}:{enroll_at.group(2)}"
        enroll_devices(state, enroll_target, Path(ca), [tmp_path / "dev0", tmp_path / "dev1"])
        for i in range(2):
            procs.append(start(f"dev{i}", fedge_command(
                "client", "run", "--data", str(tmp_path / f"dev{i}"), "--partition-id", str(i),
                "--num-partitions", "2", "--max-backoff", "1",
            ), echo=False, log_path=tmp_path / f"dev{i}.log"))

        # the viewer enrolls with `fedge enroll` over the HTTP API (no gRPC), the token in the
        # environment
        from fedge.server.store import Store
        from fedge.server.tokens import TokenBook

        with Store.open(state / "fedge.db") as store:
            token = TokenBook(store).create(ttl_s=300, label="viewer").token
        viewer_data = tmp_path / "viewer"
        enrolled = subprocess.run(
            fedge_command("enroll", "--coordinator", api, "--ca", ca,
                          "--data", str(viewer_data), "--name", "viewer"),
            capture_output=True, text=True, timeout=120,
            env=child_env({"FEDGE_ENROLL_TOKEN": token, **no_torch}),
        )
        assert enrolled.returncode == 0, enrolled.stderr
        device_id = json.loads((viewer_data / "identity" / "enrollment.json").read_text())[
            "device_id"]
        wait_for_line(coord, re.compile(r"^serving on"), 150)
        trust = ssl.create_default_context(cafile=ca)  # no client certificate
        anonymous = httpx.get(f"{api}/v1/models", verify=trust, timeout=10)
        assert anonymous.status_code == 401, anonymous.text  # mtls: models need a certificate
        identity = viewer_data / "identity"
        trust.load_cert_chain(identity / "device.pem", identity / "device.key")
        current = httpx.get(f"{api}/healthz", verify=trust, timeout=10).json()["current"]
        assert current

        viewer = start("viewer", fedge_command(
            "client", "run", "--inference-only", "--model-url", api, "--data", str(viewer_data),
            "--model-format", "onnx-int8", "--poll-interval", "0.3",
        ), echo=False, log_path=tmp_path / "viewer.log", env=child_env(no_torch))
        procs.append(viewer)
        assert wait_for_line(viewer, INSTALLED, 60).group(1) == current[:12]
        installed = model_path(viewer_data, "onnx-int8")
        assert installed.name == "model.onnx-int8.onnx"

        from sklearn.datasets import load_digits

        x = (load_digits().images[:5] / 16.0).astype(np.float32).reshape(5, 1, 8, 8)
        inputs = tmp_path / "x.json"
        inputs.write_text(json.dumps({"inputs": x.tolist()}))
        predicted = subprocess.run(
            fedge_command("predict", "--model", str(installed), "--json", str(inputs)),
            capture_output=True, text=True, env=child_env(no_torch), timeout=120,
        )
        assert predicted.returncode == 0, predicted.stderr
        doc = json.loads(predicted.stdout)
        assert doc["model"]["source_version"] == current
        assert doc["model"]["kernels"] == "numpy" and len(doc["predictions"]) == 5
        from fedge.common.onnx_runtime import load_onnx_predictor

        ort = load_onnx_predictor(installed, runtime="onnxruntime").predict(x).classes.tolist()
        assert [p["class"] for p in doc["predictions"]] == ort

        # revoked: the next poll is refused, the installed model stays
        good = installed.read_bytes()
        revoked = subprocess.run(
            fedge_command("coordinator", "devices", "revoke", device_id, "--state", str(state)),
            capture_output=True, text=True, env=child_env(), timeout=120,
        )
        assert revoked.returncode == 0, revoked.stderr
        line = wait_for_line(viewer, re.compile(r"^model: denied .*403.*"), 30)
        assert "revoked" in line.group(0)
        assert installed.read_bytes() == good
    finally:
        stop(procs)
