"""What `fedge coordinator run` does to its state folder on start (a real process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

FEDGE = [sys.executable, "-c", "from fedge.cli import app; app()"]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def test_partial_uploads_are_emptied_on_start(tmp_path: Path) -> None:
    """docs/coordinator.md: `uploads/` is emptied when the coordinator starts (a partial
    result from before a restart belongs to a round that re-runs, so it can never count)."""
    state = tmp_path / "state"
    uploads = state / "uploads"
    uploads.mkdir(parents=True)
    (uploads / ("ab" * 16 + ".part")).write_bytes(b"half a result from a killed process")
    (uploads / "stray").mkdir()
    (uploads / "stray" / "file").write_bytes(b"x")
    proc = subprocess.Popen(
        [*FEDGE, "coordinator", "run", "--state", str(state), "--insecure", "--port", "0",
         "--rounds", "1", "--min-devices", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until it serves (it then waits for a device)
            lines.append(line)
            if line.startswith("listening on 127.0.0.1:"):
                break
        assert lines and lines[-1].startswith("listening on"), "".join(lines)
        assert uploads.is_dir() and list(uploads.iterdir()) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
