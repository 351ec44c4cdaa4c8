"""The coordinator process: state, TLS, the gRPC service, and the ServerApp on a GrpcGrid.

One coordinator serves one federation from one state folder
(docs/coordinator.md, "State on disk"):

- **Start.** Open SQLite and the model store, drop partial uploads (their
  rounds restart anyway), create or reuse the CA and server certificate
  (TLS unless `insecure`), bind the gRPC server (127.0.0.1 by default).
- **Run.** A new run stores its config and the task's initial model as
  round 0. A run left `running` by an earlier process (a crash, `kill -9`)
  is resumed instead: rounds continue at `current_round + 1` from the model
  version SQLite names, with the run's stored config. The ServerApp from
  `server_app.py` (the simulation's app) runs in a thread on the
  `GrpcGrid` once `min_devices` devices are live.
- **Each round** ends in `_persist_round`: the round is closed (late results
  refused), the new global model written atomically to the model store, then
  the round, its metrics, contributors and dropped devices committed in one
  durable SQLite transaction. A crash leaves the run before or after a
  round, never between.
- **End.** The run is marked completed and the process exits 0, or keeps
  serving (`keep_serving`) until stopped. `request_stop` (SIGTERM/SIGINT)
  stops the ServerApp at its next Grid call and leaves the run resumable.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedge.common.chunking import DEFAULT_CHUNK_SIZE
from fedge.server.coordinator_service import (
    DEFAULT_MAX_RESULT_BYTES,
    CoordinatorService,
    ServiceSettings,
)
from fedge.server.fleet import Fleet
from fedge.server.grpc_grid import GridStopped, GrpcGrid
from fedge.server.model_store import ModelStore
from fedge.server.round_metrics import RoundMetrics
from fedge.server.store import Run, RunStatus, Store
from fedge.server.tls import ensure_server_tls, server_credentials
from fedge.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1

SERVER_ONLY_KEYS = ("report-path", "first-round", "initial-model")
"""Run-config keys the ServerApp alone reads; devices do not receive them."""

_GRPC_OPTIONS = [
    # a second coordinator on the same port must fail, not share it
    ("grpc.so_reuseport", 0),
    # devices long-poll; let them keep idle connections alive with pings
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


@dataclass
class CoordinatorOptions:
    """Everything `fedge coordinator run` can set."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    insecure: bool = False
    run_config: dict[str, Any] = field(default_factory=dict)
    min_devices: int = 2
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    heartbeat_interval_s: float = 5.0
    keep_serving: bool = False
    new_run: bool = False
    tls_hostnames: tuple[str, ...] = ()
    grace_s: float = 2.0


@dataclass
class _RoundAudit:
    contributors: list[str]
    dropped: list[str]


