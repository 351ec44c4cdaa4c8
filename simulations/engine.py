"""Run fedge's ServerApp and ClientApp in Flower's simulation engine (Ray backend).

Flower's Python `run_simulation` gives virtual clients an empty run config,
so the simulation's data settings (task, partition, seed ...) reach them
through a small client mod that fills `context.run_config`: in a simulation
the runner, not the device, decides what data each virtual device holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedge.client.client_app import make_client_app
from fedge.client.compression_mod import compression_mod
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
    """fedge's ClientApp with the compression mod, as a fleet of devices would run it."""
    return make_client_app(mods=[run_config_mod(run_config), compression_mod])


def ray_backend_config(num_cpus_per_client: float = 1.0, num_gpus_per_client: float = 0.0
                       ) -> dict[str, Any]:
    """One CPU per virtual client (Flower's default of 2 leaves one actor on 2 cores).

    With `num_gpus_per_client > 0` (Flower's `num_gpus`: 0.25 puts four actors on
    one GPU) the actors train on CUDA (`FEDGE_TORCH_DEVICE=auto`, the CPU where
    Ray finds no GPU).
    """
    config: dict[str, Any] = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
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
    gpus_per_client: float = 0.0,
) -> None:
    """One federated run in Flower's simulation engine; rounds reach `listeners` as they end."""
    from flwr.simulation import run_simulation

    server_app = make_server_app(run_config, listeners=listeners)
    client = client_app if client_app is not None else simulation_client_app(run_config)
    logging.getLogger("flwr").setLevel(flower_log_level)
    run_simulation(
        server_app=server_app,
        client_app=client,
        num_supernodes=num_clients,
        backend_config=ray_backend_config(num_gpus_per_client=gpus_per_client),
    )
