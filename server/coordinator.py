"""The coordinator process: state, TLS, the gRPC service, and the ServerApp on a GrpcGrid.

One coordinator serves one federation from one state folder
(docs/coordinator.md, "State on disk"). `Coordinator.start` is the
composition root: every part is built there, in this order, and a
`Coordinator` exists only fully built:

- **Plan.** Which run this start serves is decided by reading the state
  only (`run_plan.py`): the run an earlier process left `running` (a crash,
  `kill -9`) is resumed at `current_round + 1` from the model version SQLite
  names, with its stored config; flags that differ from that config are
  refused in one line (exit 2). Otherwise a new run is planned.
- **Serve.** Every port the coordinator needs is probed before anything is
  written; then SQLite and the model store are opened, partial uploads
  dropped (their rounds restart anyway), the CA and server certificate
  created or reused (TLS unless `insecure`), and the gRPC service (and the
  enrollment port, the HTTP API) bound and started.
- **Store the run.** Only now, serving, is the plan written: a new run's
  config and initial model (round 0), or old runs marked stopped
  (`--new-run`). A start that fails leaves no run behind.
- **Run.** The ServerApp from `server_app.py` (the simulation's app) runs in
  a thread on the `GrpcGrid` once `min_devices` devices are live. Each round
  ends in `RoundKeeper.persist` (`round_keeper.py`): closed, its model
  written, committed durably, then promoted (or gated, `--continuous`).
  A user's own ServerApp (`--server-app module:app`, run config key
  `server-app`) runs the same way with the run config as its context's; its
  rounds are recorded from what the Grid saw (`app_rounds.py`).
- **End.** The run is marked completed and the process exits 0, or keeps
  serving (`keep_serving`) until stopped. A run in which no round
  aggregated anything exits 1 with the first device error in one line.
  `request_stop` (SIGTERM/SIGINT) stops the ServerApp at its next Grid call
  and leaves the run resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc

from fedge.common.chunking import DEFAULT_CHUNK_SIZE
from fedge.common.contract import REPORT_STATE_KEY
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
from fedge.server.result_intake import ResultIntake
from fedge.server.round_keeper import RoundAudit, RoundKeeper
from fedge.server.round_metrics import RoundMetrics
from fedge.server.run_plan import SERVER_APP_KEY, RunPlan, StartRefused, plan_run
from fedge.server.store import RoundStatus, RunStatus, Store
from fedge.server.tls import TlsPaths, ensure_server_tls, server_credentials
from fedge.v1 import coordinator_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from flwr.serverapp import ServerApp

    from fedge.server.http_api import HttpServer

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1

SERVER_ONLY_KEYS = ("report-path", "first-round", "initial-model", SERVER_APP_KEY)
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

RunOutcome = Literal["finished", "idle", "failed", "stopped"]
"""How the ServerApp's run ended: all rounds done; done but no round aggregated anything;
the app raised; the coordinator was stopped."""


@dataclass
class CoordinatorOptions:
    """Everything `fedge coordinator run` can set."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    insecure: bool = False
    enroll_port: int | None = None  # TLS mode: None -> 0 (free) if port is 0, else 9095
    run_config: dict[str, Any] = field(default_factory=dict)
    # run-config key -> the flag that set it on this command line: what a resume compares
    # with the stored run (None: every key of run_config)
    given_flags: dict[str, str] | None = None
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

    @property
    def enrollment_port(self) -> int:
        """The enrollment port to bind (TLS mode): as given, else free with --port 0, else 9095."""
        if self.enroll_port is not None:
            return self.enroll_port
        return 0 if self.port == 0 else DEFAULT_ENROLL_PORT


@dataclass(frozen=True)
class _Servers:
    """What listens: the device port, and in TLS mode the enrollment port, maybe the HTTP API."""

    grpc: grpc.aio.Server
    port: int
    enrollment: grpc.aio.Server | None = None
    enroll_port: int = 0
    http: HttpServer | None = None
    http_port: int = 0
    ca_path: Path | None = None


