"""The committed generated protobuf code in common/wire/ matches proto/ exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "common" / "wire"
HINT = "generated protobuf code is stale: run `.venv/bin/python scripts/gen_proto.py`"


def _load_gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    _load_gen_proto().generate(tmp_path)
    fresh, committed = _files(tmp_path), _files(COMMITTED)
    assert "fedge/v1/coordinator_pb2_grpc.py" in fresh
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    changed = sorted(n for n in set(fresh) & set(committed) if fresh[n] != committed[n])
    assert not (missing or extra or changed), (
        f"{HINT} (missing: {missing}, not generated any more: {extra}, differ: {changed})"
    )


def test_coordinator_service_shape() -> None:
    """The RPCs devices depend on exist with the agreed streaming kinds."""
    from fedge.v1 import coordinator_pb2

    service = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert kinds == {
        "Join": (False, False),
        "Heartbeat": (False, False),
        "PullTask": (False, True),
        "PushResult": (True, False),
        "GetUploadOffset": (False, False),
        "FetchModel": (False, True),
    }
    header = coordinator_pb2.ResultHeader.DESCRIPTOR.fields_by_name["signature"]
    assert header.type == header.TYPE_BYTES
