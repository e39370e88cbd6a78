"""Auditing a fitted DP synthesizer: CANIFE on its DP-SGD steps, membership inference, inserted canaries.

What `audit_synthesizer` measures on a fitted (or loaded) `Synthesizer` and the table it was trained on:

1. CANIFE (`canife.py`) on the final model with the run's own mechanism: Poisson rate q, clip norm C,
   noise multiplier sigma from the fit summary, the real `DPEngine` and the synthesizer's own loss (column
   permutations and augmentation multiplicity included). The canary is a table row crafted through soft
   value embeddings (`soft_row_loss`: each column's value token is a Gumbel-softmax mixture of that
   column's value embeddings, trained with CANIFE's double-backward objective), or with
   `canary="gradient"` a gradient-space canary (the ideal insertion, measuring the noise alone). The
   per-step estimate is composed over the run's S steps at rate q (one measurement point, the final model,
   standing for every step: CANIFE measures every k rounds; a frozen final model is the cheap version).
2. The loss-threshold membership attack (per-row log-likelihood) on training rows vs held-out rows, when a
   held-out table is given, and optionally LiRA with `shadows` shadow synthesizers (expensive: each is a
   full fit of the same configuration on a random half of the attack population).
Inserted canaries (the secret-sharer exposure of one column's value) need a training run with the canaries
in it: `random_rows` draws them, insert them in the table before `fit`, and `secret_exposure` measures them
on the fitted model (BENCHMARKS.md has a worked run); their MAP success is the empirical counterpart of
`reconstruction.reconstruction_bound` with M = the column's number of values.

The theoretical epsilon compared with is that of the ledger's DP-SGD events alone (what the canary audit
measures); schema-inference spending, if any, is reported by the ledger, not audited here.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, GaussianEvent
from tramontane.audit.bounds import PrivacyProfile
from tramontane.audit.canife import (
    CanaryDesign,
    StepAudit,
    clipped_example_gradients,
    clipped_gradient,
    craft_canary,
    orthogonal_direction,
    replay_dp_steps,
    step_audit,
    trainable,
)
from tramontane.audit.estimators import ComposedEstimate, compose_estimates
from tramontane.audit.membership import AttackSummary, attack_summary, lira_scores, roc_curve
from tramontane.errors import ConfigError, DataError
from tramontane.synth.codec import EncodedRows, TabularCodec
from tramontane.synth.schema import Schema
from tramontane.synth.synthesizer import Synthesizer, value_log_likelihood

logger = logging.getLogger(__name__)

CANARY_KINDS = ("input", "gradient")


class TableObjective:
    """The synthesizer's training loss over value-id rows, through the codec's public API: constrained
    value log-likelihood per column, K column-permuted copies of a row averaged inside one example."""

    def __init__(self, codec: TabularCodec, vids: np.ndarray, augmentations: int = 1,
                 permute_columns: bool = True, rng: np.random.Generator | None = None) -> None:
        self.codec, self.vids = codec, vids
        self.augmentations, self.permute_columns = augmentations, permute_columns
        self.rng = rng if rng is not None else np.random.default_rng()

    def encode(self, vids: np.ndarray) -> tuple[EncodedRows, torch.Tensor | None]:
        order = "random" if self.permute_columns else None
        enc = self.codec.encode_value_ids(vids, order, self.augmentations, self.rng)
        return enc, enc.example_ids if self.augmentations > 1 else None

    def rows(self, indices) -> tuple[EncodedRows, torch.Tensor | None]:
        return self.encode(self.vids[np.asarray(indices, dtype=np.int64)])

    def losses(self, model: nn.Module, batch: EncodedRows) -> torch.Tensor:
        ll = value_log_likelihood(model, self.codec, batch)
        return -ll / (self.codec.n_columns * self.augmentations)


def value_token_table(codec: TabularCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """([d, Vmax] token id of value v of column j (0 where v is out of range), [d, Vmax] valid mask)."""
    sizes = torch.as_tensor(codec.value_sizes)
    width = int(sizes.max())
    v = torch.arange(width)
    mask = v[None, :] < sizes[:, None]
    ids = torch.as_tensor(codec.value_offsets)[:, None] + v[None, :]
    return torch.where(mask, ids, torch.zeros_like(ids)), mask


def soft_row_loss(model: nn.Module, codec: TabularCodec) -> Callable[[torch.Tensor], torch.Tensor]:
    """weights [d, Vmax] (a distribution over each column's values) -> the training loss of that soft row
    in schema order: value positions get the weighted mix of the column's value embeddings, and the loss is
    the expected constrained NLL per column. One-hot weights give exactly `TableObjective`'s loss."""
    d = codec.n_columns
    offset = 1 if codec.bos else 0
    tokens = codec.encode_value_ids(np.zeros((1, d), dtype=np.int64)).tokens  # 1 T, schema order
    positions = torch.as_tensor(offset + 1 + 3 * np.arange(d))
    ids, mask = value_token_table(codec)

    def loss(weights: torch.Tensor) -> torch.Tensor:
        table = model.tok_embeddings.weight
        soft = torch.einsum("jv,jvc->jc", weights.to(table.dtype), table[ids])  # d dim
        emb = model.tok_embeddings(tokens).clone()  # 1 T dim
        emb[0, positions] = soft
        hidden = model.hidden_states(tokens, embeddings=emb)[:, offset::3]  # 1 d dim: at the prompts
        logits = model.output(hidden).float()[0].gather(1, ids)  # d Vmax
        logp = torch.log_softmax(logits.masked_fill(~mask, -math.inf), dim=-1).masked_fill(~mask, 0.0)
        return -(weights.float() * logp).sum() / d

    return loss


@dataclass(frozen=True)
class AuditConfig:
    """How much measuring to do (defaults: about as much as the training run costs on CPU for Adult)."""

    rounds: int = 100  # replayed DP-SGD steps, half with the canary
    canary: str = "input"  # "input": a crafted table row; "gradient": a gradient-space canary
    design_pool: int = 32  # examples the adversary uses to craft the canary
    craft_steps: int = 60
    craft_lr: float = 0.1
    direction_draws: int = 8  # column permutations averaged into the canary's score direction
    membership_rows: int = 2000  # members and as many held-out rows for the loss attack
    shadows: int = 0  # LiRA shadow synthesizers (0: loss attack only)
    confidence: float = 0.95
    micro_batch_size: int = 512
    seed: int | None = 0  # seeds batches, noise and crafting of the audit (a measurement, not a release)

    def __post_init__(self) -> None:
        if self.canary not in CANARY_KINDS:
            raise ConfigError(f"canary must be one of {CANARY_KINDS}, got {self.canary!r}")
        if self.rounds < 4:
            raise ConfigError(f"rounds must be >= 4, got {self.rounds}")
        if self.design_pool < 1 or self.craft_steps < 0 or self.direction_draws < 1:
            raise ConfigError("design_pool and direction_draws must be >= 1, craft_steps >= 0")
        if self.shadows == 1 or self.shadows < 0:
            raise ConfigError("shadows must be 0 (no LiRA) or at least 2")


@dataclass(frozen=True)
class SynthAudit:
    """Everything `audit_synthesizer` measured."""

    step: StepAudit
    composed: ComposedEstimate
    theoretical_epsilon: float  # DP-SGD events of the ledger at `delta`, RDP accountant (as CANIFE)
    delta: float
    steps: int
    canary_health: float | None
    canary_row: dict[str, Any] | None
    # mean <u_hat, clipped canary gradient> / C over the column orders drawn for u_hat (in-sample): the
    # score shift to expect from the input canary (1 for the gradient canary); permutations lower it
    canary_expected_signal: float
    membership: AttackSummary | None
    lira: AttackSummary | None

    @property
    def ratio(self) -> float:
        """theoretical / empirical (CANIFE point estimate) epsilon of the run (CANIFE's abstract: 2-7x)."""
        e = self.composed.epsilon
        return self.theoretical_epsilon / e if e > 0 else math.inf

    @property
    def ratio_low(self) -> float:
        """theoretical / the lower end of the empirical interval: the ratio free of the point estimate's
        upward bias (see `estimators.py`)."""
        e = self.composed.low
        return self.theoretical_epsilon / e if e > 0 else math.inf

    def summary(self) -> dict[str, Any]:
        """The figures a report card shows (see `card.privacy_card`)."""
        def num(x: float) -> float | str:
            return x if math.isfinite(x) else "inf"

        out = {"method": f"CANIFE ({self.step.canary} canary, {len(self.step.scores_with)}+"
                         f"{len(self.step.scores_without)} replayed steps)",
               "empirical_epsilon": num(self.composed.epsilon),
               "empirical_epsilon_low": num(self.composed.low),
               "empirical_epsilon_high": num(self.composed.high),
               "theoretical_epsilon": num(self.theoretical_epsilon),
               "theoretical_over_empirical": num(self.ratio),
               "theoretical_over_empirical_low": num(self.ratio_low),
               "per_step_empirical_epsilon": num(self.step.estimate.epsilon),
               "per_step_theoretical_epsilon": num(self.step.theoretical_epsilon)}
        if self.membership is not None:
            out["loss_attack_advantage"] = self.membership.advantage
            out["loss_attack_auc"] = self.membership.auc
        if self.lira is not None:
            out["lira_advantage"] = self.lira.advantage
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "canife": self.step.to_dict(), "composed": self.composed.to_dict(),
                "delta": self.delta, "steps": self.steps,
                "canary_health": self.canary_health, "canary_row": self.canary_row,
                "canary_expected_signal": self.canary_expected_signal,
                "membership": self.membership.to_dict() if self.membership else None,
                "lira": self.lira.to_dict() if self.lira else None}


