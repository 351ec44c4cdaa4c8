"""One check of a whole run config, before anything starts or is stored.

`fedge simulate`, `fedge coordinator run`, `fedge demo` and the ServerApp (at
its start) call `validate_run_config`; a bad key is refused with one
`RunConfigError` that names the key and its valid choices. The choices are
read from where they live (codec specs from `common.codec_spec`, partitioners
from `common.partition`, strategies here, next to nothing heavier than a
tuple so the CLI can offer them as choices, tasks from `common.task`, the
downlink from `server.downlink`), never listed again.

The checks run cheapest first: values, names, codec specs and ranges need
neither torch nor Flower, so a typo is refused in a fraction of a second;
only then is the task imported and its data looked for.

`parse_run_config_args` reads `--run-config` in Flower's own syntax
(`'lr=0.1 local-epochs=2'`, TOML values, or one TOML file) through Flower's
parser, so `flwr run` and fedge read the same text the same way.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.common.codec_spec import VALUE_CODECS, parse_codec
from fedge.common.contract import PERSONAL_MODES
from fedge.common.errors import CodecSpecError

#: what the `strategy` key may name; `server_app.build_strategy` builds each of them
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum",
              "fedavgm")

#: strategies that can aggregate the one reply secure aggregation hands them (the global model
#: plus the survivors' unweighted mean delta): FedAvg's mean of it is it, and the server-side
#: optimizers (FedAvgM, FedAdam, FedYogi) step along it. The robust ones (fedmedian,
#: fedtrimmedavg, krum) rank individual updates, which the coordinator no longer sees.
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")
#: `secagg-bits`: the shared-scale quantizer's bits (ring words are bits + ceil(log2 n))
SECAGG_BITS = (8, 4)

#: keys whose empty string means "the task's own train default" or, for `server-lr`, the
#: strategy's own (a Flower app config, TOML, has no null: `[tool.flwr.app.config]`
#: declares them as ""; server_app.ServerConfig reads them as None)
DEFAULT_WHEN_EMPTY = ("lr", "local-epochs", "batch-size", "server-lr")

_CODEC_HINT = (f"a codec spec is {', '.join(VALUE_CODECS)}, with options "
               "(int8:block=64, int4:stochastic) or top-k (topk=0.01+int4)")


class RunConfigError(ValueError):
    """One run-config key that cannot run; the message names the valid choices."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = " ".join(reason.split())  # one line, whatever the cause said
        where = key if key.startswith("--") else f"run config {key!r}"
        super().__init__(f"{where}: {self.reason}")

    def line(self, flags: Mapping[str, str] | None = None) -> str:
        """The refusal as one line, naming the command-line flag that set the key, if any."""
        flag = (flags or {}).get(self.key)
        return f"{flag} (run config {self.key!r}): {self.reason}" if flag else str(self)


