"""`--log-level`: one option, one spelling and one set of choices for every long-running
command (`coordinator run`, `client run`, `simulate`, `demo`), and the one place that
turns it into Python logging.

Only typer and logging are imported: every `fedge` command loads this module.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

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


def configure_logging(level: LogLevel | str, *, flower: LogLevel | str | None = None) -> None:
    """Root logging at `level`; Flower's logger (its own handler) at `flower` when given."""
    level = LogLevel(str(level).lower())
    logging.basicConfig(level=level.number, format=LOG_FORMAT)
    if flower is not None:
        flwr_log = logging.getLogger("flwr")
        flwr_log.propagate = False  # it has its own handler: do not print twice
        flwr_log.setLevel(LogLevel(str(flower).lower()).number)