def _schema_columns(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """The schema's columns of `df` when it has more (a full table audited against a subset schema)."""
    if set(schema.names) <= set(df.columns) and len(df.columns) > len(schema):
        return df[schema.names]
    return df


def _dp_sgd_events(synth: Synthesizer) -> list[DpSgdEvent]:
    events = [e for e in synth.ledger if isinstance(e, DpSgdEvent) and not e.spends_nothing]
    if not events:
        raise ConfigError("the synthesizer's ledger has no DP-SGD steps to audit: fit it first")
    return events


def _craft_row_canary(model: nn.Module, codec: TabularCodec, pool: torch.Tensor, max_grad_norm: float,
                      config: AuditConfig, generator: torch.Generator) -> CanaryDesign:
    ids, mask = value_token_table(codec)
    logits = torch.randn(ids.shape, generator=generator)
    return craft_canary(soft_row_loss(model, codec), trainable(model), logits, pool,
                        max_grad_norm=max_grad_norm, mask=mask, steps=config.craft_steps, lr=config.craft_lr,
                        generator=generator)


def audit_synthesizer(synth: Synthesizer, data: pd.DataFrame, holdout: pd.DataFrame | None = None,
                      config: AuditConfig | None = None,
                      on_round: Callable[[int, int], None] | None = None) -> SynthAudit:
    """Audit `synth`, fitted on `data` (the same table), optionally against held-out rows `holdout`.

    The DP-SGD setting (q, sigma, S, C) is read from the synthesizer's ledger and configuration; `data`
    must be the training table (its size sets the expected batch q N of the replayed steps).
    """
    config = config or AuditConfig()
    model, codec = synth.model, synth.codec
    if model is None or codec is None:
        raise ConfigError("the synthesizer is not fitted: call fit(df) or Synthesizer.load(dir) first")
    events = _dp_sgd_events(synth)
    q, sigma = events[-1].sample_rate, events[-1].noise_multiplier
    if any((e.sample_rate, e.noise_multiplier) != (q, sigma) for e in events):
        logger.warning("the ledger mixes DP-SGD settings; the audit replays the last one (q=%g, sigma=%g)",
                       q, sigma)
    steps = sum(e.steps for e in events)
    c = synth.config.max_grad_norm
    rows = synth.schema.conform(_schema_columns(data, synth.schema))
    if len(rows) < 2:
        raise DataError("the audit needs the training table (at least 2 rows that fit the schema)")
    if synth.summary is not None and abs(synth.summary.rows_dp - len(rows)) > 6 * synth.summary.row_count_noise:
        logger.warning("the synthesizer was trained on about %d rows (a DP count) but the audit data has a "
                       "different size: replayed batches use q N with this table's N", synth.summary.rows_dp)
    vids = synth.schema.value_ids(rows)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    objective = TableObjective(codec, vids, synth.config.augmentations, synth.config.permute_columns, rng)

    pool_idx = rng.choice(len(rows), size=min(config.design_pool, len(rows)), replace=False)
    pool = clipped_example_gradients(model, objective, pool_idx.tolist(), c)
    design, canary_rows, canary_gradient, canary_row = None, None, None, None
    if config.canary == "input":
        design = _craft_row_canary(model, codec, pool, c, config, generator)
        canary_vids = design.tokens.numpy()[None, :]
        canary_row = synth.schema.frame_from_value_ids(canary_vids).iloc[0].to_dict()

        def canary_rows() -> tuple[EncodedRows, torch.Tensor | None]:
            return objective.encode(canary_vids)

        draws = config.direction_draws if synth.config.permute_columns else 1
        grads = [clipped_gradient(model, objective, canary_rows()[0], c) for _ in range(draws)]
        direction = torch.stack(grads).mean(0)
        direction = direction / direction.norm()
        expected_signal = float(torch.stack(grads).matmul(direction).mean()) / c
    else:
        direction = orthogonal_direction(pool, generator)
        canary_gradient = c * direction
        expected_signal = 1.0
    seeds = rng.integers(2**62, size=2) if config.seed is not None else (None, None)
    with_scores, without_scores = replay_dp_steps(
        model, objective, len(rows), sample_rate=q, noise_multiplier=sigma, max_grad_norm=c,
        direction=direction, rounds=config.rounds, canary_rows=canary_rows, canary_gradient=canary_gradient,
        micro_batch_size=config.micro_batch_size,
        noise_seed=None if seeds[0] is None else int(seeds[0]),
        sampling_seed=None if seeds[1] is None else int(seeds[1]), on_round=on_round)
    step = step_audit(with_scores, without_scores, noise_multiplier=sigma, sample_rate=q, max_grad_norm=c,
                      delta=synth.delta, canary=config.canary, confidence=config.confidence)
    composed = compose_estimates([(step.estimate, steps)], q, synth.delta, sigma)
    membership = lira = None
    if holdout is not None:
        membership, lira = _membership(synth, rows, holdout, config, rng)
    return SynthAudit(step=step, composed=composed,
                      theoretical_epsilon=accounting.epsilon(events, synth.delta, "rdp"),
                      delta=synth.delta, steps=steps, canary_health=design.health if design else None,
                      canary_expected_signal=expected_signal,
                      canary_row={k: (v.item() if hasattr(v, "item") else v) for k, v in canary_row.items()}
                      if canary_row else None, membership=membership, lira=lira)


def _membership(synth: Synthesizer, rows: pd.DataFrame, holdout: pd.DataFrame, config: AuditConfig,
                rng: np.random.Generator) -> tuple[AttackSummary, AttackSummary | None]:
    held = synth.schema.conform(_schema_columns(holdout, synth.schema))
    n = min(config.membership_rows, len(rows), len(held))
    if n < 1:
        raise DataError("the held-out table has no row that fits the schema")
    members = rows.iloc[rng.choice(len(rows), n, replace=False)].reset_index(drop=True)
    nonmembers = held.iloc[rng.choice(len(held), n, replace=False)].reset_index(drop=True)
    target_m, target_n = synth.log_likelihood(members), synth.log_likelihood(nonmembers)
    loss = attack_summary(target_m, target_n, name="loss threshold", confidence=config.confidence)
    lira = None
    if config.shadows:
        population = pd.concat([members, nonmembers], ignore_index=True)
        scores, inside = shadow_scores(synth, population, config.shadows, rng)
        target = np.concatenate([target_m, target_n])
        lr = lira_scores(target, scores, inside)
        lira = attack_summary(lr[:n], lr[n:], name=f"LiRA ({config.shadows} shadows)",
                              confidence=config.confidence)
    return loss, lira


def shadow_scores(synth: Synthesizer, population: pd.DataFrame, shadows: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fit `shadows` synthesizers like `synth` (schema, budget, configuration) on random halves of
    `population`; return their per-row log-likelihoods [K, N] and which rows each trained on [K, N].
    Each half is balanced: every row is IN for about half the shadows (Carlini et al.'s sampling)."""
    n = len(population)
    inside = np.zeros((shadows, n), dtype=bool)
    for i in range(n):  # each row IN in exactly half of the shadows (rounded), at random
        inside[rng.permutation(shadows)[: shadows // 2], i] = True
    scores = np.zeros((shadows, n))
    for k in range(shadows):
        shadow = Synthesizer(synth.schema, synth.epsilon, synth.delta, synth.config,
                             seed=int(rng.integers(2**31)))
        shadow.fit(population[inside[k]].reset_index(drop=True))
        scores[k] = shadow.log_likelihood(population)
        logger.info("shadow %d/%d fitted", k + 1, shadows)
    return scores, inside


def random_rows(schema: Schema, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n rows with every value drawn uniformly from its column's values: canaries to insert."""
    vids = np.stack([rng.integers(c.n_values, size=n) for c in schema.columns], axis=1)
    return schema.frame_from_value_ids(vids)


@dataclass(frozen=True)
class SecretExposure:
    """Exposure of one column's value of each canary row (secret sharer; arXiv 1802.08232)."""

    column: str
    num_values: int
    ranks: np.ndarray  # 1 = the model ranks the true value first among the column's M values
    exposure: np.ndarray  # log2 M - log2 rank

    @property
    def success(self) -> float:
        """Share of rows whose value is recovered by the MAP guess (rank 1): a reconstruction attack."""
        return float((self.ranks == 1).mean())


def secret_exposure(synth: Synthesizer, rows: pd.DataFrame, column: str) -> SecretExposure:
    """For each row, rank its `column` value among all M values of that column by the model's likelihood of
    the whole row (the other values fixed): the informed adversary of the reconstruction bounds, with a
    uniform prior over the M values when the rows were drawn by `random_rows`."""
    schema = synth.schema
    j = schema.names.index(column) if column in schema.names else -1
    if j < 0:
        raise ConfigError(f"no column {column!r} in the schema; columns: {schema.names}")
    vids = schema.value_ids(schema.conform(rows))
    m = schema.columns[j].n_values
    variants = np.repeat(vids, m, axis=0)
    variants[:, j] = np.tile(np.arange(m), len(vids))
    ll = synth.log_likelihood(schema.frame_from_value_ids(variants)).reshape(len(vids), m)
    truth = ll[np.arange(len(vids)), vids[:, j]]
    ranks = 1 + (ll > truth[:, None]).sum(1)  # ties favour the truth: the MAP guess breaks ties arbitrarily
    return SecretExposure(column=column, num_values=m, ranks=ranks, exposure=np.log2(m) - np.log2(ranks))


def write_audit_files(directory: str | Path, card: dict[str, Any], audit: SynthAudit,
                      num_values: tuple[int, ...] = (2, 10, 100)) -> list[Path]:
    """Write audit.json (card + measurements), roc_canary.png (the canary test against the one-step
    Gaussian bound), roc_membership.png (membership attacks against the ledger's bound, when run) and
    bounds.png (bounds over the run's steps) into `directory`; returns the paths."""
    from tramontane.audit.card import bound_curves, plot_bound_curves, plot_roc

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step = audit.step
    curves = bound_curves(step.sample_rate, step.noise_multiplier, audit.steps, audit.delta, num_values)
    path = directory / "audit.json"
    path.write_text(json.dumps({"card": card, "audit": audit.to_dict(), "bound_curves": curves}, indent=1,
                               default=float))
    written = [path]
    grid = np.geomspace(1e-4, 1.0, 80)
    fpr, tpr, _ = roc_curve(step.scores_with, step.scores_without)
    theory = None
    if step.noise_multiplier:
        one_step = PrivacyProfile(GaussianEvent(step.noise_multiplier))
        theory = {"one Gaussian step (theory)": (grid, one_step.tpr_bound(grid))}
    written.append(plot_roc({f"CANIFE score ({step.canary} canary)": (fpr, tpr)},
                            directory / "roc_canary.png", theory,
                            title="canary present vs absent, one replayed DP-SGD step"))
    attacks = {a.name: (a.fpr, a.tpr) for a in (audit.membership, audit.lira) if a is not None}
    if attacks:
        events = [DpSgdEvent(step.sample_rate, step.noise_multiplier, audit.steps)]
        profile = PrivacyProfile(events, pld_discretization=1e-3)  # for a plot: coarse is enough
        written.append(plot_roc(attacks, directory / "roc_membership.png",
                                {"DP-SGD run (theory)": (grid, profile.tpr_bound(grid))},
                                title="training rows vs held-out rows"))
    written.append(plot_bound_curves(curves, directory / "bounds.png"))
    return written
