"""The coordinator's Prometheus metrics, in their own `CollectorRegistry`.

Own registry rather than prometheus-client's global one: two coordinators in
one process (tests, benchmarks) keep separate counts, and a scrape shows only
fedge's series. The coordinator calls the small methods below where things
happen; `GET /metrics` (server/http_api.py) renders `exposition()`.

Label values are bounded: rejection reasons are the codec's and service's
short codes, and anything else collapses to "other", so a misbehaving device
cannot grow the series without limit.
"""

from __future__ import annotations

import re

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fedge.server.round_metrics import RoundMetrics

ROUND_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
PREDICT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    float("inf"),
)
PREDICT_OUTCOMES = ("ok", "bad_request", "too_large", "no_model", "error")
MAX_REASONS = 64
_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")


class Metrics:
    """Counters, gauges and histograms of one coordinator; thread-safe (prometheus-client is)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds_completed = Counter(
            "fedge_rounds_completed", "Federated rounds completed.", registry=r
        )
        self.devices_connected = Gauge(
            "fedge_devices_connected", "Devices with a live session.", registry=r
        )
        self.bytes_in = Counter(
            "fedge_bytes_in", "Payload bytes received from devices (results).", registry=r
        )
        self.bytes_out = Counter(
            "fedge_bytes_out", "Payload bytes sent to devices (tasks, models).", registry=r
        )
        self.rejected_updates = Counter(
            "fedge_rejected_updates",
            "Device updates refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.round_duration = Histogram(
            "fedge_round_duration_seconds",
            "Wall time of a round, from sending its tasks to the end of its evaluation.",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.predict_latency = Histogram(
            "fedge_predict_latency_seconds",
            "Time to answer POST /v1/predict, validation included.",
            buckets=PREDICT_BUCKETS,
            registry=r,
        )
        self.predict_requests = Counter(
            "fedge_predict_requests", "Predict requests, by outcome.", ["outcome"], registry=r
        )
        self.predict_examples = Counter("fedge_predict_examples", "Examples predicted.", registry=r)
        self.dp_epsilon = Gauge(
            "fedge_dp_epsilon",
            "Differential privacy spent by the run so far: epsilon at fedge_dp_delta "
            "(RDP accountant; 0 without DP).",
            registry=r,
        )
        self.dp_delta = Gauge(
            "fedge_dp_delta", "The delta fedge_dp_epsilon is stated at.", registry=r
        )
        self._reasons: set[str] = set()

    # -- rounds and fleet (the coordinator calls these) ------------------------

    def round_completed(self, seconds: float) -> None:
        """One round done, taking `seconds` of wall time."""
        self.rounds_completed.inc()
        self.round_duration.observe(max(0.0, float(seconds)))

    def observe_round(self, record: RoundMetrics) -> None:
        """Everything one RoundMetrics says: the round, its duration, its rejections, and
        under differential privacy the epsilon spent so far.

        Bytes are not taken from it: count them where they cross the wire
        (`add_bytes_in`/`add_bytes_out`), so nothing is counted twice.
        """
        self.round_completed(record.seconds)
        for reason, count in record.rejected_reasons.items():
            self.update_rejected(reason, count)
        if record.epsilon is not None:
            self.dp_epsilon.set(record.epsilon)
            self.dp_delta.set(record.delta or 0.0)

    def set_devices_connected(self, n: int) -> None:
        """Devices with a live session right now."""
        self.devices_connected.set(max(0, int(n)))

    def add_bytes_in(self, n: int) -> None:
        """Bytes received from devices."""
        if n > 0:
            self.bytes_in.inc(n)

    def add_bytes_out(self, n: int) -> None:
        """Bytes sent to devices."""
        if n > 0:
            self.bytes_out.inc(n)

    def update_rejected(self, reason: str, count: int = 1) -> None:
        """`count` updates refused for `reason` (a short code such as "non_finite")."""
        if count > 0:
            self.rejected_updates.labels(reason=self._reason(reason)).inc(count)

    # -- the HTTP endpoint ------------------------------------------------------

    def observe_predict(self, seconds: float, *, examples: int = 0, outcome: str = "ok") -> None:
        """One predict request: its latency, examples and outcome (see PREDICT_OUTCOMES)."""
        if outcome not in PREDICT_OUTCOMES:
            outcome = "error"
        self.predict_requests.labels(outcome=outcome).inc()
        self.predict_latency.observe(max(0.0, float(seconds)))
        if examples > 0:
            self.predict_examples.inc(examples)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of a Prometheus scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _reason(self, reason: str) -> str:
        text = str(reason).strip().lower()
        if not _REASON.fullmatch(text):
            return "other"
        if text not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                return "other"
            self._reasons.add(text)
        return text