@dataclass(frozen=True)
class _Range:
    """A numeric key: its kind and bounds (`low_open`: the low bound itself is refused)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return f"{what} {' and '.join(parts)}" if parts else what

    def admits(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None
                    and (value > self.high or (self.high_open and value == self.high)))


_RANGES: dict[str, _Range] = {
    "num-rounds": _Range(int, 1),
    "first-round": _Range(int, 1),
    "min-train-nodes": _Range(int, 1),
    "min-evaluate-nodes": _Range(int, 0),
    "fraction-train": _Range(float, 0, 1),
    "fraction-evaluate": _Range(float, 0, 1),
    "lr": _Range(float, 0, low_open=True),
    "local-epochs": _Range(int, 1),
    "batch-size": _Range(int, 1),
    "proximal-mu": _Range(float, 0),
    "server-lr": _Range(float, 0, low_open=True),
    "server-momentum": _Range(float, 0, 1, high_open=True),
    "lr-decay": _Range(float, 0, 1, low_open=True),
    "server-tau": _Range(float, 0, low_open=True),
    "personal-epochs": _Range(int, 1),
    "personal-lr": _Range(float, 0, low_open=True),
    "trim-beta": _Range(float, 0, 0.5, high_open=True),
    "krum-malicious": _Range(int, 0),
    "seed": _Range(int, 0),
    "torch-threads": _Range(int, 1),
    "round-timeout": _Range(float, 0, low_open=True),
    "max-update-bytes": _Range(int, 1),
    "alpha": _Range(float, 0, low_open=True),
    "classes-per-client": _Range(int, 1),
    "test-fraction": _Range(float, 0, 1, high_open=True),
    "downlink-keep": _Range(int, 1),
    "downlink-max-age": _Range(int, 1),
    "dp-noise": _Range(float, 0),
    "dp-clip": _Range(float, 0, low_open=True),
    "dp-delta": _Range(float, 0, 1, low_open=True, high_open=True),
    "dp-max-epsilon": _Range(float, 0, low_open=True),
    "dp-target-quantile": _Range(float, 0, 1, low_open=True, high_open=True),
    "dp-clip-lr": _Range(float, 0, low_open=True),
    "dp-count-noise": _Range(float, 0, low_open=True),
    "dp-population": _Range(int, 1),
    "dp-noise-seed": _Range(int, 0),
    "secagg-clip": _Range(float, 0, low_open=True),
    "secagg-min-survivors": _Range(int, 1),
}


def _number(key: str, raw: Any, rng: _Range) -> float:
    """`raw` as the key's kind (numbers, or text that reads as one), else a refusal."""
    value: float | None = None
    if isinstance(raw, bool):
        value = None
    elif isinstance(raw, int | float):
        value = raw
    elif isinstance(raw, str):
        try:
            value = int(raw) if rng.kind is int else float(raw)
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or (rng.kind is int and value != int(value)):
        raise RunConfigError(key, f"{raw!r} is not {rng.describe()}")
    if not rng.admits(value):
        raise RunConfigError(key, f"{raw!r} is out of range: give {rng.describe()}")
    return value


