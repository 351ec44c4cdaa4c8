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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedge.common.chunking import DEFAULT_CHUNK_SIZE
from fedge.server.continuous import ContinuousSettings, round_config, wait_for_round
from fedge.server.coordinator_service import (
    DEFAULT_MAX_RESULT_BYTES,
    CoordinatorService,
    ServiceSettings,
)
from fedge.server.fleet import Fleet
from fedge.server.grpc_grid import GridStopped, GrpcGrid
from fedge.server.metrics import Metrics
from fedge.server.model_store import ModelStore
from fedge.server.registry import Registry
from fedge.server.round_metrics import RoundMetrics
from fedge.server.store import Run, RunStatus, Store
from fedge.server.tls import ensure_server_tls, server_credentials
from fedge.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1

SERVER_ONLY_KEYS = ("report-path", "first-round", "initial-model")
"""Run-config keys the ServerApp alone reads; devices do not receive them."""

DEFAULT_ENROLL_PORT = 9095
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
    enroll_port: int | None = None  # TLS mode: None -> 0 (free) if port is 0, else 9095
    run_config: dict[str, Any] = field(default_factory=dict)
    min_devices: int = 2
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    heartbeat_interval_s: float = 5.0
    keep_serving: bool = False
    new_run: bool = False
    tls_hostnames: tuple[str, ...] = ()
    grace_s: float = 2.0
    http_port: int | None = None  # None: no HTTP API; 0: a free port (printed)
    http_host: str = "127.0.0.1"
    http_auth: str = "none"  # server/http_auth.py: none (loopback only) | mtls | token | any
    continuous: ContinuousSettings | None = None  # rounds without end, gated promotion


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
        self._enroll_server: grpc.aio.Server | None = None
        self.enroll_port = 0
        self._thread: threading.Thread | None = None
        self._stop = asyncio.Event()
        self._outcome: asyncio.Future[str] | None = None
        self._audit: dict[int, _RoundAudit] = {}
        self._background: list[asyncio.Task] = []
        self.registry: Registry | None = None
        self.metrics = Metrics()
        self.http: Any = None
        self.http_port = 0
        self._last_round_end = 0.0

    # ------------------------------------------------------------ start

    async def start(self) -> int:
        """Open the state, resolve the run, bind the server; returns the bound port."""
        opts = self.options
        if opts.http_port is not None:  # refused before anything binds or is stored
            from fedge.server.http_auth import check_bind

            check_bind(opts.http_host, opts.http_auth, tls=not opts.insecure)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(self.state_dir / "fedge.db")
        self.models = ModelStore(self.state_dir / "models")
        uploads = self.state_dir / "uploads"
        shutil.rmtree(uploads, ignore_errors=True)  # partial results of rounds that restart
        self.registry = Registry(self.store, self.models)
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
            model_version=self._served_version,
            mtls=not opts.insecure,  # devices are who their client certificate says
        )
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        pb_grpc.add_CoordinatorServicer_to_server(self.service, server)
        address = _address(opts.host, opts.port)
        if opts.insecure:
            self.port = server.add_insecure_port(address)
        else:
            paths = ensure_server_tls(self.state_dir, self._hostnames())
            self.ca_path = paths.ca_cert
            self.port = server.add_secure_port(
                address, server_credentials(paths, require_client_auth=True)
            )
        if not self.port:
            raise OSError(f"cannot bind {address}")
        await server.start()
        self._server = server
        self._background.append(asyncio.create_task(self.service.flush_last_seen()))
        if self.ca_path is not None:
            self.out(f"TLS on: devices need --ca {self.ca_path}")
        else:
            self.out("TLS OFF (--insecure): traffic and session tokens travel in plaintext; "
                     "no device identity (any caller can join and push results)")
        self.out(f"listening on {_address(opts.host, self.port)}")
        self._background.append(asyncio.create_task(self._watch_devices()))
        if opts.http_port is not None:
            self._start_http()
        if not opts.insecure:
            await self._start_enrollment(paths)
        return self.port

    async def _start_enrollment(self, paths: Any) -> None:
        """The enrollment port (server TLS only) next to the mTLS device port."""
        from fedge.server.enrollment_service import EnrollmentService, start_enrollment_server

        opts = self.options
        port = opts.enroll_port
        if port is None:
            port = 0 if opts.port == 0 else DEFAULT_ENROLL_PORT
        assert self.store is not None
        service = EnrollmentService(self.store, paths, device_port=self.port)
        self._enroll_server, self.enroll_port = await start_enrollment_server(
            service, paths, host=opts.host, port=port
        )
        self.out(f"enrollment on {_address(opts.host, self.enroll_port)}")

    def _served_version(self) -> str:
        """What FetchModel without a version and heartbeats name: the registry's `current`."""
        current = self.registry.current() if self.registry is not None else None
        return current or self.model_version

    def _start_http(self) -> None:
        from fedge.server.http_api import HttpServer, make_http_app
        from fedge.server.http_auth import auth_for_state

        assert self.registry is not None
        opts = self.options
        tls = None if opts.insecure else ensure_server_tls(self.state_dir, self._hostnames())
        auth = auth_for_state(opts.http_auth, self.state_dir, tls, self.store)
        self.http = HttpServer(
            make_http_app(self.registry, self.metrics, auth=auth), host=opts.http_host,
            port=int(opts.http_port or 0),
        )
        self.http_port = self.http.start()
        auth_note = f" (auth: {opts.http_auth})" if opts.http_auth != "none" else ""
        self.out(f"HTTP API on {self.http.scheme}://{_address(opts.http_host, self.http_port)}"
                 + auth_note)

    async def _watch_devices(self, every_s: float = 1.0) -> None:
        while True:
            if self.fleet is not None:
                self.metrics.set_devices_connected(len(self.fleet.live_node_ids(training=False)))
            await asyncio.sleep(every_s)

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
        if self.options.continuous is not None and self.registry is not None:
            current = self.registry.current()
            if current:  # continuous rounds train from `current`, not the last candidate
                self.model_version = current

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
        if self.first_round > num_rounds and self.options.continuous is None:
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
        if self.http is not None:
            await asyncio.to_thread(self.http.stop)
            self.http = None
        for task in self._background:
            task.cancel()
        if self._enroll_server is not None:
            await self._enroll_server.stop(None)
            self._enroll_server = None
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
        if self.options.continuous is not None:
            return self._run_continuous(app)
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

    def _run_continuous(self, app: Any) -> str:
        """Rounds without end, one one-round ServerApp run each, from `current` (continuous.py)."""
        from flwr.app import Context, RecordDict

        assert self.grid is not None and self.models is not None
        settings = self.options.continuous
        assert settings is not None
        grid = self.grid
        min_train = int(self.run_config.get("min-train-nodes", 2))
        self.out(
            f"continuous: a round starts with {settings.min_ready} ready device(s)"
            + (f" or every {settings.every_minutes:g} min" if settings.every_minutes else "")
            + f"; promotion margin {settings.promote_margin:g} ({settings.metric})"
        )
        self._last_round_end = time.monotonic()
        server_round = self.first_round
        while True:
            why = wait_for_round(
                lambda: len(grid.get_node_ids()), settings, min_train_nodes=min_train,
                last_round_end=self._last_round_end, stopped=grid._stopped.is_set,
            )
            if why == "stopped":
                raise GridStopped("the coordinator is stopping")
            base = self.model_version
            last = self.store.get_run(self.run_id) if self.store is not None else None
            config = round_config(
                self.run_config, server_round, str(self.models.path(base)),
                reset_residual=last is not None and (last.model_version or base) != base,
            )
            self.out(f"round {server_round} starts ({why}), from {base[:12]}")
            context = Context(
                run_id=self.run_id, node_id=0, node_config={}, state=RecordDict(),
                run_config=config,
            )
            app(grid, context)
            self._last_round_end = time.monotonic()
            server_round += 1

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
            # continuous: the round trained from `current`, not from the last candidate
            parent_version=self.model_version if self.options.continuous else None,
        )
        self.model_version = version
        self._audit[server_round] = _RoundAudit(contributors, dropped)
        self._register(version, record)

    def _register(self, version: str, record: RoundMetrics) -> None:
        """The registry and metrics after a committed round: evaluation, then promote or gate."""
        registry, continuous = self.registry, self.options.continuous
        assert registry is not None
        evaluation = {k: v for k, v in (("accuracy", record.accuracy), ("loss", record.loss))
                      if v is not None}
        if evaluation:
            registry.set_evaluation(version, evaluation)
        self.metrics.add_bytes_in(record.uplink_bytes)
        self.metrics.add_bytes_out(record.downlink_bytes)
        if continuous is None:
            registry.promote(version, reason=f"round {record.round}")
        elif continuous.metric not in registry.get(version).evaluation:
            registry.reject(version, f"round {record.round}: no {continuous.metric} to gate on")
            self.out(f"round {record.round}: {version[:12]} not promoted (not evaluated)")
        else:
            decision = registry.gate(
                version, margin=continuous.promote_margin, metric=continuous.metric
            )
            if decision.promoted:
                self.out(f"round {record.round}: {version[:12]} promoted: {decision.reason}")
            else:
                log.warning("round %d: candidate %s rejected: %s", record.round, version[:12],
                            decision.reason)
                self.out(f"round {record.round}: {version[:12]} NOT promoted: {decision.reason}")
        current = registry.current()
        if continuous is not None and current:
            self.model_version = current  # the next round trains from `current`
        self.metrics.observe_round(record)

    def _print_round(self, record: RoundMetrics) -> None:
        audit = self._audit.get(record.round, _RoundAudit([], []))
        num_rounds = int(self.run_config.get("num-rounds", 3))
        acc = "n/a" if record.accuracy is None else f"{record.accuracy:.4f}"
        rejected = f", {record.rejected} rejected" if record.rejected else ""
        total = "" if self.options.continuous else f"/{num_rounds}"
        self.out(
            f"round {record.round}{total}: accuracy {acc}, "
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
