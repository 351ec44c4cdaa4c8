"""The coordinator's side of secure aggregation: four exchanges per round, only the sum learned.

`run_secagg_round(grid, train_messages, config)` turns one round of train
messages (as any strategy's `configure_train` builds them) into the SecAgg+
exchange of `fedge.common.secagg_protocol` over any Flower `Grid`, and returns
the global model plus the mean of the survivors' quantized deltas. It sees
public keys, encrypted share bundles, masked words and, at the end, the
shares it needs to remove masks: never one device's update.

`SecAggStrategy(FedAvg(...), SecAggConfig(clip=...))` wraps any Message-API
strategy: its train round goes through `run_secagg_round`, and the wrapped
strategy aggregates one reply holding the securely aggregated model (weight:
the survivors' total examples), so sampling, evaluation and the rest of
`Strategy.start` stay the wrapped strategy's.

Dropouts: a device that vanishes after its masked input is unmasked from its
neighbours' shares of its `s` key; the round completes with the exact sum of
the rest, as long as every affected device keeps `threshold` live neighbours.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedge.common import secagg_crypto as sc
from fedge.common import secagg_protocol as sp
from fedge.common.arrays import arrays_to_record
from fedge.common.flower_compat import message_to_bytes
from fedge.common.records import config_record, model_record, records_of
from fedge.common.secagg_errors import SecAggRefused
from fedge.common.secagg_ring import QMAX, RingSpec, ring_sum_to_float, unpack_words

log = logging.getLogger(__name__)

#: subsets of shares tried when a reconstruction disagrees with its commitment (lying devices)
MAX_SUBSETS = 256

ClipChoice = float | Sequence[float] | Callable[[int, dict[str, np.ndarray]], Sequence[float]]


@dataclass
class SecAggConfig:
    """A secure-aggregation round's public parameters.

    `clip`: the clipping range of each float tensor's delta (one number for
    all, one per tensor in model order, or a callable (round, global arrays)
    -> ranges, e.g. derived from the previous round's public aggregate).
    `degree`/`threshold`: neighbours per device and shares needed (defaults:
    enough neighbours that `max_dropout` rarely breaks a round, and a majority).
    `error_feedback`: devices carry what the shared-scale quantizer dropped
    into their next round.
    """

    clip: ClipChoice = 0.05
    bits: int = 8
    degree: int | None = None
    threshold: int | None = None
    error_feedback: bool = False
    #: the dropout rate the default degree is sized for (`secagg_protocol.default_degree`)
    max_dropout: float = sp.DEFAULT_MAX_DROPOUT
    timeout: float | None = None
    #: the smallest number of survivors a round may release a sum of
    min_survivors: int = 2
    #: measure each stage's bytes (serializes every message once more: off where the Grid counts)
    count_bytes: bool = True

    def __post_init__(self) -> None:
        """Refuse a bad setting when the strategy is built, not rounds later."""
        problems = []
        if self.bits not in QMAX:
            problems.append(f"bits {self.bits} (use {', '.join(map(str, QMAX))})")
        if isinstance(self.clip, int | float) and not (self.clip > 0 and math.isfinite(self.clip)):
            problems.append(f"clip {self.clip} (must be positive)")
        if self.degree is not None and self.degree < 1:
            problems.append(f"degree {self.degree}")
        if self.threshold is not None and self.threshold < 1:
            problems.append(f"threshold {self.threshold}")
        if not 0 <= self.max_dropout < 1:
            problems.append(f"max_dropout {self.max_dropout} (must be in [0, 1))")
        if self.min_survivors < 1:
            problems.append(f"min_survivors {self.min_survivors}")
        if problems:
            raise SecAggRefused("bad_config", "; ".join(problems))


@dataclass
class StageTraffic:
    """Bytes of Flower protobuf per stage: down (coordinator to devices) and up."""

    down: int = 0
    up: int = 0
    replies: int = 0


@dataclass
class SecAggResult:
    """The outcome of one secure-aggregation round."""

    arrays: ArrayRecord
    delta_sum: np.ndarray
    survivors: list[int]
    dropped: list[int]
    num_examples: int
    metrics: MetricRecord
    refused: Counter[str] = field(default_factory=Counter)
    traffic: dict[str, StageTraffic] = field(default_factory=dict)
    server_seconds: float = 0.0
    round_trips: int = 4
    degree: int = 0
    threshold: int = 0
    bits: int = 0  # the quantizer's bits
    word_bits: int = 0  # the ring's: bits + ceil(log2 n)

    def up_bytes(self) -> int:
        """Device upload, every stage: keys, share bundles, masked words, unmask shares."""
        return sum(t.up for t in self.traffic.values())

    def down_bytes(self) -> int:
        """Coordinator to devices, every stage (the masked-input stage carries the model)."""
        return sum(t.down for t in self.traffic.values())

    def summary(self) -> dict[str, object]:
        """What a round record says of it: the ring used, who survived, bytes per stage."""
        return {
            "bits": self.bits, "ring_bits": self.word_bits, "survivors": len(self.survivors),
            "dropped": len(self.dropped), "degree": self.degree, "threshold": self.threshold,
            "up_bytes": {stage: t.up for stage, t in self.traffic.items()},
            "down_bytes": {stage: t.down for stage, t in self.traffic.items()},
            "refused": dict(self.refused),
        }

    def delta_sum_by_tensor(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The survivors' delta sum per tensor of `arrays` (the model the round started
        from): float tensors in model order, as masked; integer tensors were not summed (0)."""
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, a in arrays.items():
            if np.issubdtype(a.dtype, np.floating):
                out[name] = self.delta_sum[offset : offset + a.size].reshape(a.shape)
                offset += a.size
            else:
                out[name] = np.zeros(a.shape, np.float64)
        return out


