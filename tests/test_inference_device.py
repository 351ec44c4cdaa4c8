"""Inference-only devices against a real coordinator on 127.0.0.1 (processes, digits).

A short run (2 devices, 2 rounds, HTTP API on), then `fedge client run
--inference-only` keeps the current model in its data folder, follows a
rollback, and `fedge predict` serves from that file. A download with one
byte flipped is refused and the previous good model stays installed.
"""

from __future__ import annotations

import http.server
import json
import re
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
from fedge.demo import _Proc, child_env, fedge_command, start, stop, wait_for_line

LISTEN = re.compile(r"^listening on (\S+):(\d+)$")
HTTP = re.compile(r"^HTTP API on (http://\S+)$")
INSTALLED = re.compile(r"^model: installed ([0-9a-f]{12})")

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
