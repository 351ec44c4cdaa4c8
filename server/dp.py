"""User-level DP-FedAvg on the coordinator: clip, unweighted mean, Gaussian noise, accounting.

One layer over the streaming mean (docs/privacy.md). Per round, with n
accepted updates and clipping norm C:

1. every decoded update (compressed delta, or a stock client's full weights
   turned into a delta) is clipped to L2 norm C here, whatever the device did,
   so a stock or malicious device is bounded too;
2. the clipped updates are folded into `StreamingMean` with weight 1 each
   (the UNWEIGHTED mean: a weight a device names would scale its influence);
3. Gaussian noise with standard deviation z x C is added to the running sum,
   so the mean carries noise z x C / n; memory stays O(model);
4. the release is composed into Flower's `RdpAccountant` (dp-accounting) as a
   Poisson-sampled Gaussian with q = sampled / population, and epsilon at the
   chosen delta is reported with the round;
5. with adaptive clipping (Andrew et al. 2021) devices report whether their
   unclipped norm was within C; the noised fraction moves C geometrically
   toward the target quantile. The bits cost privacy too: the update noise
   multiplier is raised so that both releases together are a Gaussian
   mechanism of multiplier z, and the accountant composes z.

Before a round is sent, `PrivacyBudget.allows` asks whether composing it
would pass `max-epsilon`; if so, training stops there with the last model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.common.dp_clip import clip_to_norm, l2_norm
from fedge.server.streaming_mean import StreamingMean

log = logging.getLogger(__name__)

#: run-config keys (docs/coordinator.md, `fedge simulate --dp-*`)
DP_KEYS = ("dp-noise", "dp-clip", "dp-delta", "dp-max-epsilon", "dp-adaptive",
           "dp-target-quantile", "dp-clip-lr", "dp-count-noise", "dp-population",
           "dp-noise-seed")
#: strategies whose aggregate is FedAvg's mean, the only one DP-FedAvg's noise calibrates
DP_STRATEGIES = ("fedavg", "fedprox")
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class DpSettings:
    """DP-FedAvg's parameters: noise multiplier z, clipping norm C (the start, if adaptive),
    delta, an optional epsilon budget, and adaptive clipping's quantile, rate and count noise.

    `count_noise` is the standard deviation of the noise on the count of
    unclipped updates (None: sampled / 20, Andrew et al.'s choice); it must
    exceed z / 2. `population` is the number of devices sampled from (None:
    the nodes connected when the first round starts). `noise_seed` makes the
    noise reproducible, for simulations that compare runs under the same noise
    ONLY: whoever knows the seed knows the noise, and the guarantee is void.
    """

    noise_multiplier: float
    clip: float
    delta: float = DEFAULT_DELTA
    max_epsilon: float | None = None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float | None = None
    population: int | None = None
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, want: str) -> ValueError:
            return ValueError(f"{key}: {value!r} is not {want}")

        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise bad("dp-noise", self.noise_multiplier, "a number > 0")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise bad("dp-clip", self.clip, "a number > 0")
        if not 0 < self.delta < 1:
            raise bad("dp-delta", self.delta, "a number > 0 and < 1")
        if self.max_epsilon is not None and not (math.isfinite(self.max_epsilon)
                                                 and self.max_epsilon > 0):
            raise bad("dp-max-epsilon", self.max_epsilon, "a number > 0")
        if not 0 < self.target_quantile < 1:
            raise bad("dp-target-quantile", self.target_quantile, "a number > 0 and < 1")
        if not (math.isfinite(self.clip_lr) and self.clip_lr > 0):
            raise bad("dp-clip-lr", self.clip_lr, "a number > 0")
        if self.count_noise is not None and not (2 * self.count_noise > self.noise_multiplier):
            raise bad("dp-count-noise", self.count_noise,
                      f"more than dp-noise / 2 = {self.noise_multiplier / 2:g} (the count's "
                      "noise spends part of the budget; Andrew et al.)")
        if self.population is not None and self.population < 1:
            raise bad("dp-population", self.population, "a whole number >= 1")

    def count_std(self, sampled: int) -> float:
        """Std of the noise on the count of unclipped updates (adaptive clipping)."""
        return self.count_noise if self.count_noise is not None else sampled / 20.0

    def update_noise_multiplier(self, sampled: int) -> float:
        """The multiplier of the noise on the mean: z, or with adaptive clipping the z_u with
        z_u^-2 + (2 sigma_b)^-2 = z^-2, so update and count together cost exactly z."""
        z = self.noise_multiplier
        if not self.adaptive:
            return z
        sigma_b = self.count_std(sampled)
        rest = z ** -2 - (2.0 * sigma_b) ** -2
        if rest <= 0:
            raise ValueError(
                f"adaptive clipping: the count noise {sigma_b:g} (dp-count-noise, default "
                f"sampled / 20) must exceed dp-noise / 2 = {z / 2:g}; raise dp-count-noise "
                "or sample more devices a round")
        return rest ** -0.5


def _float(config: Mapping[str, Any], key: str, default: float | None) -> float | None:
    raw = config.get(key)
    if raw is None or raw == "":
        return default
    if isinstance(raw, bool):
        raise ValueError(f"{key}: {raw!r} is not a number")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: {raw!r} is not a number") from None


def _bool(config: Mapping[str, Any], key: str) -> bool:
    raw = config.get(key, False)
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{key}: {raw!r} is not true or false")


def dp_from_config(config: Mapping[str, Any]) -> DpSettings | None:
    """The run config's DP settings, None when `dp-noise` is absent or 0 and no other dp key
    is set; ValueError (naming the key) for a setting that cannot run."""
    noise = _float(config, "dp-noise", 0.0) or 0.0
    if noise == 0.0:
        given = [k for k in DP_KEYS if k != "dp-noise" and config.get(k) not in (None, "", False)]
        if given:
            raise ValueError(f"{given[0]}: needs dp-noise (the noise multiplier z > 0); "
                             "without noise nothing is differentially private")
        return None
    clip = _float(config, "dp-clip", None)
    if clip is None:
        raise ValueError("dp-clip: dp-noise needs a clipping norm C (dp-clip > 0); "
                         "docs/privacy.md says how to choose it")
    population = _float(config, "dp-population", None)
    if population is not None and population != int(population):
        raise ValueError(f"dp-population: {population!r} is not a whole number")
    seed = _float(config, "dp-noise-seed", None)
    if seed is not None and (seed != int(seed) or seed < 0):
        raise ValueError(f"dp-noise-seed: {seed!r} is not a whole number >= 0")
    return DpSettings(
        noise_multiplier=noise,
        clip=clip,
        delta=_float(config, "dp-delta", DEFAULT_DELTA) or DEFAULT_DELTA,
        max_epsilon=_float(config, "dp-max-epsilon", None),
        adaptive=_bool(config, "dp-adaptive"),
        target_quantile=_float(config, "dp-target-quantile", 0.5) or 0.5,
        clip_lr=_float(config, "dp-clip-lr", 0.2) or 0.2,
        count_noise=_float(config, "dp-count-noise", None),
        population=None if population is None else int(population),
        noise_seed=None if seed is None else int(seed),
    )


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting warns (through absl) for every RDP order it skips; that is expected."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class PrivacyLedger:
    """Epsilon spent so far: Flower's `RdpAccountant` (dp-accounting's RDP) over Poisson-
    sampled Gaussian releases, q = sample size / population, add-or-remove-one users."""

    def __init__(self, noise_multiplier: float, delta: float, population: int) -> None:
        from flwr.serverapp import (
            NeighboringRelation,
            PrivacyConfig,
            RdpAccountant,
            SamplingMethod,
        )

        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.population = int(population)
        self._accountant = RdpAccountant(PrivacyConfig(
            target_delta=self.delta,
            population_size=self.population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        ))

    def _event(self, sampled: int) -> Any:
        from flwr.serverapp import GaussianPrivacyEvent

        return GaussianPrivacyEvent(noise_multiplier=self.noise_multiplier,
                                    sample_size=max(1, min(int(sampled), self.population)),
                                    population_size=self.population)

    @property
    def releases(self) -> int:
        return self._accountant.num_releases

    def epsilon(self) -> float:
        """Epsilon at `delta` after the releases composed so far (0 before any)."""
        if self.releases == 0:
            return 0.0
        with _quiet_absl():
            return self._accountant.get_epsilon(self.delta)

    def would_exceed(self, sampled: int, max_epsilon: float) -> bool:
        """Whether one more release of `sampled` devices would pass `max_epsilon`."""
        with _quiet_absl():
            return self._accountant.would_exceed(self._event(sampled), max_epsilon=max_epsilon)

    def compose(self, sampled: int, count: int = 1) -> float:
        """Compose `count` releases of `sampled` devices; returns epsilon after them."""
        with _quiet_absl():
            self._accountant.compose(self._event(sampled), count)
        return self.epsilon()


def epsilon_for(noise_multiplier: float, sampled: int, population: int, rounds: int,
                delta: float) -> float:
    """Epsilon after `rounds` rounds of `sampled` of `population` devices (planning z)."""
    ledger = PrivacyLedger(noise_multiplier, delta, population)
    return ledger.compose(sampled, rounds)


def noise_for_epsilon(epsilon: float, sampled: int, population: int, rounds: int,
                      delta: float) -> float:
    """The smallest noise multiplier z (to 1e-3) that keeps the run within `epsilon`."""
    lo, hi = 0.05, 1.0
    while epsilon_for(hi, sampled, population, rounds, delta) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {epsilon}")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if epsilon_for(mid, sampled, population, rounds, delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def budget_refusal(settings: DpSettings, sampled: int, population: int) -> str | None:
    """Why `max_epsilon` cannot allow even one round of `sampled` of `population` devices
    (None when it can): a run that would train nothing is refused before it starts."""
    if settings.max_epsilon is None:
        return None
    ledger = PrivacyLedger(settings.noise_multiplier, settings.delta,
                           settings.population or population)
    first = ledger.compose(sampled)
    if first <= settings.max_epsilon:
        return None
    return (f"{settings.max_epsilon:g} is below the epsilon of one round ({first:.3f} at "
            f"delta {settings.delta:g}, z {settings.noise_multiplier:g}, {sampled} of "
            f"{settings.population or population} devices): raise it or --dp-noise")


class DpMean:
    """One round's clipped, unweighted, noised mean over `StreamingMean` (O(model) memory).

    `add` clips each decoded update to C and folds it with weight 1; `result`
    adds N(0, (z_u C)^2) to every coordinate of the sum, then divides by n.
    """

    def __init__(self, base: Mapping[str, np.ndarray], clip: float, noise_multiplier: float,
                 rng: np.random.Generator) -> None:
        self.mean = StreamingMean(base)
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.rng = rng
        self.below_clip = 0  # devices whose unclipped norm was within C (adaptive clipping)
        self.max_folded_norm = 0.0  # the largest norm folded in (<= C): what tests check

    @property
    def count(self) -> int:
        return self.mean.count

    def add(self, arrays: Mapping[str, np.ndarray], *, is_delta: bool,
            below_clip: bool | None = None) -> None:
        """Clip one decoded update (delta, or full weights) to C and fold it in unweighted.

        `below_clip` is the device's own bit (its norm before its clip); None
        (a stock client, which did not clip): the norm seen here decides.
        """
        base = self.mean.base
        delta = dict(arrays) if is_delta else {
            k: np.subtract(np.asarray(a), base[k], dtype=np.float64) for k, a in arrays.items()}
        clipped, norm = clip_to_norm(delta, self.clip)
        del delta
        self.below_clip += int(norm <= self.clip if below_clip is None else below_clip)
        self.max_folded_norm = max(self.max_folded_norm, l2_norm(clipped))
        self.mean.add_delta(clipped, 1.0)

    def add_secure_sum(self, delta_sum: Mapping[str, np.ndarray], count: int) -> None:
        """Fold in the exact sum of `count` devices' deltas from secure aggregation.

        The coordinator sees only the sum, so it cannot clip one device's update:
        each device clipped its own (update plus residual) to C and kept its
        quantized contribution within C (`secagg_ring.quantize_to_ring(max_norm=C)`),
        so the sum's sensitivity to one device is C, as in `add`. The noise is then
        added once to this sum and the mean divides by `count`, the survivors.
        """
        self.mean.add_sum(delta_sum, count)

    def result(self) -> dict[str, np.ndarray] | None:
        """The noised mean in the base's dtypes, None when nothing was added."""
        if self.mean.count == 0:
            return None
        self.mean.add_noise(self.noise_multiplier * self.clip, self.rng)
        return self.mean.result()