@dataclass
class _Peer:
    node_id: int
    index: int
    c_pk: bytes = b""
    s_pk: bytes = b""
    neighbours: list[int] = field(default_factory=list)
    commit: bytes = b""
    inbox: list[tuple[int, bytes]] = field(default_factory=list)
    masked_with: list[int] = field(default_factory=list)


class AdaptiveClip:
    """Clipping ranges from public information: the previous round's aggregate.

    Round 1 uses `initial` for every float tensor; after each round, tensor t's
    range becomes `factor` x the largest |mean delta| of t that the round
    released, kept within [initial / spread, initial * spread]. The mean of
    many devices' deltas is smaller than any one of them, hence a generous
    factor; what is still clipped, error feedback repays. Pass it as
    `SecAggConfig(clip=AdaptiveClip(0.1))`; `SecAggGrid` feeds it each result.
    """

    def __init__(self, initial: float, factor: float = 4.0, spread: float = 16.0) -> None:
        if not (initial > 0 and factor > 0 and spread >= 1):
            raise SecAggRefused(
                "bad_config", "AdaptiveClip needs initial > 0, factor > 0, spread >= 1"
            )
        self.initial, self.factor, self.spread = initial, factor, spread
        self.ranges: list[float] | None = None

    def __call__(self, server_round: int, arrays: dict[str, np.ndarray]) -> list[float]:
        names = [k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating)]
        if self.ranges is None or len(self.ranges) != len(names):
            return [self.initial] * len(names)
        return list(self.ranges)

    def observe(self, result: SecAggResult, arrays: dict[str, np.ndarray]) -> None:
        """Learn the next ranges from a released round (`arrays`: the model it started from)."""
        mean = result.delta_sum / max(1, len(result.survivors))
        lo, hi = self.initial / self.spread, self.initial * self.spread
        ranges, offset = [], 0
        for a in arrays.values():
            if not np.issubdtype(a.dtype, np.floating):
                continue
            part = mean[offset : offset + a.size]
            offset += a.size
            peak = float(np.abs(part).max()) if part.size else 0.0
            ranges.append(min(hi, max(lo, self.factor * peak)))
        self.ranges = ranges


def _clip_ranges(clip: ClipChoice, server_round: int, arrays: dict[str, np.ndarray]) -> list[float]:
    names = [k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating)]
    if callable(clip):
        ranges = [float(c) for c in clip(server_round, arrays)]
    elif isinstance(clip, int | float):
        ranges = [float(clip)] * len(names)
    else:
        ranges = [float(c) for c in clip]
    if len(ranges) != len(names) or any(not (c > 0 and np.isfinite(c)) for c in ranges):
        raise SecAggRefused(
            "bad_config", f"need {len(names)} positive clipping ranges, got {len(ranges)}"
        )
    return ranges