def _choice(config: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> None:
    value = config.get(key, default)
    text = str(value or default).strip().lower()
    if not isinstance(value, str | type(None)) or text not in choices:
        raise RunConfigError(key, f"{value!r} is not one of {', '.join(choices)}")


def check_codec(key: str, value: Any) -> None:
    """A codec spec, or a refusal that says what specs look like."""
    try:
        parse_codec(value)
    except CodecSpecError as e:
        raise RunConfigError(key, f"{e}; {_CODEC_HINT}") from None


def _downlink(config: Mapping[str, Any]) -> None:
    codec = str(config.get("downlink-codec", "none") or "none").strip().lower()
    if codec == "none":
        return
    check_codec("downlink-codec", codec)
    from fedge.server.downlink import FIRST_CONTACTS, downlink_from_config

    _choice(config, "downlink-first-contact", "full", FIRST_CONTACTS)
    try:
        downlink_from_config(config)
    except ValueError as e:
        raise RunConfigError("downlink-codec", str(e)) from None


def _dp(config: Mapping[str, Any]) -> None:
    """Differential privacy (server/dp.py): settings that run together, a FedAvg-type
    strategy (the noise is calibrated to the unweighted mean)."""
    from fedge.server.dp import DP_STRATEGIES, dp_from_config

    try:
        settings = dp_from_config(config)
    except ValueError as e:
        key, _, why = str(e).partition(": ")
        raise RunConfigError(key if key.startswith("dp-") else "dp-noise", why or str(e)) \
            from None
    strategy = str(config.get("strategy", "fedavg") or "fedavg").strip().lower()
    if settings is not None and strategy not in DP_STRATEGIES:
        raise RunConfigError("strategy", f"{strategy!r} cannot run with dp-noise: DP-FedAvg "
                             f"needs the plain mean ({', '.join(DP_STRATEGIES)})")


def secure_aggregation_on(config: Mapping[str, Any]) -> bool:
    """`secure-aggregation` as a bool (TOML true/false; the words, from a flag or env)."""
    raw = config.get("secure-aggregation", False)
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower() if isinstance(raw, str) else None
    if text in ("true", "false"):
        return text == "true"
    raise RunConfigError("secure-aggregation", f"{raw!r} is not true or false")


def _secagg(config: Mapping[str, Any]) -> None:
    """Secure aggregation (docs/secure-aggregation.md): what can run over masked ring words."""
    on = secure_aggregation_on(config)
    bits = config.get("secagg-bits", 8)
    if isinstance(bits, str) and bits.strip().isdigit():
        bits = int(bits)
    if isinstance(bits, bool) or bits not in SECAGG_BITS:
        raise RunConfigError("secagg-bits", f"{bits!r} is not one of "
                             f"{', '.join(map(str, SECAGG_BITS))}")
    if not on:
        return
    codec = str(config.get("codec", "none") or "none").strip().lower()
    if codec != "none":
        raise RunConfigError("codec", f"{codec!r} cannot run with secure aggregation: the "
                             "masked ring words (secagg-bits) are the compression; use "
                             "--codec none")
    downlink = str(config.get("downlink-codec", "none") or "none").strip().lower()
    if downlink != "none":
        raise RunConfigError("downlink-codec", f"{downlink!r} cannot run with secure "
                             "aggregation: devices mask their delta against the plain model "
                             "they were sent; use --downlink none")
    strategy = str(config.get("strategy", "fedavg") or "fedavg").strip().lower()
    if ":" not in strategy and strategy not in SECAGG_STRATEGIES:
        raise RunConfigError("strategy", f"{strategy!r} cannot run with secure aggregation: "
                             "it ranks individual updates and the coordinator sees only their "
                             f"sum; use one of {', '.join(SECAGG_STRATEGIES)}")
    adaptive = config.get("dp-adaptive", False)
    if adaptive is True or str(adaptive).strip().lower() == "true":
        raise RunConfigError("dp-adaptive", "adaptive clipping cannot run with secure "
                             "aggregation: it needs each device's clipping bit, which would "
                             "travel in the clear; set dp-clip and leave dp-adaptive off")


def _strategy(config: Mapping[str, Any]) -> None:
    """A built-in strategy's name, or `module:object` whose module can be found (the object
    itself is loaded and checked where it is used: `server/app_loading.py`)."""
    raw = config.get("strategy", "fedavg")
    if isinstance(raw, str) and ":" in raw:
        why = _reference_problem(raw.strip())
        if why is not None:
            raise RunConfigError("strategy", f"{raw!r}: {why}; give one of "
                                 f"{', '.join(STRATEGIES)} or module:object naming a Flower "
                                 "strategy")
        return
    _choice(config, "strategy", "fedavg", STRATEGIES)


def _reference_problem(ref: str) -> str | None:
    """What is wrong with a `module:object` reference (its module is not importable, or it
    names no object), or None; the object itself is checked where it is loaded."""
    module, _, attr = ref.partition(":")
    try:
        found = bool(module) and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"no module {module!r} on the Python path"
    return None if attr else "no object"


def _task_reference(config: Mapping[str, Any]) -> str:
    """The task's name; a `module:object` whose module cannot be found is refused here."""
    raw = config.get("task", "digits")
    if not isinstance(raw, str) or not raw.strip():
        raise RunConfigError("task", f"{raw!r} is not a task: give a built-in task's name "
                             "or module:object naming a fedge Task")
    ref = raw.strip()
    if ":" in ref:
        why = _reference_problem(ref)
        if why is not None:
            raise RunConfigError("task", f"{ref!r}: {why}; give a built-in task's name or "
                                 "module:object naming a fedge Task (docs/tasks.md)")
    return ref


def _task_and_data(ref: str, config: Mapping[str, Any], num_partitions: int | None) -> None:
    """Import the task, then read its central test set (and one client's share): its data
    is there. Whatever a user's task raises here is a refusal, not a traceback."""
    from fedge.common.datasets import DatasetError
    from fedge.common.task import resolve_task

    try:
        task = resolve_task(ref)
    except Exception as e:
        raise RunConfigError("task", str(e) or type(e).__name__) from None
    try:
        task.central_test(config)
        if num_partitions is not None:
            task.load_partition(0, num_partitions, config)
    except DatasetError as e:
        raise RunConfigError("data-dir", str(e)) from None
    except Exception as e:
        raise RunConfigError("task", f"task {ref!r} cannot load its data: "
                             f"{type(e).__name__}: {e}") from None


def validate_run_config(
    config: Mapping[str, Any], *, num_partitions: int | None = None, load_task: bool = True
) -> None:
    """Refuse a run config that cannot run: `RunConfigError` names the first bad key.

    Checks values are scalars, `strategy`, `partition`, `codec`, the downlink
    (`downlink-codec`, `-first-contact`, `-keep`, `-max-age`), numeric ranges,
    differential privacy (`dp-noise` with `dp-clip`, a FedAvg-type strategy),
    secure aggregation (`secure-aggregation` with codec and downlink `none`, a
    strategy that takes one aggregated reply, `secagg-bits` 8 or 4),
    `initial-model`, then imports `task` and reads its data (with
    `num_partitions`, client 0's share too). `load_task=False` stops before the
    import (what a caller that must not load torch yet can check).
    """
    for key, value in config.items():
        if not isinstance(value, bool | int | float | str):
            raise RunConfigError(str(key), f"{value!r} is not a scalar (bool, int, float or "
                                 "string)")
    from fedge.common.partition import PARTITIONERS  # numpy: not at import, the CLI loads this

    _strategy(config)
    _choice(config, "partition", "iid", PARTITIONERS)
    _choice(config, "personalize", "none", PERSONAL_MODES)
    check_codec("codec", config.get("codec", "none"))
    hook_lr = config.get(f"lr-round-{config.get('first-round')}")
    for key, rng in _RANGES.items():
        if key == "lr" and hook_lr is not None and config.get(key) == hook_lr:
            continue  # continuous mode's test hook set this round's lr on purpose
        if key in config and not (key in DEFAULT_WHEN_EMPTY and config[key] == ""):
            _number(key, config[key], rng)
    _secagg(config)  # before the downlink's check, which loads Flower
    _downlink(config)
    _dp(config)
    initial = config.get("initial-model")
    if initial and not Path(str(initial)).is_file():
        raise RunConfigError("initial-model", f"{initial!r} is not a file")
    ref = _task_reference(config)
    if load_task:
        _task_and_data(ref, config, num_partitions)


def parse_run_config_args(args: list[str]) -> dict[str, bool | int | float | str]:
    """`--run-config` values as Flower reads them: `'k1=v1 k2=v2'` (TOML values, strings
    quoted) or one TOML file. Anything that is not KEY=VALUE, and any value that is not
    a scalar, is refused (Flower's parser would drop it silently)."""
    from fedge.common.flower_compat import RUN_CONFIG_PAIR, parse_config_args

    for arg in args:
        if not arg.endswith(".toml"):
            left = RUN_CONFIG_PAIR.sub(" ", arg).split()
            if left:
                raise RunConfigError("--run-config", f"{left[0]!r} is not KEY=VALUE; write "
                                     "'lr=0.1 local-epochs=2 codec=\"int8\"' (TOML values: "
                                     "strings in quotes) or name a .toml file")
    try:
        parsed = parse_config_args(args)
    except OSError as e:
        raise RunConfigError("--run-config", f"cannot read {e.filename}: "
                             f"{e.strerror or e}") from None
    except Exception as e:  # Flower raises ClickException, ValueError or TOMLDecodeError
        message = getattr(e, "message", None) or str(e)
        raise RunConfigError("--run-config", message) from None
    config: dict[str, bool | int | float | str] = {}
    for key, value in parsed.items():
        if not isinstance(value, bool | int | float | str):
            raise RunConfigError(key, f"{value!r} is not a scalar (bool, int, float or string)")
        config[key] = value
    return config