class Coordinator:
    """`await start()` binds and prints the port; `await run()` serves until the run ends."""

    def __init__(self, options: CoordinatorOptions, *, out: Callable[[str], None] = print) -> None:
        self.options = options
        self.out = out
        self.state_dir = Path(options.state_dir)
        self.port = 0
        self.run_id = 0
        self.first_round = 1
        self.model_version = ""
        self.run_config: dict[str, Any] = {}
        self.ca_path: Path | None = None
        self.store: Store | None = None
        self.models: ModelStore | None = None
        self.fleet: Fleet | None = None
        self.grid: GrpcGrid | None = None
        self.service: CoordinatorService | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stop = asyncio.Event()
        self._outcome: asyncio.Future[str] | None = None
        self._audit: dict[int, _RoundAudit] = {}
        self._background: list[asyncio.Task] = []

    # ------------------------------------------------------------ start

    async def start(self) -> int:
        """Open the state, resolve the run, bind the server; returns the bound port."""
        opts = self.options
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(self.state_dir / "fedge.db")
        self.models = ModelStore(self.state_dir / "models")
        uploads = self.state_dir / "uploads"
        shutil.rmtree(uploads, ignore_errors=True)  # partial results of rounds that restart
        self._resolve_run()
        self.fleet = Fleet(heartbeat_interval_s=opts.heartbeat_interval_s)
        self.fleet.bind_loop(asyncio.get_running_loop())
        self.grid = GrpcGrid(
            self.store,
            self.fleet,
            run_id=self.run_id,
            device_run_config=device_run_config(self.run_config),
            model_version=lambda: self.model_version,
            default_timeout=float(self.run_config.get("round-timeout", 3600.0)),
        )
        self.service = CoordinatorService(
            self.store,
            self.fleet,
            self.models,
            uploads,
            settings=ServiceSettings(
                chunk_size=opts.chunk_size, max_result_bytes=opts.max_result_bytes
            ),
            model_version=lambda: self.model_version,
        )
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        pb_grpc.add_CoordinatorServicer_to_server(self.service, server)
        address = _address(opts.host, opts.port)
        if opts.insecure:
            self.port = server.add_insecure_port(address)
        else:
            paths = ensure_server_tls(self.state_dir, self._hostnames())
            self.ca_path = paths.ca_cert
            self.port = server.add_secure_port(address, server_credentials(paths))
        if not self.port:
            raise OSError(f"cannot bind {address}")
        await server.start()
        self._server = server
        self._background.append(asyncio.create_task(self.service.flush_last_seen()))
        if self.ca_path is not None:
            self.out(f"TLS on: devices need --ca {self.ca_path}")
        else:
            self.out("TLS OFF (--insecure): traffic and session tokens travel in plaintext")
        self.out(f"listening on {_address(opts.host, self.port)}")
        return self.port

    def _hostnames(self) -> list[str]:
        names = list(self.options.tls_hostnames)
        if self.options.host not in ("0.0.0.0", "::", ""):
            names.insert(0, self.options.host)
        else:
            names.append(socket.gethostname())
        for name in ("localhost", "127.0.0.1"):
            if name not in names:
                names.append(name)
        return names

    def _resolve_run(self) -> None:
        """Resume the run an earlier process left running, or create a new one."""
        assert self.store is not None and self.models is not None
        store, opts = self.store, self.options
        run = None if opts.new_run else store.latest_run(RunStatus.RUNNING)
        if opts.new_run:
            for old in store.list_runs(RunStatus.RUNNING):
                store.set_run_status(old.id, RunStatus.STOPPED)
        if run is None:
            run = self._create_run(dict(opts.run_config))
            self.out(f"run {run.id}: new, {_describe(run.config)}")
        else:
            self.models.verify(run.model_version or "")
            self.out(
                f"run {run.id}: resuming after round {run.current_round} "
                f"(model {run.model_version[:12]}), {_describe(run.config)}"
            )
        self.run_id = run.id
        self.run_config = dict(run.config)
        self.first_round = run.current_round + 1
        self.model_version = run.model_version or ""

    def _create_run(self, config: dict[str, Any]) -> Run:
        from fedge.common.arrays import model_to_arrays
        from fedge.common.task import resolve_task

        assert self.store is not None and self.models is not None
        task_ref = str(config.get("task", "digits"))
        task = resolve_task(task_ref)
        while True:
            run_id = secrets.randbits(63)
            if run_id > 0 and self.store.get_run(run_id) is None:
                break
        version = self.models.put(
            _snapshot_bytes(model_to_arrays(task.make_model()), task_ref)
        )
        return self.store.create_run(run_id, config, model_version=version)

    # ------------------------------------------------------------ run

    async def run(self) -> int:
        """Run the ServerApp to the end of the run (or until stopped); returns an exit code."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        self._outcome = loop.create_future()
        num_rounds = int(self.run_config.get("num-rounds", 3))
        if self.first_round > num_rounds:
            self.store.set_run_status(self.run_id, RunStatus.COMPLETED)
            self.out(f"run {self.run_id}: already finished ({num_rounds} rounds)")
            self._outcome.set_result("finished")
        else:
            self._thread = threading.Thread(
                target=self._app_thread, args=(loop,), name="fedge-serverapp", daemon=True
            )
            self._thread.start()
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({self._outcome, stop}, return_when=asyncio.FIRST_COMPLETED)
        outcome = self._outcome.result() if self._outcome.done() else "stopped"
        if outcome == "finished" and self.options.keep_serving and not self._stop.is_set():
            self.out("serving on (--keep-serving); stop with Ctrl-C or SIGTERM")
            await stop
        stop.cancel()
        await self.close()
        return EXIT_FAILED if outcome == "failed" else EXIT_OK

    def request_stop(self) -> None:
        """Stop soon (a signal handler may call this); an unfinished run stays resumable."""
        self._stop.set()

    async def close(self) -> None:
        """Stop the ServerApp and the server, then close the state."""
        if self.grid is not None:
            self.grid.stop()
        for task in self._background:
            task.cancel()
        if self._server is not None:
            await self._server.stop(self.options.grace_s)
            self._server = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        if self.store is not None and (self._thread is None or not self._thread.is_alive()):
            if self.fleet is not None:
                touched = self.fleet.take_touched()
                if touched:
                    self.store.touch_devices(touched)
            self.store.close()
            self.store = None

    def _app_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        outcome = "failed"
        try:
            outcome = self._run_app()
        except GridStopped:
            outcome = "stopped"
        except Exception as e:
            log.exception("the ServerApp failed")
            self.out(f"run {self.run_id}: FAILED: {type(e).__name__}: {e}")
            if self.store is not None:
                self.store.set_run_status(self.run_id, RunStatus.FAILED)
        finally:
            if self._outcome is not None:
                loop.call_soon_threadsafe(_resolve, self._outcome, outcome)

    def _run_app(self) -> str:
        from flwr.app import Context, RecordDict

        from fedge.server.server_app import make_server_app

        assert self.grid is not None and self.store is not None and self.models is not None
        app = make_server_app(on_round_end=[self._persist_round], listeners=[self._print_round])
        config = {
            **self.run_config,
            "first-round": self.first_round,
            "initial-model": str(self.models.path(self.model_version)),
        }
        need = self.options.min_devices
        self.out(f"waiting for {need} device(s) to join")
        nodes = self.grid.wait_for_nodes(need)
        num_rounds = int(self.run_config.get("num-rounds", 3))
        self.out(f"{len(nodes)} device(s) live; round {self.first_round} of {num_rounds} starts")
        context = Context(
            run_id=self.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config
        )
        app(self.grid, context)
        self.store.set_run_status(self.run_id, RunStatus.COMPLETED)
        self.out(f"run {self.run_id}: finished ({num_rounds} rounds, model {self.model_version})")
        return "finished"

    def _persist_round(self, end: Any) -> None:
        """Close the round, write the new model, commit the round: the durable step."""
        assert self.grid is not None and self.store is not None and self.models is not None
        record: RoundMetrics = end.metrics
        server_round = record.round
        self.grid.end_round(server_round)
        arrays = {k: a.numpy() for k, a in end.arrays.items()}
        task = str(self.run_config.get("task", "digits"))
        version = self.models.put(_snapshot_bytes(arrays, task))
        contributors = [d for d in map(self.grid.device_of_node, end.accepted_nodes) if d]
        dropped = [d for d in self.grid.tasked_devices(server_round) if d not in contributors]
        self.store.complete_round(
            self.run_id,
            server_round,
            model_version=version,
            metrics=record,
            contributors=contributors,
            dropped=dropped,
        )
        self.model_version = version
        self._audit[server_round] = _RoundAudit(contributors, dropped)

    def _print_round(self, record: RoundMetrics) -> None:
        audit = self._audit.get(record.round, _RoundAudit([], []))
        num_rounds = int(self.run_config.get("num-rounds", 3))
        acc = "n/a" if record.accuracy is None else f"{record.accuracy:.4f}"
        rejected = f", {record.rejected} rejected" if record.rejected else ""
        self.out(
            f"round {record.round}/{num_rounds}: accuracy {acc}, "
            f"uplink {_size(record.uplink_bytes)}, downlink {_size(record.downlink_bytes)}, "
            f"devices {len(audit.contributors)} contributed, {len(audit.dropped)} dropped"
            f"{rejected}, {record.seconds:.1f} s"
        )


def device_run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config devices receive: everything but the ServerApp's own keys."""
    return {k: v for k, v in config.items() if k not in SERVER_ONLY_KEYS}


def _snapshot_bytes(arrays: Mapping[str, Any], task: str) -> bytes:
    """The snapshot of a global model. Run and round stay out (SQLite keeps the lineage),
    so unchanged weights keep their version: a round that aggregated nothing shows as such."""
    from fedge.common.snapshot import arrays_to_snapshot

    return arrays_to_snapshot(arrays, {"task": task}).SerializeToString(deterministic=True)


def _resolve(fut: asyncio.Future[str], outcome: str) -> None:
    if not fut.done():
        fut.set_result(outcome)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(config: Mapping[str, Any]) -> str:
    keys = ("task", "codec", "strategy", "num-rounds", "round-timeout")
    return ", ".join(f"{k} {config[k]}" for k in keys if k in config)


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
