"""Every bench's code path, run at a tiny size, so none of them can silently break again.

Issue 14: `fedge bench transport` failed for weeks (its devices spoke
server-only TLS to a coordinator that demands mutual TLS) because no test ran
its code. Each test here runs one bench end to end at a size that takes
seconds, against the real parts (coordinator processes, mutual TLS on
127.0.0.1, SQLite), and checks the JSON keys and that the values are sane.
The bars themselves (speeds, megabytes) belong to the full-size runs in
`bench/results/`, not to tests on a shared machine. `fedge bench aggregate`
has its own file, tests/test_aggregate_bench.py.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedge.bench import codec_bench, edge_footprint, fleet_bench, inference_bench, transport_bench
from fedge.cli import app

pytestmark = pytest.mark.timeout(600)


def test_transport_bench_with_enrolled_mtls_devices() -> None:
    out = transport_bench.run(devices=3, pushes=2, idle=3, edge=False, repeats=1, settle_s=0.2)
    ingest, idle = out["ingest"], out["idle"]
    assert ingest["devices"] == 3 and ingest["pushes_per_device"] == 2
    assert "mutual TLS" in ingest["transport"] and "mutual TLS" in idle["transport"]
    assert ingest["payload_bytes"] > ingest["update_bytes"] > 1_000_000  # the int8 CNN update
    for mode in ("coordinator", "echo"):
        assert ingest[f"{mode}_mb_s"] > 0 and len(ingest[f"{mode}_runs"]) == 1
    assert ingest["ratio"] == pytest.approx(
        ingest["coordinator_mb_s"] / ingest["echo_mb_s"], abs=1e-3
    )
    assert ingest["ok"] == (ingest["ratio"] >= transport_bench.INGEST_RATIO_BAR)
    assert idle["devices"] == 3  # every enrolled device got in over mutual TLS
    assert idle["coordinator_rss_mb"] >= idle["coordinator_rss_mb_before"] > 0
    assert idle["ok"] == (idle["coordinator_rss_mb"] <= transport_bench.IDLE_RSS_BAR_MB)
    assert out["ok"] == (ingest["ok"] and idle["ok"])


def test_codec_bench_rows() -> None:
    rows = codec_bench.run(1, flat_elements=50_000, codecs=("int8", "int4"), cnn=False)
    assert [(r["codec"], r["tensor"]) for r in rows] == [
        ("int8", "flat-50000"), ("int4", "flat-50000")
    ]
    for r in rows:
        assert r["elements"] == 50_000
        assert r["bytes"] == pytest.approx(r["bytes_ratio"] * 200_000)
        assert 0 < r["rel_l2"] < 0.2 and r["encode_GBps"] > 0 and r["decode_GBps"] > 0
        assert r["memcpy_GBps"] > 0 and r["torch_ref_GBps"] > 0
    int8, int4 = rows
    assert int4["bytes_ratio"] < int8["bytes_ratio"] < 0.3


def test_inference_bench_small_training() -> None:
    try:
        out = inference_bench.run(
            test_examples=64, calls={1: 2, 64: 1}, train={"examples": 128}, threads=1
        )
    except FileNotFoundError as e:  # Fashion-MNIST is not installed here
        pytest.skip(str(e))
    assert out["training"]["examples"] == 128 and out["test_examples"] == 64
    assert out["parameters"] == 1_663_370
    assert {"fp32", "int8", "int4"} <= set(out["formats"])
    for row in out["formats"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["file_bytes"] > 0
    assert out["formats"]["int8"]["size_ratio"] < 0.3
    assert set(out["latency"]) == {"fp32", "int8", "int8-float"}
    assert all(isinstance(v, bool) for v in out["checks"].values())


def test_edge_footprint_waiting_and_bare_torch() -> None:
    waiting = edge_footprint.edge_idle_rss(idle_s=0.5, timeout_s=120)
    assert 0 < waiting["waiting_rss_mb"] <= waiting["waiting_max_rss_mb"]
    assert waiting["ok"] == (waiting["waiting_max_rss_mb"] <= edge_footprint.IDLE_LIMIT_MB)
    assert edge_footprint.bare_torch_peak_rss_mb(samples=32) > waiting["waiting_rss_mb"]


def test_fleet_bench_json_at_tiny_size() -> None:
    """Idle sizes, a round and a kill -9 storm of 100 devices (CI size), through the CLI;
    exactly-once counting checked in SQLite."""
    result = CliRunner().invoke(app, [
        "bench", "fleet", "--json", "--idle-sizes", "2,4", "--round-devices", "3",
        "--storm-devices", "100", "--per-worker", "50", "--settle", "0.2", "--window", "0.5",
    ])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["devices"] for r in out["idle"]] == [2, 4]
    for row in out["idle"]:
        assert row["coordinator_rss_mb"] > 0 and row["join_seconds"] >= 0
        assert 0 <= row["idle_cpu_percent"] <= 200
    assert isinstance(out["marginal_kb_per_device"], float)
    rnd = out["round"]
    assert rnd["devices"] == 3 and rnd["accepted"] == 3 and rnd["counted_once"] is True
    assert rnd["seconds"] > 0 and rnd["updates_per_s"] > 0 and rnd["coordinator_peak_rss_mb"] > 0
    storm = out["storm"]
    assert storm["devices"] == 100 and storm["rejoined"] == 100
    assert storm["lost"] == 0 and storm["double_counted"] == 0
    assert storm["rounds_completed"] == 2 and storm["killed_after_acks"] >= 1
    assert out["checks"]["round_counted_once"] and out["checks"]["storm_exactly_once"]
    assert out["heartbeat_interval_s"] == fleet_bench.HEARTBEAT_S


def test_fleet_bench_refuses_bad_sizes() -> None:
    result = CliRunner().invoke(app, ["bench", "fleet", "--idle-sizes", "10,x"])
    assert result.exit_code == 2
    assert "--idle-sizes" in result.output


def test_bench_devices_are_enrolled_as_enrollment_does(tmp_path) -> None:
    """Bulk-enrolled devices: CA-signed certificates whose fingerprints the registry holds."""
    from cryptography import x509

    from fedge.bench.bench_devices import enroll_devices, load, save
    from fedge.server.device_identity import peer_cert_facts
    from fedge.server.store import Store

    devices = enroll_devices(tmp_path / "state", 3)
    save(devices, tmp_path / "devices.json")
    assert load(tmp_path / "devices.json") == devices
    assert (tmp_path / "devices.json").stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate((tmp_path / "state" / "tls" / "ca.pem").read_bytes())
    with Store.open(tmp_path / "state" / "fedge.db") as store:
        for d in devices:
            cert = x509.load_pem_x509_certificate(d.cert_pem)
            cert.verify_directly_issued_by(ca)
            facts = peer_cert_facts(d.cert_pem)
            assert facts is not None and facts[1] == d.device_id
            row = store.get_device_by_fingerprint(facts[0])
            assert row is not None and row.id == d.device_id
    assert len({d.device_id for d in devices}) == 3
