"""CANIFE as a Flower strategy wrapper: per-round empirical epsilon of the strategy it wraps.

Maddock, Sablayrolles and Stock, "CANIFE: crafting canaries for empirical privacy measurement in federated
learning" (arXiv 2210.02912; facebookresearch/canife, FLSim `canary_sync_trainer.py`). `CanifeStrategy`
wraps a strategy as Flower's DP wrappers do (`DifferentialPrivacyServerSideFixedClipping(strategy, ...)`):
training goes through the wrapped strategy unchanged, and on audited rounds (1, 1 + k, 1 + 2k, ... for
`audit_every` = k):

1. `configure_train`: a designated canary client (a node id, or one drawn from the connected nodes at the
   first audit and kept) is asked, with the round's global model, to craft a canary update
   (`tramontane.federated.canary`): in the same message as its training task if the wrapped strategy sampled
   it, else in a message of its own. The canary is never part of a released model.
2. `aggregate_train`: the canary record is taken out of the replies and the wrapped strategy aggregates the
   rest: that is the round's one release. Then, as CANIFE's frozen rounds (`train_freeze`), the round is
   replayed `trials` times with and `trials` times without the canary update added to the cohort's clipped
   updates, each replay with fresh noise from a stream of its own and nothing recorded
   (`replay_train`, which the wrapped strategy must implement: `DPFedAvg` does). Each replayed model is
   scored by the canary's projection (`canary_score`).
3. `estimators.empirical_epsilon` on the two score sets gives the round's empirical epsilon with its
   Clopper-Pearson interval, beside the theoretical epsilon of one unsampled Gaussian release at the same
   delta (the canary is in every "with" replay: sampling does not apply). `composed` turns the audited rounds
   into an empirical epsilon of the whole run (`estimators.compose_estimates`, CANIFE's compounding: each
   audit stands for the rounds up to the next one, re-accounted with the run's real sampling rate), to set
   beside the ledger's epsilon.

What the replays hold fixed. The model is frozen at the round's global model (as in CANIFE) and so is the
cohort: its clipped updates S are those of the real round. The scores then measure the noise mechanism at
this round given S: <u, S> is a constant shift of both score sets, so the crafting only has to keep the
canary's own contribution whole (norm C) for the measurement to be exact; CANIFE's fresh cohorts per frozen
round add the other clients' spread along u to both score sets, which the crafting reduces; that spread does
not depend on the canary, so it can only make the best test worse (lower the estimate). The audit reads
the noise-free sum through its replays: it is a measurement for whoever already holds the server's secrets
(the federation's operator), not a release.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tramontane.audit.estimators import (
    ZERO_ERROR_RULES,
    ComposedEstimate,
    EpsilonEstimate,
    compose_estimates,
    empirical_epsilon,
    gaussian_epsilon,
)
from tramontane.errors import ConfigError
from tramontane.federated import INSTALL_HINT
from tramontane.federated.canary import (
    ACTION_KEY,
    CANARY_ONLY,
    CANARY_RECORD,
    POOL_KEY,
    UPDATE_AND_CANARY,
    canary_score,
)
from tramontane.federated.clipping import Arrays
from tramontane.federated.flower import ARRAYS_KEY, CONFIG_KEY, MAX_NORM_KEY, record_number, to_arrays
from tramontane.seeding import numpy_rng

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(INSTALL_HINT) from err

logger = logging.getLogger(__name__)


@runtime_checkable
class Replayable(Protocol):
    """A strategy whose last aggregation can be replayed: the model `aggregate_train` would release for
    these replies plus `extra` clipped updates, with fresh noise, recording nothing."""

    def replay_train(self, server_round: int, replies: list[Message], extra: list[Arrays]) -> ArrayRecord: ...


@dataclass(frozen=True)
class CanifeConfig:
    """How `CanifeStrategy` audits.

    Args:
        audit_every: audit rounds 1, 1 + k, 1 + 2k, ...; each audit stands for k rounds in the composition.
        trials: replays with, and as many without, the canary per audited round.
        design_pool: m, the mock clients the canary client crafts against (m < the model's size).
        canary_node: the canary client's node id; None: drawn among the connected nodes at the first audit.
        confidence: level of each Clopper-Pearson interval.
        estimator_delta: delta of the per-round estimate; None: 1 / (2 trials), CANIFE's 1 / (scores).
        zero_error: the estimator's rule at zero error rates (`estimators.empirical_epsilon`).
        seed: None (fresh entropy: the canary node's draw) or a fixed seed.
    """

    audit_every: int = 1
    trials: int = 200
    design_pool: int = 16
    canary_node: int | None = None
    confidence: float = 0.95
    estimator_delta: float | None = None
    zero_error: str = "canife"
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("audit_every", "trials", "design_pool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CANIFE's {name} must be an integer >= 1, got {value!r}")
        if self.trials < 10:
            raise ConfigError(f"CANIFE needs at least 10 trials per audited round, got {self.trials}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.estimator_delta is not None and not 0 <= self.estimator_delta < 1:
            raise ConfigError(f"estimator_delta must be in [0, 1), got {self.estimator_delta}")
        if self.zero_error not in ZERO_ERROR_RULES:
            raise ConfigError(f"zero_error must be one of {list(ZERO_ERROR_RULES)}, got {self.zero_error!r}")


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


@dataclass(frozen=True)
class RoundAudit:
    """CANIFE's measurement of one round."""

    round: int
    canary_node: int
    estimate: EpsilonEstimate
    theoretical_epsilon: float  # one unsampled Gaussian release at the estimator's delta (inf when sigma = 0)
    signal_to_noise: float  # (mean with - mean without) / std without: 1 / sigma for an exact canary
    canary_norm: float
    design_pool: int
    scores_with: np.ndarray = field(repr=False)
    scores_without: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "canary_node": self.canary_node, "estimate": self.estimate.to_dict(),
                "theoretical_epsilon": _num(self.theoretical_epsilon),
                "signal_to_noise": _num(self.signal_to_noise), "canary_norm": self.canary_norm,
                "design_pool": self.design_pool, "trials": len(self.scores_with)}


class CanifeStrategy(Strategy):
    """Audit the rounds of `strategy` with CANIFE (module docstring).

    Args:
        strategy: the strategy to audit; it must implement `replay_train` (`Replayable`), as `DPFedAvg` does.
        sample_rate: the run's client sampling rate q (for the composition over the run).
        noise_multiplier: the run's sigma (0: a non-private run, whose infinite estimates stay infinite).
        max_update_norm: C: the canary's norm.
        delta: the delta the run's empirical epsilon is composed at (the ledger's).
        config: how to audit.
    """

    def __init__(self, strategy: Strategy, *, sample_rate: float, noise_multiplier: float,
                 max_update_norm: float, delta: float, config: CanifeConfig | None = None) -> None:
        super().__init__()
        if not isinstance(strategy, Replayable):
            raise ConfigError(f"CANIFE replays the rounds of the strategy it audits; "
                              f"{type(strategy).__name__} has no replay_train (tramontane's DPFedAvg has)")
        self.strategy = strategy
        self.sample_rate, self.noise_multiplier = sample_rate, noise_multiplier
        self.max_update_norm, self.delta = max_update_norm, delta
        self.config = CanifeConfig() if config is None else config
        self.canary_node = self.config.canary_node
        self.audits: list[RoundAudit] = []
        self._before: dict[int, Arrays] = {}

    def __repr__(self) -> str:
        return f"CanifeStrategy({self.strategy!r}, {self.config})"

    def summary(self) -> None:
        logger.info("CANIFE: audits every %d round(s), %d trials each way, design pool %d",
                    self.config.audit_every, self.config.trials, self.config.design_pool)
        self.strategy.summary()

    def audited(self, server_round: int) -> bool:
        return (server_round - 1) % self.config.audit_every == 0

    def _pick_canary_node(self, grid: Grid) -> int:
        if self.canary_node is None:
            nodes = sorted(grid.get_node_ids())
            if not nodes:
                raise ConfigError("no node is connected to act as the canary client")
            draw = numpy_rng(self.config.seed, "CANIFE canary node").integers(len(nodes))
            self.canary_node = int(nodes[int(draw)])
            logger.info("CANIFE canary client: node %d", self.canary_node)
        return self.canary_node

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not self.audited(server_round):
            return messages
        node = self._pick_canary_node(grid)
        self._before[server_round] = to_arrays(arrays)
        own = [m for m in messages if m.metadata.dst_node_id == node]
        template = own[0].content if own else RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        records: dict[str, Any] = dict(template.array_records)
        for key, record in template.config_records.items():
            records[key] = ConfigRecord(dict(record))
        canary_config = records.setdefault(CONFIG_KEY, ConfigRecord())
        canary_config[ACTION_KEY] = UPDATE_AND_CANARY if own else CANARY_ONLY
        canary_config[POOL_KEY] = self.config.design_pool
        canary_config[MAX_NORM_KEY] = self.max_update_norm
        message = Message(RecordDict(records), dst_node_id=node, message_type=MessageType.TRAIN)
        return [m for m in messages if m.metadata.dst_node_id != node] + [message]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        before = self._before.pop(server_round, None)
        if before is None:
            return self.strategy.aggregate_train(server_round, replies)
        canary: Arrays | None = None
        pool = 0
        real: list[Message] = []
        for reply in replies:
            if reply.metadata.src_node_id == self.canary_node and not reply.has_error() \
                    and CANARY_RECORD in reply.content.array_records:
                canary = to_arrays(reply.content.array_records[CANARY_RECORD])
                del reply.content[CANARY_RECORD]
                metrics = reply.content.metric_records.get("metrics")
                pool = int(record_number(metrics, POOL_KEY, 0)) if metrics is not None else 0
                if ARRAYS_KEY not in reply.content.array_records:
                    continue  # a canary-only reply: nothing for the release
            real.append(reply)
        released = self.strategy.aggregate_train(server_round, real)
        if canary is None:
            logger.warning("round %d: the canary client (node %s) sent no canary; round not audited",
                           server_round, self.canary_node)
            return released
        self.audits.append(self._measure(server_round, real, before, canary, pool))
        return released

    def _measure(self, server_round: int, real: list[Message], before: Arrays, canary: Arrays,
                 pool: int) -> RoundAudit:
        assert isinstance(self.strategy, Replayable)
        c = self.config
        with_scores, without_scores = [], []
        for _ in range(c.trials):
            after = to_arrays(self.strategy.replay_train(server_round, real, [canary]))
            with_scores.append(canary_score(canary, before, after))
            after = to_arrays(self.strategy.replay_train(server_round, real, []))
            without_scores.append(canary_score(canary, before, after))
        pos, neg = np.asarray(with_scores), np.asarray(without_scores)
        estimate = empirical_epsilon(pos, neg, c.estimator_delta, c.confidence, zero_error=c.zero_error)
        theory = gaussian_epsilon(self.noise_multiplier, estimate.delta) \
            if self.noise_multiplier > 0 and estimate.delta > 0 else math.inf
        spread = float(neg.std())
        gap = float(pos.mean() - neg.mean())
        # Without noise the replays differ only by float rounding (summation order): a spread at the
        # rounding level of the scores is none, and the canary is seen perfectly.
        rounding = 1e-9 * max(float(np.abs(pos).max(initial=0.0)), float(np.abs(neg).max(initial=0.0)))
        snr = gap / spread if spread > rounding else (math.inf if gap > 0 else 0.0)
        norm = float(math.sqrt(sum(float(np.square(v.astype(np.float64)).sum()) for v in canary.values())))
        audit = RoundAudit(round=server_round, canary_node=int(self.canary_node or 0), estimate=estimate,
                           theoretical_epsilon=theory, signal_to_noise=snr, canary_norm=norm,
                           design_pool=pool, scores_with=pos, scores_without=neg)
        logger.info("CANIFE round %d: empirical epsilon %.3g [%.3g, %.3g] at delta %.3g; one-step "
                    "theory %.3g", server_round, estimate.epsilon, estimate.low, estimate.high,
                    estimate.delta, theory)
        return audit

    def composed(self, rounds_run: int) -> ComposedEstimate | None:
        """The empirical epsilon of the run's first `rounds_run` rounds at `delta` (None before any audit)."""
        segments = []
        for audit in self.audits:
            span = min(self.config.audit_every, rounds_run - audit.round + 1)
            if span > 0:
                segments.append((audit.estimate, span))
        if not segments:
            return None
        sigma = self.noise_multiplier if self.noise_multiplier > 0 else None
        return compose_estimates(segments, self.sample_rate, self.delta, sigma)

    def report(self, rounds_run: int) -> dict[str, Any]:
        """Per-round audits and their composition, as JSON-ready values."""
        composed = self.composed(rounds_run)
        return {"audit_every": self.config.audit_every, "trials": self.config.trials,
                "canary_node": self.canary_node, "rounds": [a.to_dict() for a in self.audits],
                "composed": None if composed is None else composed.to_dict()}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
