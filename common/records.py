"""Which record of a Flower message is which: the one rule both sides read messages by.

A train message carries its config in the ConfigRecord "config" (or its only
ConfigRecord) and the model in its only ArrayRecord (or "arrays"), as
Flower's strategies build them (docs/CONTRACTS.md). The strategy wrapper's
downlink, the downlink cache and the compression mod must agree on that
choice, or one side would rewrite a record the other does not read.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)

#: the ConfigRecord a train message's config is in, and the ArrayRecord its model is in
CONFIG_RECORD = "config"
ARRAYS_RECORD = "arrays"


def records_of(content: RecordDict, kind: type[R]) -> dict[str, R]:
    """The records of one kind in `content`, by key.

    Use this, not `RecordDict.array_records` / `.config_records` /
    `.metric_records`: in flwr 1.42 those build a `_SyncedDict` that references
    itself (through its bound `check_value`), a cycle only the cyclic GC frees.
    Every reply touched that way keeps its arrays alive until the next full
    enough collection, which while streaming 200 replies meant tens of extra
    replies resident.
    """
    return {k: v for k, v in content.items() if isinstance(v, kind)}


def config_record(content: RecordDict) -> tuple[str, ConfigRecord] | None:
    """The message's config: ConfigRecord "config", else its only ConfigRecord, else None."""
    found = records_of(content, ConfigRecord)
    if CONFIG_RECORD in found:
        return CONFIG_RECORD, found[CONFIG_RECORD]
    return next(iter(found.items())) if len(found) == 1 else None


def model_record(content: RecordDict) -> tuple[str, ArrayRecord] | None:
    """The message's model: its only ArrayRecord, else ArrayRecord "arrays", else None."""
    found = records_of(content, ArrayRecord)
    if len(found) == 1:
        return next(iter(found.items()))
    return (ARRAYS_RECORD, found[ARRAYS_RECORD]) if ARRAYS_RECORD in found else None