def _send(
    grid: Grid,
    messages: list[Message],
    stage: str,
    traffic: dict[str, StageTraffic],
    timeout: float | None,
    count_bytes: bool,
) -> Iterable[tuple[Message, bytes | None]]:
    """Send one stage's messages; yield (reply, None) or (reply, error reason)."""
    t = traffic.setdefault(stage, StageTraffic())
    if count_bytes:
        t.down += sum(len(message_to_bytes(m)) for m in messages)
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if count_bytes:
            t.up += len(message_to_bytes(reply))
        t.replies += 1
        yield reply, (str(reply.error.reason).encode() if reply.has_error() else None)


def _secagg_fields(reply: Message) -> ConfigRecord | None:
    return records_of(reply.content, ConfigRecord).get(sp.SECAGG_RECORD)


def run_secagg_round(
    grid: Grid,
    train_messages: Sequence[Message],
    config: SecAggConfig,
    *,
    server_round: int = 0,
) -> SecAggResult:
    """One secure-aggregation round over `grid` for the given train messages.

    Raises SecAggRefused when too few devices survive to release a sum.
    """
    started = time.perf_counter()
    client_wait = 0.0
    refused: Counter[str] = Counter()
    traffic: dict[str, StageTraffic] = {}
    if not train_messages:
        raise SecAggRefused("bad_config", "no train messages")
    found = model_record(train_messages[0].content)
    if found is None:
        raise SecAggRefused("bad_config", "the train message carries no model")
    global_arrays = {k: a.numpy() for k, a in found[1].items()}
    clip = _clip_ranges(config.clip, server_round, global_arrays)
    n = len(train_messages)
    spec = RingSpec(config.bits, n)
    degree = (
        config.degree if config.degree is not None else sp.default_degree(n, config.max_dropout)
    )
    threshold = config.threshold if config.threshold is not None else sp.default_threshold(degree)
    nonce = os.urandom(8)
    run_id = grid.run.run_id
    tag = sp.round_tag(run_id, server_round, nonce)
    graph = sp.neighbour_graph(n, degree, int.from_bytes(nonce, "big"))
    peers = {
        m.metadata.dst_node_id: _Peer(m.metadata.dst_node_id, i)
        for i, m in enumerate(train_messages)
    }
    by_index = {p.index: p for p in peers.values()}
    base = {sp.ROUND_TAG: tag}

    def stage_msg(
        peer: _Peer, stage: str, fields: dict, content: RecordDict | None = None
    ) -> Message:
        rec = ConfigRecord({**base, sp.STAGE: stage, **fields})
        body = content if content is not None else RecordDict()
        body[sp.SECAGG_RECORD] = rec
        # group id = the round, so a Grid that files tasks by round (GrpcGrid) keeps them together
        return Message(body, peer.node_id, MessageType.TRAIN, group_id=str(server_round))

    def timed_replies(msgs: list[Message], stage: str) -> Iterator[tuple[_Peer, Message]]:
        """Valid replies one at a time (streamed if the grid streams); waits are device time."""
        nonlocal client_wait
        replies = iter(_send(grid, msgs, stage, traffic, config.timeout, config.count_bytes))
        while True:
            t0 = time.perf_counter()
            item = next(replies, None)
            client_wait += time.perf_counter() - t0
            if item is None:
                return
            reply, err = item
            peer = peers.get(reply.metadata.src_node_id)
            if peer is None:
                refused["unknown_node"] += 1
            elif err is not None:
                refused[f"{stage}:device_error"] += 1
            else:
                yield peer, reply

    # 1. advertise keys
    msgs = [
        stage_msg(
            p,
            sp.ADVERTISE,
            {sp.INDEX: p.index, sp.CLIENTS: n, sp.BITS: config.bits, sp.THRESHOLD: threshold},
        )
        for p in peers.values()
    ]
    u0: set[int] = set()
    for peer, reply in timed_replies(msgs, sp.ADVERTISE):
        f = _secagg_fields(reply)
        c_pk = f.get(sp.C_PK) if f else None
        s_pk = f.get(sp.S_PK) if f else None
        if not (
            isinstance(c_pk, bytes) and isinstance(s_pk, bytes) and len(c_pk) == len(s_pk) == 32
        ):
            refused["advertise:bad_key"] += 1
            continue
        peer.c_pk, peer.s_pk = c_pk, s_pk
        u0.add(peer.index)

    # 2. share keys
    msgs = []
    for i in sorted(u0):
        p = by_index[i]
        p.neighbours = [j for j in graph[i] if j in u0]
        msgs.append(
            stage_msg(
                p,
                sp.SHARE_KEYS,
                {
                    sp.NEIGHBOURS: p.neighbours,
                    sp.C_PKS: [by_index[j].c_pk for j in p.neighbours],
                    sp.S_PKS: [by_index[j].s_pk for j in p.neighbours],
                },
            )
        )
    u1: set[int] = set()
    outbox: dict[int, list[tuple[int, bytes]]] = {}
    for peer, reply in timed_replies(msgs, sp.SHARE_KEYS):
        f = _secagg_fields(reply)
        to = f.get(sp.TO) if f else None
        bundles = f.get(sp.BUNDLES) if f else None
        commit = f.get(sp.COMMIT) if f else None
        if (
            to != peer.neighbours
            or not isinstance(bundles, list)
            or len(bundles) != len(peer.neighbours)
            or not all(isinstance(b, bytes) for b in bundles)
            or not isinstance(commit, bytes)
            or len(commit) != 32
        ):
            refused["share-keys:malformed"] += 1
            continue
        peer.commit = commit
        outbox[peer.index] = [
            (j, b) for j, b in zip(peer.neighbours, bundles, strict=True) if isinstance(b, bytes)
        ]
        u1.add(peer.index)
    for i in u1:
        for j, bundle in outbox[i]:
            if j in u1:
                by_index[j].inbox.append((i, bundle))

    # 3. masked input: the train message itself, plus the shares addressed to each device
    train_by_node = {m.metadata.dst_node_id: m for m in train_messages}
    msgs = []
    for i in sorted(u1):
        p = by_index[i]
        p.masked_with = [s for s, _ in p.inbox]
        content = RecordDict(dict(train_by_node[p.node_id].content.items()))
        msgs.append(
            stage_msg(
                p,
                sp.MASKED_INPUT,
                {
                    sp.FROM: p.masked_with,
                    sp.BUNDLES: [b for _, b in p.inbox],
                    sp.CLIP: clip,
                    sp.ERROR_FEEDBACK: config.error_feedback,
                },
                content,
            )
        )
    total_words = sum(a.size for a in global_arrays.values() if np.issubdtype(a.dtype, np.floating))
    acc = np.zeros(total_words, spec.dtype)
    u2: list[int] = []
    metrics: list[tuple[int, MetricRecord]] = []
    for peer, reply in timed_replies(msgs, sp.MASKED_INPUT):
        try:
            words, reply_metrics, examples = _masked_words(reply, total_words, spec)
        except SecAggRefused as exc:
            refused[f"masked-input:{exc.reason}"] += 1
            continue
        acc += words
        u2.append(peer.index)
        metrics.append((examples, reply_metrics))
    survivors = sorted(u2)
    dropped = sorted(u1 - set(u2))
    if len(survivors) < config.min_survivors:
        raise SecAggRefused("too_few_neighbours", f"{len(survivors)} masked inputs arrived")

    # 4. unmask
    msgs = [
        stage_msg(by_index[i], sp.UNMASK, {sp.SURVIVORS: survivors, sp.DROPPED: dropped})
        for i in survivors
    ]
    seed_points: dict[int, list[tuple[int, bytes]]] = {i: [] for i in survivors}
    key_points: dict[int, list[tuple[int, bytes]]] = {i: [] for i in dropped}
    for peer, reply in timed_replies(msgs, sp.UNMASK):
        f = _secagg_fields(reply)
        try:
            pairs = _unmask_shares(f, peer, set(survivors), set(dropped))
        except SecAggRefused as exc:
            refused[f"unmask:{exc.reason}"] += 1
            continue
        for target, share, is_key in pairs:
            (key_points if is_key else seed_points)[target].append(
                (sp.share_point(peer.index), share)
            )

    mask_bits = spec.word_bits
    for i in survivors:
        p = by_index[i]
        seed = _reconstruct(
            seed_points[i],
            threshold,
            sc.SEED_BYTES,
            _commitment_check(tag, p),
        )
        acc -= sc.expand_mask(seed, total_words, mask_bits)
    survivor_set = set(survivors)
    for d in dropped:
        pd = by_index[d]
        s_sk = _reconstruct(key_points[d], threshold, sc.KEY_BYTES, _public_key_check(pd))
        for j in survivor_set:
            pj = by_index[j]
            if d not in pj.masked_with:
                continue
            lo, hi = min(d, j), max(d, j)
            pair_seed = sc.agree(s_sk, pj.s_pk, sc.mask_info(tag, lo, hi))
            mask = sc.expand_mask(pair_seed, total_words, mask_bits)
            if j < d:
                acc -= mask
            else:
                acc += mask
    acc &= spec.dtype(spec.modulus_mask)
    scales = (
        np.concatenate(
            [
                np.full(a.size, c / spec.qmax, np.float32)
                for (a, c) in zip(
                    [a for a in global_arrays.values() if np.issubdtype(a.dtype, np.floating)],
                    clip,
                    strict=True,
                )
            ]
        )
        if total_words
        else np.zeros(0, np.float32)
    )
    delta_sum = ring_sum_to_float(acc, scales, spec, len(survivors))
    mean = delta_sum / np.float32(len(survivors))
    new_arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, a in global_arrays.items():
        if np.issubdtype(a.dtype, np.floating):
            part = mean[offset : offset + a.size].reshape(a.shape)
            offset += a.size
            new_arrays[name] = (a.astype(np.float32) + part).astype(a.dtype)
        else:
            new_arrays[name] = a
    total_examples, merged = _merge_metrics(metrics)
    server_seconds = time.perf_counter() - started - client_wait
    return SecAggResult(
        arrays=arrays_to_record(new_arrays),
        delta_sum=delta_sum,
        survivors=[by_index[i].node_id for i in survivors],
        dropped=[by_index[i].node_id for i in dropped],
        num_examples=total_examples,
        metrics=merged,
        refused=refused,
        traffic=traffic,
        server_seconds=server_seconds,
        degree=degree,
        threshold=threshold,
        bits=config.bits,
        word_bits=spec.word_bits,
    )


