"""Run fedge's ServerApp and ClientApp in Flower's simulation engine (Ray backend).

The engine is the one `flwr run` drives on Flower's simulation runtime: the
`flwr-simulation` process (`flwr.simulation.run_simulation_process`) hands
the apps to `flwr.simulation.run_simulation._run_simulation`, which starts the
ServerApp in a thread and the virtual SuperNodes on Ray. fedge calls that same
function with the app objects, so a simulation's round records reach
in-process listeners, without the deprecated `flwr.simulation.run_simulation`
wrapper (whose only addition is the deprecation warning). The call itself
lives with the server side's other Flower internals
(`fedge.server.flower_compat.run_simulation_engine`).

Flower gives virtual clients of a Python-started simulation an empty run
config, so the simulation's data settings (task, partition, seed ...) reach
them through a small client mod that fills `context.run_config`: in a
simulation the runner, not the device, decides what data each virtual device
holds.

`ray_address` (`HOST:PORT` of a running Ray head) runs the virtual clients on
that Ray cluster instead of a fresh local one: Flower's Ray backend connects
with `ray.init(address=...)`, and the cluster's CPUs decide how many clients
train at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedge.client.client_app import FEDGE_MODS, make_client_app
from fedge.server.flower_compat import run_simulation_engine
from fedge.server.round_metrics import RoundListener
from fedge.server.server_app import make_server_app

ClientAppCallable = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, ClientAppCallable], Message]

def run_config_mod(config: Mapping[str, Any]) -> Mod:
    """A client mod giving every virtual client the simulation's run config."""
    frozen = dict(config)

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        # Flower refuses a changed run_config on the context it handed out, so the
        # app gets a view with the same state (residuals persist) and a fuller config.
        view = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config={**frozen, **context.run_config},
        )
        return call_next(message, view)

    return mod


def simulation_client_app(run_config: Mapping[str, Any]) -> ClientApp:
    """fedge's ClientApp (its own mods, compression among them) given the run config."""
    return make_client_app(mods=[run_config_mod(run_config), *FEDGE_MODS])


def ray_backend_config(
    num_cpus_per_client: float = 1.0,
    ray_address: str | None = None,
    num_gpus_per_client: float = 0.0,
) -> dict[str, Any]:
    """One CPU per virtual client (Flower's default of 2 leaves one actor on 2 cores).

    A local Ray gets every CPU of this machine; on an existing cluster
    (`ray_address`) Ray refuses `num_cpus`, and the cluster's own CPUs count.
    With `num_gpus_per_client > 0` (Flower's `num_gpus`: 0.25 puts four actors on
    one GPU) the actors train on CUDA (`FEDGE_TORCH_DEVICE=auto`, the CPU where
    Ray finds no GPU).
    """
    init_args: dict[str, Any] = {"include_dashboard": False}
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    config: dict[str, Any] = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
        "init_args": init_args,
    }
    if num_gpus_per_client > 0:
        from fedge.common.training import DEVICE_ENV

        config["init_args"]["runtime_env"] = {"env_vars": {DEVICE_ENV: "auto"}}
    return config


def run_in_ray(
    run_config: Mapping[str, Any],
    num_clients: int,
    listeners: list[RoundListener],
    client_app: ClientApp | None = None,
    flower_log_level: int = logging.WARNING,
    ray_address: str | None = None,
    gpus_per_client: float = 0.0,
) -> None:
    """One federated run in Flower's simulation engine; rounds reach `listeners` as they end."""
    # Ray's FutureWarning about GPU env vars on every start: CPU-only clients opt in to the
    # future behaviour (it changes nothing when no client asks for a GPU)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    server_app = make_server_app(run_config, listeners=listeners)
    client = client_app if client_app is not None else simulation_client_app(run_config)
    logging.getLogger("flwr").setLevel(flower_log_level)
    run_simulation_engine(server_app, client, num_clients,
                          ray_backend_config(ray_address=ray_address,
                                             num_gpus_per_client=gpus_per_client))
