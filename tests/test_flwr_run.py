"""fedge's own apps as a Flower app: `flwr run .` on Flower's simulation runtime, offline.

Real processes: a simulation SuperLink on 127.0.0.1 started here (it starts
`flower-superexec` and `flwr-simulation`), and the `flwr` CLI submitting this
repository. The ServerApp writes its round records to `report-path`; the
compressed uplink is asserted from the bytes the replies carried.
"""

from __future__ import annotations

import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from flower_processes import REPO, flower_env, local_superlink

from fedge.server.round_metrics import read_round_metrics
from fedge.server.run_config import DEFAULT_WHEN_EMPTY, validate_run_config
from fedge.server.server_app import ServerConfig

pytestmark = pytest.mark.timeout(600)

APP_CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]


def test_the_app_config_declares_every_server_key_at_the_servers_defaults() -> None:
    config = APP_CONFIG["config"]
    assert APP_CONFIG["components"] == {"serverapp": "fedge.server.server_app:app",
                                        "clientapp": "fedge.client.client_app:app"}
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        key = f.name.replace("_", "-")
        assert key in config, f"[tool.flwr.app.config] lacks {key!r} (flwr run cannot set it)"
        if key == "codec":
            assert config[key] == "int8"  # fedge's app compresses by default, as the coordinator
        elif key in DEFAULT_WHEN_EMPTY:
            assert config[key] == "" and getattr(defaults, f.name) is None
        else:
            assert config[key] == getattr(defaults, f.name), key
    assert ServerConfig.from_mapping(config) == ServerConfig(codec="int8")
    validate_run_config(config)  # the declared defaults run as they are


def test_flwr_run_of_fedges_app_compresses_the_uplink(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    report = tmp_path / "rounds.jsonl"
    with local_superlink(tmp_path, env) as connection:
        done = subprocess.run(
            ["flwr", "run", str(REPO), connection, "--stream",
             "--run-config", f'num-rounds=2 report-path="{report}"'],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480,
        )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "deprecated" not in out.lower(), out
    rounds = read_round_metrics(report)
    assert [r.round for r in rounds] == [1, 2], out
    for r in rounds:
        assert r.accepted == 2 and r.rejected == 0, (r, out)
        # bytes on the wire: every train message carried the fp32 model; each reply an
        # int8 delta, a quarter of it plus per-block scales and a header
        assert 0 < r.uplink_bytes <= 0.3 * r.downlink_bytes, r
        assert r.codec == "int8"  # read from the replies themselves
        assert r.accuracy is not None and r.accuracy > 0.5