def _masked_words(reply: Message, n: int, spec: RingSpec) -> tuple[np.ndarray, MetricRecord, int]:
    found = records_of(reply.content, ArrayRecord)
    arrays = next(iter(found.values())) if len(found) == 1 else None
    if arrays is None or list(arrays.keys()) != [sp.MASKED_KEY]:
        raise SecAggRefused("malformed", "a masked-input reply holds exactly one masked array")
    arr = arrays[sp.MASKED_KEY]
    if arr.stype != sp.MASKED_STYPE or arr.dtype != "uint8":
        raise SecAggRefused("malformed", f"masked array {arr.dtype}/{arr.stype}")
    words = unpack_words(arr.data, n, spec.word_bits)
    if words.size and int(words.max()) > spec.modulus_mask:
        raise SecAggRefused("malformed", "masked word outside the ring")
    metric_records = records_of(reply.content, MetricRecord)
    mrec = metric_records.get("metrics") or (
        next(iter(metric_records.values())) if metric_records else None
    )
    if mrec is None:
        return words, MetricRecord(), 0
    examples = mrec.get("num-examples", 0)
    if not isinstance(examples, int) or examples < 0:
        raise SecAggRefused("malformed", f"num-examples {examples!r}")
    return words, mrec, examples


def _unmask_shares(
    f: ConfigRecord | None, peer: _Peer, survivors: set[int], dropped: set[int]
) -> list[tuple[int, bytes, bool]]:
    if f is None:
        raise SecAggRefused("malformed", "unmask reply without its record")
    out: list[tuple[int, bytes, bool]] = []
    for of_key, shares_key, allowed, is_key in (
        (sp.SEED_OF, sp.SEED_SHARES, survivors, False),
        (sp.KEY_OF, sp.KEY_SHARES, dropped, True),
    ):
        targets, shares = f.get(of_key), f.get(shares_key)
        if (
            not isinstance(targets, list)
            or not isinstance(shares, list)
            or len(targets) != len(shares)
        ):
            raise SecAggRefused("share_malformed", f"{of_key} and {shares_key} disagree")
        for t, s in zip(targets, shares, strict=True):
            if not isinstance(t, int) or not isinstance(s, bytes) or len(s) != sc.SHARE_BYTES:
                raise SecAggRefused("share_malformed", f"share for {t!r}")
            if t not in allowed or t not in peer.masked_with:
                raise SecAggRefused(
                    "share_misaddressed", f"share for device {t} not asked of {peer.index}"
                )
            out.append((t, s, is_key))
    return out


