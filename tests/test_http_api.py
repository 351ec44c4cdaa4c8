"""The HTTP API against a real uvicorn server on 127.0.0.1, with httpx."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_registry import State, make_state

from fedge.common.export import parse_model_file
from fedge.server.http_api import HttpServer, make_http_app
from fedge.server.metrics import Metrics
from fedge.server.registry import Registry
from fedge.server.round_metrics import RoundMetrics

CAP = 16


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    s = make_state(tmp_path / "state")
    s.registry.promote(s.versions[2], reason="test")
    yield s
    s.store.close()


@pytest.fixture
def served(state: State) -> Iterator[tuple[httpx.Client, Metrics]]:
    metrics = Metrics()
    app = make_http_app(state.registry, metrics, predict_cap=CAP, max_body_bytes=64 << 10)
    server = HttpServer(app)  # 127.0.0.1, a free port
    port = server.start()
    assert server.host == "127.0.0.1" and port > 0
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client, metrics
    finally:
        server.stop()


def _examples(n: int, seed: int = 0) -> list:
    return np.random.default_rng(seed).random((n, 1, 8, 8)).round(3).tolist()


def test_health_and_model_list(served, state: State) -> None:
    client, _ = served
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "current": state.versions[2]}
    listed = client.get("/v1/models").json()
    assert listed["current"] == state.versions[2]
    assert [m["version"] for m in listed["models"]] == state.versions
    assert [m["status"] for m in listed["models"]] == [
        "candidate",
        "candidate",
        "current",
        "candidate",
    ]


def test_download_every_format(served, state: State) -> None:
    client, _ = served
    sizes = {}
    for fmt in ("fp32", "fp16", "int8", "int4"):
        r = client.get(f"/v1/models/{state.versions[1][:10]}", params={"format": fmt})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/x-protobuf"
        assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
        mf = parse_model_file(r.content)
        assert mf.format == fmt and mf.source_version == state.versions[1]
        sizes[fmt] = len(r.content)
        again = client.get(
            f"/v1/models/{state.versions[1]}",
            params={"format": fmt},
            headers={"If-None-Match": r.headers["etag"]},
        )
        assert again.status_code == 304 and again.content == b""
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    current = client.get("/v1/models/current")  # fp32 by default
    assert parse_model_file(current.content).source_version == state.versions[2]


def test_download_onnx_formats(served, state: State) -> None:
    from fedge.common.onnx_runtime import load_onnx_predictor

    client, _ = served
    x = np.asarray(_examples(6, seed=4), np.float32)
    for fmt, source in (("onnx", "fp32"), ("onnx-int8", "int8")):
        r = client.get(f"/v1/models/{state.versions[1][:10]}", params={"format": fmt})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].endswith(f'-{fmt}.onnx"')
        assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
        model = load_onnx_predictor(r.content)  # the seal holds; ONNX Runtime loads it
        assert model.info.format == fmt and model.info.source_version == state.versions[1]
        from fedge.common.inference import load_predictor

        torch_model = load_predictor(state.registry.export(state.versions[1], source),
                                     kernels="float")
        np.testing.assert_allclose(model.logits(x), torch_model.logits(x), atol=1e-4)
        again = client.get(f"/v1/models/{state.versions[1]}", params={"format": fmt},
                           headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304  # served from the same bytes: cached, deterministic


def test_download_errors(served) -> None:
    client, _ = served
    for path, params, status, code in (
        ("/v1/models/" + "f" * 64, {}, 404, "not_found"),
        ("/v1/models/zz", {}, 400, "bad_ref"),
        ("/v1/models/current", {"format": "int3"}, 400, "bad_format"),
    ):
        r = client.get(path, params=params)
        assert r.status_code == status and r.json()["error"] == code, r.text
        assert r.json()["detail"]


def test_predict_batch_and_single(served, state: State) -> None:
    client, _ = served
    r = client.post("/v1/predict", json={"inputs": _examples(5)})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["version"] == state.versions[2] and doc["count"] == 5
    assert all(
        0 <= p["class"] < 10 and p["label"] == str(p["class"]) and 0 < p["score"] <= 1
        for p in doc["predictions"]
    )
    one = client.post("/v1/predict", json={"inputs": _examples(1)[0]})
    assert one.status_code == 200 and one.json()["count"] == 1
    # the same inputs through the device's loader on the same export give the same classes
    from fedge.common.inference import load_predictor

    local = load_predictor(state.registry.export(state.versions[2], "fp32"))
    assert [p["class"] for p in doc["predictions"]] == local.predict(_examples(5)).classes.tolist()


def test_predict_follows_current(served, state: State) -> None:
    client, _ = served
    state.registry.promote(state.versions[3])
    assert (
        client.post("/v1/predict", json={"inputs": _examples(2)}).json()["version"]
        == (state.versions[3])
    )
    state.registry.rollback()
    assert (
        client.post("/v1/predict", json={"inputs": _examples(2)}).json()["version"]
        == (state.versions[2])
    )


BAD_REQUESTS = [
    # (what, body bytes, status, error code, words in the message)
    ("wrong shape", json.dumps({"inputs": [[[0.0] * 7] * 8]}), 400, "bad_inputs", "expected"),
    ("wrong rank", json.dumps({"inputs": [1.0, 2.0]}), 400, "bad_inputs", "expected"),
    ("strings", json.dumps({"inputs": [[["a"] * 8] * 8]}), 400, "bad_inputs", "strings"),
    ("booleans", json.dumps({"inputs": [[[True] * 8] * 8]}), 400, "bad_inputs", "booleans"),
    ("nulls", json.dumps({"inputs": [[[None] * 8] * 8]}), 400, "bad_inputs", "numbers"),
    ("ragged", json.dumps({"inputs": [[[0.0] * 8] * 7 + [[0.0]]]}), 400, "bad_inputs", "ragged"),
    ("NaN literal", '{"inputs": [[[NaN]]]}', 400, "not_json", "NaN"),
    ("huge number", json.dumps({"inputs": [[[1e300] * 8] * 8]}), 400, "bad_inputs", "float32"),
    ("not JSON", "inputs=1,2,3", 400, "not_json", "not valid JSON"),
    ("truncated JSON", '{"inputs": [[[0.1, ', 400, "not_json", "not valid JSON"),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, 413, "too_large", "bytes"),
    ("not an object", "[1, 2]", 400, "bad_request", "JSON object"),
    ("no inputs", '{"input": []}', 400, "bad_request", "missing"),
    ("inputs not a list", '{"inputs": "x"}', 400, "bad_request", "list"),
    ("empty batch", '{"inputs": []}', 400, "bad_inputs", ""),
    ("over the cap", json.dumps({"inputs": _examples(CAP + 1)}), 413, "too_large", "at most"),
    ("body too large", json.dumps({"inputs": _examples(300)}), 413, "too_large", "bytes"),
]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served) -> None:
    client, _ = served
    seen = {}
    for what, body, status, code, words in BAD_REQUESTS:
        r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (what, r.status_code, r.text)
        doc = r.json()
        assert doc["error"] == code, (what, doc)
        assert words in doc["detail"], (what, doc["detail"])
        seen[status] = seen.get(status, 0) + 1
        # still serving after every bad request
        ok = client.post("/v1/predict", json={"inputs": _examples(1)})
        assert ok.status_code == 200, what
    deep = client.post("/v1/predict", content="[" * 20_000 + "]" * 20_000)
    assert deep.status_code == 400 and deep.json()["error"] in ("not_json", "bad_request")
    assert client.get("/healthz").status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    by_outcome = {
        s.labels["outcome"]: s.value
        for s in families["fedge_predict_requests"].samples
        if s.name.endswith("_total")
    }
    assert by_outcome["ok"] == len(BAD_REQUESTS)
    assert by_outcome["too_large"] == seen[413]
    assert by_outcome["bad_request"] == seen[400] + 1


def test_predict_without_a_current_model_is_503(tmp_path: Path) -> None:
    s = make_state(tmp_path / "fresh", rounds=1)
    server = HttpServer(make_http_app(Registry(s.store, s.models), Metrics()))
    port = server.start()
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": _examples(1)})
        assert r.status_code == 503 and r.json()["error"] == "no_model"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["current"] is None
    finally:
        server.stop()
        s.store.close()


def test_metrics_scrape_matches_what_was_recorded(served) -> None:
    client, metrics = served
    rounds = [
        RoundMetrics(
            round=1,
            seconds=3.0,
            rejected=2,
            rejected_reasons={"non_finite": 1, "shape_mismatch": 1},
        ),
        RoundMetrics(round=2, seconds=42.0),
        RoundMetrics(round=3, seconds=7.5, rejected=1, rejected_reasons={"non_finite": 1}),
    ]
    for record in rounds:
        metrics.observe_round(record)
    metrics.set_devices_connected(3)
    metrics.add_bytes_in(1_000)
    metrics.add_bytes_in(234)
    metrics.add_bytes_out(5_000_000)
    metrics.update_rejected("Bad Reason!")  # not a short code: counted as "other"
    for n in (1, 4):
        assert client.post("/v1/predict", json={"inputs": _examples(n)}).status_code == 200

    scrape = client.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(scrape.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("fedge_rounds_completed_total", ())] == 3
    assert samples[("fedge_devices_connected", ())] == 3
    assert samples[("fedge_bytes_in_total", ())] == 1_234
    assert samples[("fedge_bytes_out_total", ())] == 5_000_000
    assert samples[("fedge_rejected_updates_total", (("reason", "non_finite"),))] == 2
    assert samples[("fedge_rejected_updates_total", (("reason", "shape_mismatch"),))] == 1
    assert samples[("fedge_rejected_updates_total", (("reason", "other"),))] == 1
    assert samples[("fedge_round_duration_seconds_count", ())] == 3
    assert samples[("fedge_round_duration_seconds_sum", ())] == pytest.approx(52.5)
    assert samples[("fedge_round_duration_seconds_bucket", (("le", "10.0"),))] == 2
    assert samples[("fedge_predict_latency_seconds_count", ())] == 2
    assert samples[("fedge_predict_examples_total", ())] == 5
    assert samples[("fedge_predict_requests_total", (("outcome", "ok"),))] == 2


def test_separate_metrics_do_not_share_counts() -> None:
    a, b = Metrics(), Metrics()
    a.round_completed(1.0)
    body, content_type = b.exposition()
    assert b"fedge_rounds_completed_total 0.0" in body and "text/plain" in content_type