class Coordinator:
    """A serving coordinator with its run stored; built only by `await Coordinator.start()`.

    `await run()` serves until the run ends and returns the exit code.
    """

    def __init__(
        self,
        options: CoordinatorOptions,
        out: Callable[[str], None],
        *,
        plan: RunPlan,
        store: Store,
        models: ModelStore,
        registry: Registry,
        fleet: Fleet,
        intake: ResultIntake,
        service: CoordinatorService,
        grid: GrpcGrid,
        keeper: RoundKeeper,
        metrics: Metrics,
        servers: _Servers,
    ) -> None:
        self.options = options
        self.out = out
        self.run_id = plan.run_id
        self.run_config = dict(plan.config)
        self.first_round = plan.first_round
        self.store = store
        self.models = models
        self.registry = registry
        self.fleet = fleet
        self.intake = intake
        self.service = service
        self.grid = grid
        self.keeper = keeper
        self.metrics = metrics
        self._servers = servers
        self.port = servers.port
        self.enroll_port = servers.enroll_port
        self.http_port = servers.http_port
        self.ca_path = servers.ca_path
        self._stop = asyncio.Event()
        self._thread: threading.Thread | None = None
        self._background: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def model_version(self) -> str:
        """The global model the next round starts from."""
        return self.keeper.model_version

    # ------------------------------------------------------------ start

    @classmethod
    async def start(
        cls, options: CoordinatorOptions, *, out: Callable[[str], None] = print
    ) -> Coordinator:
        """Plan the run, bind every port, then store the run; raises StartRefused (exit 2).

        A refusal or a failure stores no run; what was started is stopped again.
        """
        state_dir = Path(options.state_dir)
        if options.http_port is not None:  # refused before anything binds or is stored
            from fedge.server.http_auth import BindRefused, check_bind

            try:
                check_bind(options.http_host, options.http_auth, tls=not options.insecure)
            except BindRefused as e:
                raise StartRefused("http_bind", str(e)) from None
        plan = _plan(options, state_dir)  # reads the state only
        _probe_ports(options)  # before anything is written under the state folder
        async with contextlib.AsyncExitStack() as undo:
            state_dir.mkdir(parents=True, exist_ok=True)
            store = Store.open(state_dir / "fedge.db")
            undo.callback(store.close)
            models = ModelStore(state_dir / "models")
            registry = Registry(store, models)
            uploads = state_dir / "uploads"
            shutil.rmtree(uploads, ignore_errors=True)  # partial results of rounds that restart
            fleet = Fleet(heartbeat_interval_s=options.heartbeat_interval_s)
            fleet.bind_loop(asyncio.get_running_loop())
            intake = ResultIntake(store, fleet)
            metrics = Metrics()
            keeper: RoundKeeper  # the grid reads its model version once serving
            grid = GrpcGrid(
                store,
                fleet,
                run_id=plan.run_id,
                device_run_config=device_run_config(plan.config),
                model_version=lambda: keeper.model_version,
                default_timeout=float(plan.config.get("round-timeout", 3600.0)),
            )
            undo.callback(grid.stop)
            keeper = RoundKeeper(
                store, models, registry, grid, metrics,
                run_id=plan.run_id, task_ref=str(plan.config.get("task", "digits")),
                model_version=plan.model_version, gate=options.continuous, out=out,
            )
            service = CoordinatorService(
                store,
                fleet,
                models,
                uploads,
                settings=ServiceSettings(
                    chunk_size=options.chunk_size, max_result_bytes=options.max_result_bytes
                ),
                # what FetchModel without a version and heartbeats name: the registry's current
                model_version=lambda: registry.current() or keeper.model_version,
                mtls=not options.insecure,  # devices are who their client certificate says
                intake=intake,
            )
            servers = await _serve(options, service, store, metrics, registry, out, undo)
            plan.commit(store, models)  # serving: now the run exists
            out(plan.describe())
            coordinator = cls(
                options, out, plan=plan, store=store, models=models, registry=registry,
                fleet=fleet, intake=intake, service=service, grid=grid, keeper=keeper,
                metrics=metrics, servers=servers,
            )
            undo.pop_all()
        coordinator._background += [
            asyncio.create_task(service.flush_last_seen()),
            asyncio.create_task(coordinator._watch_devices()),
        ]
        return coordinator

    async def _watch_devices(self, every_s: float = 1.0) -> None:
        while True:
            self.metrics.set_devices_connected(len(self.fleet.live_node_ids(training=False)))
            await asyncio.sleep(every_s)

    # ------------------------------------------------------------ run

    async def run(self) -> int:
        """Run the ServerApp to the end of the run (or until stopped); returns an exit code."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[RunOutcome] = loop.create_future()
        num_rounds = int(self.run_config.get("num-rounds", 3))
        own_rounds = self.options.continuous is not None or SERVER_APP_KEY in self.run_config
        if self.first_round > num_rounds and not own_rounds:
            self.store.set_run_status(self.run_id, RunStatus.COMPLETED)
            self.out(f"run {self.run_id}: already finished ({num_rounds} rounds)")
            ended.set_result("finished")
        else:
            self._thread = threading.Thread(
                target=self._app_thread, args=(loop, ended), name="fedge-serverapp", daemon=True
            )
            self._thread.start()
        stop = asyncio.ensure_future(self._stop.wait())
        either: set[asyncio.Future[Any]] = {ended, stop}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        outcome: RunOutcome = ended.result() if ended.done() else "stopped"
        ran_out = outcome in ("finished", "idle")
        if ran_out and self.options.keep_serving and not self._stop.is_set():
            self.out("serving on (--keep-serving); stop with Ctrl-C or SIGTERM")
            await stop
        stop.cancel()
        await self.close()
        return EXIT_FAILED if outcome in ("failed", "idle") else EXIT_OK

    def request_stop(self) -> None:
        """Stop soon (a signal handler may call this); an unfinished run stays resumable."""
        self._stop.set()

    async def close(self) -> None:
        """Stop the ServerApp and the servers, then close the state."""
        if self._closed:
            return
        self._closed = True
        servers = self._servers
        self.grid.stop()
        if servers.http is not None:
            await asyncio.to_thread(servers.http.stop)
        for task in self._background:
            task.cancel()
        if servers.enrollment is not None:
            await servers.enrollment.stop(None)
        await servers.grpc.stop(self.options.grace_s)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        if self._thread is None or not self._thread.is_alive():
            touched = self.fleet.take_touched()
            if touched:
                self.store.touch_devices(touched)
            self.store.close()

    def _app_thread(
        self, loop: asyncio.AbstractEventLoop, ended: asyncio.Future[RunOutcome]
    ) -> None:
        outcome: RunOutcome = "failed"
        try:
            outcome = self._run_app()
        except GridStopped:
            outcome = "stopped"
        except Exception as e:
            log.exception("the ServerApp failed")
            self.out(f"run {self.run_id}: FAILED: {type(e).__name__}: {e}")
            self.store.set_run_status(self.run_id, RunStatus.FAILED)
        finally:
            loop.call_soon_threadsafe(_resolve, ended, outcome)

    def _run_app(self) -> RunOutcome:
        from flwr.app import Context, RecordDict

        from fedge.server.server_app import make_server_app

        if self.run_config.get(SERVER_APP_KEY):
            return self._run_user_app(str(self.run_config[SERVER_APP_KEY]))
        app = make_server_app(
            on_round_end=[self.keeper.persist],
            listeners=[lambda r: self._print_round(r, self.keeper.audit(r.round))],
        )
        if self.options.continuous is not None:
            return self._run_continuous(app, self.options.continuous)
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
        stopped = _budget_stop(context)
        if stopped:
            self.out(f"run {self.run_id}: {stopped}")
        if not self._aggregated_anything():
            self.out(f"run {self.run_id}: FAILED: no round aggregated an update; "
                     f"{self._first_error()}")
            return "idle"
        self.out(f"run {self.run_id}: finished ({num_rounds} rounds, model {self.model_version})")
        return "finished"

    def _run_user_app(self, ref: str) -> RunOutcome:
        """A user's own ServerApp on the Grid; its rounds are recorded by `AppRounds`."""
        from flwr.app import Context, RecordDict

        from fedge.server.app_loading import load_server_app
        from fedge.server.app_rounds import AppRounds

        app = load_server_app(ref)  # checked by the CLI before anything started
        rounds = AppRounds(
            self.store, self.grid, self.metrics, run_id=self.run_id,
            model_version=self.model_version, listeners=(self._print_round,),
        )
        rounds.attach()
        need = self.options.min_devices
        self.out(f"waiting for {need} device(s) to join")
        nodes = self.grid.wait_for_nodes(need)
        self.out(f"{len(nodes)} device(s) live; ServerApp {ref} starts")
        context = Context(
            run_id=self.run_id, node_id=0, node_config={}, state=RecordDict(),
            run_config=app_run_config(self.run_config),
        )
        try:
            app(self.grid, context)
        finally:
            if not self.grid.stopped:
                rounds.close_all()
        self.store.set_run_status(self.run_id, RunStatus.COMPLETED)
        if not self._aggregated_anything():
            self.out(f"run {self.run_id}: FAILED: no round got an accepted train result; "
                     f"{self._first_error()}")
            return "idle"
        done = len(self.store.list_rounds(self.run_id))
        self.out(f"run {self.run_id}: finished ({done} rounds of ServerApp {ref})")
        return "finished"

    def _run_continuous(self, app: ServerApp, settings: ContinuousSettings) -> RunOutcome:
        """Rounds without end, one one-round ServerApp run each, from `current` (continuous.py)."""
        from flwr.app import Context, RecordDict

        grid = self.grid
        min_train = int(self.run_config.get("min-train-nodes", 2))
        self.out(
            f"continuous: a round starts with {settings.min_ready} ready device(s)"
            + (f" or every {settings.every_minutes:g} min" if settings.every_minutes else "")
            + f"; promotion margin {settings.promote_margin:g} ({settings.metric})"
        )
        last_round_end = time.monotonic()
        server_round = self.first_round
        while True:
            why = wait_for_round(
                lambda: len(list(grid.get_node_ids())), settings, min_train_nodes=min_train,
                last_round_end=last_round_end, stopped=lambda: grid.stopped,
            )
            if why == "stopped":
                raise GridStopped("the coordinator is stopping")
            base = self.model_version
            last = self.store.get_run(self.run_id)
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
            stopped = _budget_stop(context)
            if stopped:  # the DP budget is spent: no round can run, the last model stays
                self.out(f"run {self.run_id}: {stopped}")
                self.store.set_run_status(self.run_id, RunStatus.COMPLETED)
                return "finished"
            last_round_end = time.monotonic()
            server_round += 1

    # ------------------------------------------------------------ reporting

    def _aggregated_anything(self) -> bool:
        rounds = self.store.list_rounds(self.run_id)
        return any(r.metrics.accepted > 0 for r in rounds if r.status == RoundStatus.COMPLETED)

    def _first_error(self) -> str:
        """The first thing a device got wrong in this run, as the end of one line."""
        if self.intake.first_device_error is not None:
            return f"first device error: {self.intake.first_device_error}"
        rounds = self.store.list_rounds(self.run_id)
        reasons: Counter[str] = Counter()
        for r in rounds:
            reasons.update(r.metrics.rejected_reasons)
        if reasons:
            dropped = ", ".join(f"{reason} x{n}" for reason, n in reasons.most_common())
            return f"every reply was dropped ({dropped}); rerun with --verbose for details"
        silent = {d for r in rounds for d in r.dropped}
        if silent:
            timeout = self.run_config.get("round-timeout")
            return (f"{len(silent)} device(s) sent no result within the round timeout "
                    f"({timeout} s)")
        return "no device was given a task"

    def _print_round(self, record: RoundMetrics, audit: RoundAudit) -> None:
        num_rounds = int(self.run_config.get("num-rounds", 3))
        acc = "n/a" if record.accuracy is None else f"{record.accuracy:.4f}"
        rejected = f", {record.rejected} rejected" if record.rejected else ""
        own_rounds = self.options.continuous or self.run_config.get(SERVER_APP_KEY)
        total = "" if own_rounds else f"/{num_rounds}"
        self.out(
            f"round {record.round}{total}: accuracy {acc}, "
            f"uplink {_size(record.uplink_bytes)}, downlink {_size(record.downlink_bytes)}, "
            f"devices {len(audit.contributors)} contributed, {len(audit.dropped)} dropped"
            f"{rejected}, {record.seconds:.1f} s"
            + ("" if record.epsilon is None
               else f", DP epsilon {record.epsilon:.3f} (delta {record.delta:g})")
            + ("" if not record.secagg  # what the secure exchange did (server/secagg_server.py)
               else f", secure aggregation: {record.secagg.get('survivors')} masked inputs in "
                    f"a {record.secagg.get('ring_bits')}-bit ring")
        )