def _commitment_check(tag: bytes, peer: _Peer) -> Callable[[bytes], bool]:
    return lambda seed: sc.commitment(seed, tag, peer.index) == peer.commit


def _public_key_check(peer: _Peer) -> Callable[[bytes], bool]:
    return lambda secret: sc.public_key(secret) == peer.s_pk


def _reconstruct(
    points: list[tuple[int, bytes]], threshold: int, size: int, check: Callable[[bytes], bool]
) -> bytes:
    """The secret from `threshold` points, checked; other subsets are tried if a share lies."""
    if len(points) < threshold:
        raise SecAggRefused(
            "reconstruction_failed",
            f"{len(points)} shares, threshold {threshold}: too many dropped",
        )
    for subset in itertools.islice(itertools.combinations(points, threshold), MAX_SUBSETS):
        try:
            secret = sc.shamir_combine(list(subset), size)
        except SecAggRefused:
            continue
        if check(secret):
            return secret
    raise SecAggRefused("reconstruction_failed", "no subset of shares matches the commitment")


def _merge_metrics(metrics: list[tuple[int, MetricRecord]]) -> tuple[int, MetricRecord]:
    """Total examples, and every numeric metric averaged weighted by examples (as FedAvg does)."""
    total = sum(e for e, _ in metrics)
    merged: dict[str, int | float | list[int] | list[float]] = {"num-examples": total}
    keys = set.intersection(*(set(m.keys()) for _, m in metrics)) if metrics else set()
    for key in sorted(keys - {"num-examples"}):
        vals = [(e, m[key]) for e, m in metrics]
        numbers = [(e, float(v)) for e, v in vals if isinstance(v, int | float)]
        if len(numbers) == len(vals) and total > 0:
            merged[key] = sum(e * v for e, v in numbers) / total
    return total, MetricRecord(merged)


