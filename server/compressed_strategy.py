"""`CompressedStrategy`: any Flower strategy, fed compressed updates.

It wraps a `flwr.serverapp.strategy.Strategy` and is one itself, so
`CompressedStrategy(FedAvg(...), "int8").start(grid=..., ...)` is a drop-in.

- `configure_train`: the wrapped strategy samples nodes and builds messages as
  usual (fractions, minimum nodes, its own config keys such as FedProx's
  `proximal-mu`); the wrapper adds `fedge.codec` (per run, or per round via a
  callable), `fedge.base-version` (content hash of the global model) and
  `fedge.run-id` to the train config, and counts downlink bytes.
- `aggregate_train`: replies are consumed once, in order. For strategies that
  aggregate with FedAvg's own weighted mean (FedAvg, FedProx and subclasses
  that do not override `aggregate_train`) each reply is decoded and folded
  into a running weighted sum and dropped before the next one is read: memory
  O(model), not O(replies x model). Train metrics are still aggregated by the
  wrapped strategy's `train_metrics_aggr_fn`. Other strategies (FedAdam,
  FedYogi, FedMedian, FedTrimmedAvg, Krum, ...) receive the accepted replies
  with their ArrayRecord replaced by the decoded full weights, so their own
  aggregation runs unchanged.
- Bad replies (client errors, undecodable or oversized updates, NaN/Inf,
  wrong tensors or shapes, stale base model, bad weights, metrics whose keys
  disagree with the others) are dropped and counted by reason; the round
  completes with the rest.
- Per round it records uplink bytes, downlink bytes, accepted and rejected
  counts: `traffic(server_round)` -> `RoundTraffic`.
- With `dp=DpSettings(...)` (server/dp.py, docs/privacy.md) it runs user-level
  DP-FedAvg: the clipping norm goes out in the train config, each decoded
  update is clipped again here, the unweighted mean gets Gaussian noise, and
  the round's epsilon lands in `RoundTraffic.dp`. A round that would pass the
  epsilon budget is not sent: `stopped` says why.
- Started on a `SecAggGrid` (server/secagg_server.py, docs/secure-aggregation.md)
  it takes the grid's one reply per round (the global model plus the survivors'
  unweighted mean delta) and records what the secure round did: survivors as
  accepted, dropped devices as rejected, the bytes of every stage (keys, shares,
  masked words) as the round's traffic, and `secagg-int8` (the ring's quantizer)
  as what crossed the wire. Under DP the noise goes on the unmasked sum once,
  divided by the survivors (devices clipped their own updates: the coordinator
  cannot). Codec and downlink must be `none`: the masked words are the compression.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedge.common.codec_spec import parse_codec
from fedge.common.contract import (
    BASE_VERSION_KEY,
    CODEC_KEY,
    DP_BELOW_CLIP_KEY,
    DP_CLIP_KEY,
    DP_REPLY_KEY,
    RUN_ID_KEY,
)
from fedge.common.errors import UpdateRejected
from fedge.common.model_version import model_version
from fedge.common.records import records_of
from fedge.common.update_codec import DEFAULT_MAX_UPDATE_BYTES
from fedge.server.downlink import DownlinkCompressor
from fedge.server.dp import DpMean, DpRound, DpSettings, PrivacyBudget
from fedge.server.reply_decoder import (
    DecodedReply,
    Layout,
    decode_reply,
    layout_of,
    reply_bytes,
)
from fedge.server.secagg_server import SecAggGrid, SecAggResult
from fedge.server.streaming_mean import StreamingMean

log = logging.getLogger(__name__)

CodecChoice = str | Callable[[int], str]


@dataclass
class RoundTraffic:
    """What crossed the network in one round, and which replies were dropped why."""

    round: int
    codec: str = ""
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    accepted: int = 0
    accepted_nodes: list[int] = field(default_factory=list)  # src node ids, for audit trails
    rejected_reasons: Counter[str] = field(default_factory=Counter)
    train_metrics: dict[str, float] = field(default_factory=dict)
    dp: DpRound | None = None  # epsilon, delta, clip and noise of a DP round
    started_at: float = field(default_factory=time.perf_counter)
    # accepted replies by the format they arrived in: the codec a ModelUpdate names, or
    # "none" for plain arrays -- what crossed the wire, whatever `codec` asked for
    wire_codecs: Counter[str] = field(default_factory=Counter)
    # secure aggregation (SecAggResult.summary()): ring bits, survivors, bytes per stage
    secagg: dict[str, object] | None = None

    @property
    def rejected(self) -> int:
        return sum(self.rejected_reasons.values())

    @property
    def wire_codec(self) -> str:
        """The round's label from what arrived: one codec, or several joined by " | "
        (a mixed fleet); "" when no reply was accepted."""
        return " | ".join(sorted(self.wire_codecs))


def uses_fedavg_mean(strategy: Strategy) -> bool:
    """True when the strategy's arrays aggregation is FedAvg's weighted mean.

    FedAvg and FedProx qualify; FedAdam/FedYogi/FedAdagrad (FedOpt), FedAvgM,
    FedMedian, FedTrimmedAvg, Krum, Bulyan, QFedAvg all subclass FedAvg in
    flwr 1.42 but override `aggregate_train`, so they do not.
    """
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


def _message_array_bytes(message: Message) -> int:
    return reply_bytes(message)  # same count; avoids RecordDict.array_records' ref cycle


class CompressedStrategy(Strategy):
    """Wrap `strategy` so its clients may reply with compressed updates.

    `codec` is a codec spec (`"int8"`, `"int4:block=64"`, `"topk=0.01+int4"`,
    `"none"` for plain replies) or a function of the round returning one.
    `streaming` forces (True) or forbids (False) the streaming mean; by default
    it is used exactly when `uses_fedavg_mean(strategy)`.
    """

    def __init__(
        self,
        strategy: Strategy,
        codec: CodecChoice = "none",
        *,
        max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES,
        run_id: str = "",
        streaming: bool | None = None,
        downlink: DownlinkCompressor | None = None,
        dp: DpSettings | PrivacyBudget | None = None,
    ) -> None:
        self.strategy = strategy
        self.codec = codec
        self.max_update_bytes = int(max_update_bytes)
        self.run_id = run_id
        self.downlink = downlink  # compressed downlink (server/downlink.py); None: plain
        self.streaming = uses_fedavg_mean(strategy) if streaming is None else streaming
        if self.streaming and not isinstance(strategy, FedAvg):
            raise ValueError("streaming aggregation needs a FedAvg-type strategy")
        if isinstance(codec, str):
            parse_codec(codec)  # fail at construction on a bad spec
        self.privacy = PrivacyBudget(dp) if isinstance(dp, DpSettings) else dp
        if self.privacy is not None and not self.streaming:
            raise ValueError("differential privacy needs a FedAvg-type strategy (fedavg, "
                             "fedprox): its noise is calibrated to the unweighted mean")
        self.history: dict[int, RoundTraffic] = {}
        self._global: dict[str, np.ndarray] = {}
        self._layout: Layout = {}
        self._version = ""
        self._sampled = 0
        self._secure: SecAggGrid | None = None  # the SecAggGrid this strategy was started on
        self._train_down = 0  # the train messages' model bytes, counted in configure_train

    # ------------------------------------------------------------ helpers

    def codec_for(self, server_round: int) -> str:
        """The codec spec used in `server_round`, validated and in canonical spelling."""
        spec = self.codec(server_round) if callable(self.codec) else self.codec
        return parse_codec(spec).canonical

    def traffic(self, server_round: int) -> RoundTraffic:
        """The round's traffic record (created empty if the round has not started)."""
        if server_round not in self.history:
            self.history[server_round] = RoundTraffic(server_round)
        return self.history[server_round]

    @property
    def stopped(self) -> str | None:
        """Why training stopped early (the DP budget), or None while it goes on."""
        return None if self.privacy is None else self.privacy.stopped

    @property
    def weighted_by_key(self) -> str:
        return str(getattr(self.strategy, "weighted_by_key", "num-examples"))

    def _prepare_downlink(self, messages: list[Message]) -> list[Message]:
        """Compress the global model on the way down when a `downlink` is set."""
        if self.downlink is None:
            return messages
        return self.downlink.prepare(messages, self._global, self._version)

    # ------------------------------------------------------------ Strategy API

    def summary(self) -> None:
        codec = "per round" if callable(self.codec) else self.codec
        log.info("CompressedStrategy: codec %s, %s aggregation, wrapping %s", codec,
                 "streaming" if self.streaming else "delegated", type(self.strategy).__name__)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the wrapped strategy sample and build messages, with fedge's config keys added."""
        stats = self.traffic(server_round)
        stats.started_at = time.perf_counter()
        stats.codec = self.codec_for(server_round)
        self._secure = grid if isinstance(grid, SecAggGrid) else None
        if self._secure is not None and (stats.codec != "none" or self.downlink is not None):
            raise ValueError("secure aggregation needs codec none and a plain downlink: the "
                             "masked ring words are the compression")
        self._global = {k: a.numpy() for k, a in arrays.items()}
        self._layout = layout_of(self._global)
        self._version = model_version(self._global)
        cfg = ConfigRecord(dict(config))
        cfg[CODEC_KEY] = stats.codec
        cfg[BASE_VERSION_KEY] = self._version
        cfg[RUN_ID_KEY] = self.run_id
        if self.privacy is not None:
            cfg[DP_CLIP_KEY] = float(self.privacy.clip)
        messages = list(self.strategy.configure_train(server_round, arrays, cfg, grid))
        if self.privacy is not None and not self.privacy.allows(
                server_round, len(messages), len(list(grid.get_node_ids()))):
            return []  # the budget is spent: nothing is sent, the model stays
        self._sampled = len(messages)
        messages = self._prepare_downlink(messages)
        self._train_down = sum(_message_array_bytes(m) for m in messages)
        stats.downlink_bytes += self._train_down
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Unchanged from the wrapped strategy; the model bytes sent are counted."""
        if self.stopped:
            return []
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self.traffic(server_round).downlink_bytes += sum(
            _message_array_bytes(m) for m in messages
        )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Unchanged from the wrapped strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode replies one by one; stream them into a mean or hand them on decoded."""
        if not self._layout:
            raise RuntimeError("aggregate_train before configure_train: no global model known")
        if self.downlink is not None:
            replies = self.downlink.observe(replies)  # learns which model each device holds
        secure = self._secure.results.get(server_round) if self._secure is not None else None
        accepted = self._accepted(server_round, replies)
        if self.privacy is not None:
            if self.stopped:
                return None, None
            arrays, metrics = self._aggregate_private(server_round, accepted, self.privacy,
                                                      secure)
        elif self.streaming:
            arrays, metrics = self._aggregate_streaming(accepted)
        else:
            arrays, metrics = self._aggregate_delegated(server_round, accepted)
        stats = self.traffic(server_round)
        if secure is not None:
            self._record_secure(stats, secure)
        elif self._secure is not None and server_round in self._secure.failures:
            # the secure round released nothing (too many dropouts): every device sent in vain
            why = self._secure.failures[server_round].reason
            stats.rejected_reasons[f"secagg_{why}"] += self._sampled
        log.info(
            "aggregate_train: %d replies accepted, %d dropped %s",
            stats.accepted, stats.rejected, dict(stats.rejected_reasons) or "",
        )
        if metrics is not None:
            stats.train_metrics = {
                k: float(v) for k, v in metrics.items() if isinstance(v, int | float)
            }
        return arrays, metrics

    # ------------------------------------------------------------ internals

    def _accepted(
        self, server_round: int, replies: Iterable[Message]
    ) -> Iterator[tuple[Message, DecodedReply]]:
        """Yield (reply, decoded) for good replies; count bytes and rejections for all."""
        stats = self.traffic(server_round)
        metric_keys: set[str] | None = None
        for msg in replies:
            stats.uplink_bytes += reply_bytes(msg)
            try:
                decoded = decode_reply(
                    msg,
                    layout=self._layout,
                    base_version=self._version,
                    run_id=self.run_id,
                    server_round=server_round,
                    weighted_by_key=self.weighted_by_key,
                    max_update_bytes=self.max_update_bytes,
                )
                keys = set(decoded.metrics.keys())
                if metric_keys is None:
                    metric_keys = keys
                elif keys != metric_keys:
                    raise UpdateRejected("inconsistent_metrics", f"keys {sorted(keys)}")
            except UpdateRejected as ex:
                stats.rejected_reasons[ex.reason] += 1
                log.warning(
                    "round %d: dropped reply from node %d (%s)",
                    server_round, msg.metadata.src_node_id, ex,
                )
                continue
            stats.accepted += 1
            stats.accepted_nodes.append(int(msg.metadata.src_node_id))
            stats.wire_codecs[decoded.codec if decoded.compressed else "none"] += 1
            yield msg, decoded
            # Drop this reply before the loop pulls the next one: otherwise the generator frame
            # keeps it (and its decoded arrays) alive while the next reply arrives and decodes.
            del msg, decoded

    def _aggregate_streaming(
        self, accepted: Iterator[tuple[Message, DecodedReply]]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        strategy = self.strategy
        assert isinstance(strategy, FedAvg)
        mean = StreamingMean(self._global)
        metric_contents: list[RecordDict] = []
        for _msg, decoded in accepted:
            if decoded.is_delta:
                mean.add_delta(decoded.arrays, decoded.weight)
            else:
                mean.add_full(decoded.arrays, decoded.weight)
            metric_contents.append(RecordDict({decoded.metric_key: decoded.metrics}))
            del decoded, _msg  # hold one reply at a time
        result = mean.result()
        del mean  # frees the float64 running sum before the result is serialized
        if result is None:
            return None, None
        # serialize tensor by tensor, dropping each numpy array once its bytes exist
        arrays = ArrayRecord({k: Array(np.asarray(result.pop(k))) for k in list(result)})
        metrics = strategy.train_metrics_aggr_fn(metric_contents, strategy.weighted_by_key)
        return arrays, metrics

    def _record_secure(self, stats: RoundTraffic, secure: SecAggResult) -> None:
        """The round as the secure exchange saw it, not as its one synthesized reply."""
        stats.secagg = secure.summary()
        stats.uplink_bytes = secure.up_bytes()
        # the model down was counted from the train messages; add the other stages' messages
        stats.downlink_bytes += secure.down_bytes() - self._train_down
        stats.accepted = len(secure.survivors)
        stats.accepted_nodes = [int(n) for n in secure.survivors]
        if secure.dropped:
            stats.rejected_reasons["secagg_dropped"] += len(secure.dropped)
        stats.wire_codecs = Counter({f"secagg-int{secure.bits}": len(secure.survivors)})

    def _aggregate_private(
        self, server_round: int, accepted: Iterator[tuple[Message, DecodedReply]],
        privacy: PrivacyBudget, secure: SecAggResult | None = None,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP-FedAvg (server/dp.py): clip each update, unweighted mean, noise, account.

        With `secure` (a secure-aggregation round) the one reply only carries the
        metrics; the exact sum of the survivors' deltas goes in as it is (each device
        clipped its own) and the noise is calibrated to the survivors' count.
        """
        strategy = self.strategy
        assert isinstance(strategy, FedAvg)
        mean: DpMean = privacy.mean(self._global, self._sampled)
        metric_contents: list[RecordDict] = []
        for msg, decoded in accepted:
            if secure is None:
                mean.add(decoded.arrays, is_delta=decoded.is_delta, below_clip=_below_clip(msg))
            metric_contents.append(RecordDict({decoded.metric_key: decoded.metrics}))
            del decoded, msg  # hold one reply at a time
        if secure is not None and metric_contents:
            mean.add_secure_sum(secure.delta_sum_by_tensor(self._global), len(secure.survivors))
        result = mean.result()
        self.traffic(server_round).dp = privacy.finish(server_round, mean, self._sampled)
        del mean
        if result is None:
            return None, None
        arrays = ArrayRecord({k: Array(np.asarray(result.pop(k))) for k in list(result)})
        metrics = strategy.train_metrics_aggr_fn(metric_contents, strategy.weighted_by_key)
        return arrays, metrics

    def _aggregate_delegated(
        self, server_round: int, accepted: Iterator[tuple[Message, DecodedReply]]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        plain: list[Message] = []
        for msg, decoded in accepted:
            full = decoded.arrays
            if decoded.is_delta:
                full = {k: np.asarray(self._global[k] + d, dtype=self._global[k].dtype)
                        for k, d in full.items()}
            msg.content = RecordDict(
                {
                    decoded.array_key: ArrayRecord({k: Array(np.asarray(v))
                                                    for k, v in full.items()}),
                    decoded.metric_key: decoded.metrics,
                }
            )
            plain.append(msg)
        if not plain:
            return None, None
        arrays, metrics = self.strategy.aggregate_train(server_round, plain)
        return (None if arrays is None else self._conform(arrays)), metrics

    def _conform(self, record: ArrayRecord) -> ArrayRecord:
        """Cast an aggregate back to the global model's dtypes (ints rounded).

        Stock strategies may widen: FedMedian turns integer buffers into float64
        and FedAdam/FedYogi's numpy-scalar step turns float32 into float64. The
        model must keep one layout across rounds, or the downlink doubles and
        devices' updates no longer match what the server expects.
        """
        arrays = {k: a.numpy() for k, a in record.items()}
        if arrays.keys() != self._layout.keys():
            return record
        out: dict[str, Array] = {}
        for k, a in arrays.items():
            shape, dtype = self._layout[k]
            if a.shape != shape:
                return record
            if a.dtype != dtype:
                a = np.rint(a) if dtype.kind in "iub" and a.dtype.kind == "f" else a
                a = np.asarray(a, dtype=dtype)
            out[k] = Array(a)
        return ArrayRecord(out)


def _below_clip(message: Message) -> bool | None:
    """A fedge device's report that its unclipped norm was within C (None: none sent)."""
    record = records_of(message.content, ConfigRecord).get(DP_REPLY_KEY)
    value = None if record is None else record.get(DP_BELOW_CLIP_KEY)
    return value if isinstance(value, bool) else None