def _budget_stop(context: Any) -> str | None:
    """The line the ServerApp left when the DP budget stopped training (server/dp.py)."""
    report = context.state.get(REPORT_STATE_KEY)
    value = None if report is None else report.get("stopped")
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------- building


def _plan(options: CoordinatorOptions, state_dir: Path) -> RunPlan:
    """The run this start serves, from the state as it is (a fresh folder stays untouched)."""
    db = state_dir / "fedge.db"
    if not db.exists():
        return plan_run(None, None, options.run_config, new_run=options.new_run,
                        given_flags=options.given_flags)
    with Store.open(db) as store:
        models = ModelStore(state_dir / "models")
        current = Registry(store, models).current() if options.continuous else None
        plan = plan_run(
            store, models, options.run_config, new_run=options.new_run,
            given_flags=options.given_flags, current=current, state_dir=state_dir,
        )
    app = plan.config.get(SERVER_APP_KEY)
    if app and plan.resumed_after:  # its model and strategy state live in the app's process
        raise StartRefused(
            "app_not_resumable",
            f"run {plan.run_id} in {state_dir} ran ServerApp {app} to round "
            f"{plan.resumed_after}; a user's own ServerApp cannot resume mid-run: add "
            "--new-run to start it again",
        )
    return plan


async def _serve(
    options: CoordinatorOptions,
    service: CoordinatorService,
    store: Store,
    metrics: Metrics,
    registry: Registry,
    out: Callable[[str], None],
    undo: contextlib.AsyncExitStack,
) -> _Servers:
    """Bind and start the device port, then the enrollment port and the HTTP API."""
    server = grpc.aio.server(options=_GRPC_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(service, server)
    address = _address(options.host, options.port)
    tls: TlsPaths | None = None
    try:
        if options.insecure:
            port = server.add_insecure_port(address)
        else:
            tls = ensure_server_tls(options.state_dir, _hostnames(options))
            port = server.add_secure_port(
                address, server_credentials(tls, require_client_auth=True)
            )
    except RuntimeError as e:  # grpc: "Failed to bind to address"
        raise _cannot_listen(address, "--port", str(e)) from None
    if not port:
        raise _cannot_listen(address, "--port", "address in use or not local")
    await server.start()
    undo.push_async_callback(server.stop, None)
    if tls is not None:
        out(f"TLS on: devices need --ca {tls.ca_cert}")
    else:
        out("TLS OFF (--insecure): traffic and session tokens travel in plaintext; "
            "no device identity (any caller can join and push results)")
    out(f"listening on {_address(options.host, port)}")
    enrollment, enroll_port, enroller = None, 0, None
    if tls is not None:
        from fedge.server.enrollment_service import (
            Enroller,
            EnrollmentService,
            start_enrollment_server,
        )

        enroller = Enroller(store, tls, device_port=port)  # the HTTP API's POST /v1/enroll too
        enrollment, enroll_port = await start_enrollment_server(
            EnrollmentService(enroller), tls, host=options.host, port=options.enrollment_port,
        )
        undo.push_async_callback(enrollment.stop, None)
        out(f"enrollment on {_address(options.host, enroll_port)}")
    http, http_port = None, 0
    if options.http_port is not None:
        from fedge.server.http_api import HttpServer, make_http_app
        from fedge.server.http_auth import auth_for_state

        auth = auth_for_state(options.http_auth, options.state_dir, tls, store)
        app = make_http_app(registry, metrics, auth=auth, enroller=enroller)
        http = HttpServer(app, host=options.http_host, port=int(options.http_port))
        http_port = http.start()
        undo.push_async_callback(asyncio.to_thread, http.stop)
        auth_note = f" (auth: {options.http_auth})" if options.http_auth != "none" else ""
        http_url = f"{http.scheme}://{_address(options.http_host, http_port)}"
        out(f"HTTP API on {http_url}{auth_note}")
        if enroller is not None and auth.tls:
            out(f"enrollment also on {http_url} (fedge enroll --coordinator {http_url})")
    return _Servers(server, port, enrollment, enroll_port, http, http_port,
                    tls.ca_cert if tls is not None else None)


def _probe_ports(options: CoordinatorOptions) -> None:
    """Refuse a port another process holds before anything is stored (StartRefused).

    The sockets are bound as gRPC binds its own (SO_REUSEADDR) and all held
    at once, so the same port given twice is refused too; the real bind
    follows, so this only moves the common failure ahead of any write.
    """
    wanted = [("--port", options.host, options.port)]
    if not options.insecure:
        wanted.append(("--enroll-port", options.host, options.enrollment_port))
    if options.http_port is not None:
        wanted.append(("--http-port", options.http_host, options.http_port))
    held: list[socket.socket] = []
    try:
        for flag, host, port in wanted:
            if port == 0:
                continue
            try:
                infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            except socket.gaierror as e:
                raise _cannot_listen(_address(host, port), flag, str(e)) from None
            for family, kind, proto, _, addr in infos:
                try:
                    sock = socket.socket(family, kind, proto)
                except OSError:
                    continue  # a family this machine lacks (gRPC skips it too)
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # "" lists both wildcards: let them coexist
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                    sock.listen(1)  # a listener: the same port given twice collides
                except OSError as e:
                    if e.errno in (errno.EADDRINUSE, errno.EACCES):
                        raise _cannot_listen(_address(host, port), flag,
                                             e.strerror or str(e)) from None
    finally:
        for sock in held:
            sock.close()


def _cannot_listen(address: str, flag: str, why: str) -> StartRefused:
    return StartRefused(
        "cannot_listen",
        f"cannot listen on {address} ({flag}): {why}; stop what holds it, or choose another "
        f"port with {flag} (0 picks a free one)",
    )


def _hostnames(options: CoordinatorOptions) -> list[str]:
    names = list(options.tls_hostnames)
    if options.host not in ("0.0.0.0", "::", ""):
        names.insert(0, options.host)
    else:
        names.append(socket.gethostname())
    for name in ("localhost", "127.0.0.1"):
        if name not in names:
            names.append(name)
    return names


def app_run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config a user's own ServerApp reads: its `--run-config`, without fedge's key."""
    return {k: v for k, v in config.items() if k != SERVER_APP_KEY}


def device_run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config devices receive: everything but the ServerApp's own keys."""
    return {k: v for k, v in config.items() if k not in SERVER_ONLY_KEYS}


def _resolve(fut: asyncio.Future[RunOutcome], outcome: RunOutcome) -> None:
    if not fut.done():
        fut.set_result(outcome)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