class SecAggGrid(Grid):
    """A Grid that runs every train round through `run_secagg_round` and answers with one reply."""

    def __init__(self, grid: Grid, config: SecAggConfig) -> None:
        self.grid = grid
        self.config = config
        self.results: dict[int, SecAggResult] = {}
        #: rounds that released nothing (too many dropouts, bad config), and why
        self.failures: dict[int, SecAggRefused] = {}

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        batch = list(messages)
        if not batch or any(m.metadata.message_type != MessageType.TRAIN for m in batch):
            return self.grid.send_and_receive(batch, timeout=timeout)
        found = config_record(batch[0].content)
        value = found[1].get("server-round", 0) if found else 0
        server_round = value if isinstance(value, int) else 0
        try:
            result = run_secagg_round(self.grid, batch, self.config, server_round=server_round)
        except SecAggRefused as exc:
            # no sum can be released this round: the strategy sees no replies, the model stays
            log.warning("round %d: secure aggregation failed: %s", server_round, exc)
            self.failures[server_round] = exc
            return []
        self.results[server_round] = result
        clip = self.config.clip
        if isinstance(clip, AdaptiveClip):
            found_model = model_record(batch[0].content)
            if found_model is not None:
                clip.observe(result, {k: a.numpy() for k, a in found_model[1].items()})
        content = RecordDict({"arrays": result.arrays, "metrics": result.metrics})
        return [Message(content, reply_to=batch[0])]


class SecAggStrategy(Strategy):
    """Any Message-API strategy with its train rounds securely aggregated.

    The wrapped strategy samples and configures as usual; each train round's
    messages go through `run_secagg_round`, and the strategy aggregates one
    reply: the global model plus the survivors' mean delta, weighted by their
    total examples. Per-device metrics other than the mean are not kept.
    """

    def __init__(self, strategy: Strategy, config: SecAggConfig) -> None:
        self.strategy = strategy
        self.config = config
        self.grid: SecAggGrid | None = None

    def configure_train(self, server_round, arrays, config, grid):
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def result(self, server_round: int) -> SecAggResult | None:
        """What round `server_round`'s secure aggregation saw (survivors, dropped, traffic)."""
        return self.grid.results.get(server_round) if self.grid else None

    def start(self, grid: Grid, *args, **kwargs) -> Result:
        self.grid = SecAggGrid(grid, self.config)
        return Strategy.start(self, self.grid, *args, **kwargs)