@dataclass
class DpRound:
    """What DP did in one round, for the round's record."""

    epsilon: float
    delta: float
    clip: float
    noise_std: float  # on the mean: z_u x C / n
    sampled: int
    aggregated: int


class PrivacyBudget:
    """DP-FedAvg across rounds: the current C, the ledger, the budget stop.

    The strategy wrapper calls `allows` before sending a round, `mean` to
    aggregate it and `finish` after; one instance lives as long as the run.
    `rng` draws the noise (None: seeded from the OS, as noise must be unknown
    to whoever sees the model).
    """

    def __init__(self, settings: DpSettings, rng: np.random.Generator | None = None) -> None:
        self.settings = settings
        self.clip = settings.clip
        if rng is None and settings.noise_seed is not None:
            log.warning("dp-noise-seed is set: the DP noise is reproducible, so it protects "
                        "nothing against whoever knows the seed (simulations only)")
            rng = np.random.default_rng(settings.noise_seed)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.ledger: PrivacyLedger | None = None
        self.stopped: str | None = None  # the line saying why training stopped
        self.history: dict[int, DpRound] = {}

    def _ledger(self, population: int, server_round: int, sampled: int) -> PrivacyLedger:
        if self.ledger is None:
            self.ledger = PrivacyLedger(self.settings.noise_multiplier, self.settings.delta,
                                        self.settings.population or max(population, sampled))
            if server_round > 1:  # a resumed run: earlier rounds spent budget too
                self.ledger.compose(sampled, server_round - 1)
        return self.ledger

    def allows(self, server_round: int, sampled: int, population: int) -> bool:
        """Whether round `server_round` of `sampled` devices stays within the budget; when
        not, `stopped` holds one line saying so and the run keeps its last model."""
        if self.stopped is not None:
            return False
        if sampled <= 0:
            return True
        ledger = self._ledger(population, server_round, sampled)
        limit = self.settings.max_epsilon
        if limit is not None and ledger.would_exceed(sampled, limit):
            self.stopped = (
                f"DP budget: stopping before round {server_round}: it would take epsilon "
                f"from {ledger.epsilon():.3f} past --dp-max-epsilon {limit:g} (delta "
                f"{self.settings.delta:g}); keeping the model of round {server_round - 1}")
            log.warning(self.stopped)
            return False
        return True

    def mean(self, base: Mapping[str, np.ndarray], sampled: int) -> DpMean:
        """A clipped, noised mean for this round (noise multiplier z, or z_u if adaptive)."""
        return DpMean(base, self.clip, self.settings.update_noise_multiplier(max(1, sampled)),
                      self.rng)

    def finish(self, server_round: int, mean: DpMean, sampled: int) -> DpRound:
        """Account the round's release (if anything was released) and adapt C."""
        ledger = self.ledger or self._ledger(sampled, server_round, sampled)
        used_clip = self.clip
        n = mean.count
        if n > 0:
            epsilon = ledger.compose(sampled)
            if self.settings.adaptive:
                noisy = mean.below_clip + float(self.rng.normal(
                    0.0, self.settings.count_std(sampled)))
                fraction = noisy / n
                self.clip = used_clip * math.exp(
                    -self.settings.clip_lr * (fraction - self.settings.target_quantile))
        else:
            epsilon = ledger.epsilon()
        record = DpRound(epsilon=epsilon, delta=self.settings.delta, clip=used_clip,
                         noise_std=(mean.noise_multiplier * used_clip / n) if n else 0.0,
                         sampled=sampled, aggregated=n)
        self.history[server_round] = record
        return record
