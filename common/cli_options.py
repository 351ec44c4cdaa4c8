"""What the `fedge` commands share on their command lines.

- `--log-level`: one option, one spelling and one set of choices for every
  long-running command (`coordinator run`, `client run`, `simulate`, `demo`),
  and the one place that turns it into Python logging.
- `--json`: the one spelling of every `fedge bench` command's machine-readable output.
- `LazyChoice`: a fixed list offered as real choices (help, shell completion,
  refusal of anything else) whose list is read only when a command needs it,
  so building the `fedge` command imports nothing heavy (numpy, torch, Flower).

Only typer, click and logging are imported: every `fedge` command loads this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

import click
import typer

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogLevel(StrEnum):
    """What a command logs: its own lines always print; this sets the log beneath them."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def number(self) -> int:
        """The `logging` level."""
        return int(logging.getLevelName(self.value.upper()))


def log_level_option(default: LogLevel) -> Any:
    """The `--log-level` typer option with a command's own default."""
    return typer.Option(default, "--log-level", case_sensitive=False,
                        help="How much to log beneath the command's own output.")


def json_option() -> Any:
    """The `--json` option of every `fedge bench` command: the bench's figures as one JSON
    object on stdout (what `bench/results/` keeps), instead of a table."""
    return typer.Option(False, "--json", help="Print one JSON object and nothing else.")


def configure_logging(level: LogLevel | str, *, flower: LogLevel | str | None = None) -> None:
    """Root logging at `level`; Flower's logger (its own handler) at `flower` when given."""
    level = LogLevel(str(level).lower())
    logging.basicConfig(level=level.number, format=LOG_FORMAT)
    if flower is not None:
        flwr_log = logging.getLogger("flwr")
        flwr_log.propagate = False  # it has its own handler: do not print twice
        flwr_log.setLevel(LogLevel(str(flower).lower()).number)


class LazyChoice(click.Choice):
    """`click.Choice` over `load()`'s values, read on first use (help, completion, a value
    to check), not when the command is built."""

    def __init__(self, load: Callable[[], Sequence[str]], case_sensitive: bool = True) -> None:
        self._load = load
        self._loaded: tuple[str, ...] | None = None
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        if self._loaded is None:
            self._loaded = tuple(self._load())
        return self._loaded

    @choices.setter
    def choices(self, values: Sequence[str]) -> None:
        self._loaded = tuple(values)
