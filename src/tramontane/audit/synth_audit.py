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

The data is prepared exactly as `Synthesizer.fit` prepared it (`training_rows`): a given (public) schema is
checked first, since fit refuses a table that does not match it; a schema the fit inferred (with DP, or
without) is applied with `Schema.conform`, which drops, row by row, the rows holding values the DP schema
left out, as fit did. How many rows were left out is never reported (it is an exact count over private
rows): the audit works with the fit's DP row count wherever a number of rows is shown or written.

Cost and statistical power of the defaults (`AuditConfig`). Replaying one round costs about one training
step (a Poisson batch of q N rows with per-example gradients), so the replay dominates and its cost grows
with the batch: all of Adult (32,561 rows, `--fast`, epsilon 3) has batches of about 8,600 rows, about
30 s a round on 2 CPU cores shared with other jobs. So the default number of rounds is automatic
(`auto_rounds`): about `REPLAY_BUDGET_ROWS` example gradients in all, an even number in `AUTO_ROUNDS` (14
rounds for all of Adult, 100 for expected batches under 1,200 rows). Measured with the defaults (30
crafting steps, 2000 + 2000 rows for the loss attack) on all of Adult, 2 AMD EPYC cores at load ~4:
438 s wall, 300 s CPU (crafting 23 s, 14 rounds 398 s, loss attack 7 s); 100 rounds would take ~47 min.
What the rounds buy, simulated with an ideal canary (scores N(1, sigma^2) vs N(0, sigma^2), 400 audits
each; sigma = 2 accounted):
- 14 rounds: the per-step 95% interval is typically [0, 5.3] around a point estimate of 0.9 (one-step
  theory 0.63 at the estimator's delta 1/14). It can never show a leak beyond the theory; its lower end is
  above 0 in 1% of correct runs, but in 100% of runs whose noise was skipped (sigma 0), 93% at sigma 0.25
  (8x too small) and 23% at 0.5 (4x). A check for gross failures, not a measurement.
- 100 rounds: typically [0, 6.2] around 1.9 (theory 1.13 at delta 1/100); the lower end is above the
  theory in 100% of runs at sigma 0 or 0.25, 88% at 0.5, 1% at 1 and never when correct (above 0 in 17%).
- The spread of the R/2 scores without the canary estimates the noise sd (plus the other rows'
  interference) to within -55%/+56% at 7 scores, -20%/+20% at 50 (95% range of sample sd / sd).
- The loss attack on 2000 + 2000 rows: the AUC's standard error is about 0.01 near chance.
The crafted input canary is weaker than the ideal one (column permutations spread its gradient: an
expected signal of about 0.6-0.7 instead of 1, and a large batch adds its own spread along the canary's
direction), so its power is lower still. More rounds (`--rounds`, cost linear) narrow the interval slowly
(it is set by counts of rare events, see `estimators.py`).

Progress and interruption. `audit_synthesizer(progress=...)` reports (phase, done, total) for each phase
in `PHASES` (announced with done = 0 before any work, so a caller can show the whole plan). On Ctrl-C it
raises `AuditInterrupted` (a `KeyboardInterrupt`) whose `partial` holds what was measured so far (the
rounds replayed, their estimate when both kinds of rounds exist, the membership attack if done), marked
partial; `write_partial_audit` writes it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

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
    replayed_scores,
    step_audit,
    trainable,
)
from tramontane.audit.estimators import ComposedEstimate, compose_estimates
from tramontane.audit.membership import AttackSummary, attack_summary, lira_scores, roc_curve
from tramontane.errors import ConfigError, DataError, SchemaError
from tramontane.files import write_json_atomic
from tramontane.models import Transformer
from tramontane.synth.codec import EncodedRows, TabularCodec
from tramontane.synth.synthesizer import RowObjective, Synthesizer
from tramontane.tables.schema import Schema

logger = logging.getLogger(__name__)

CANARY_KINDS = ("input", "gradient")
# The audit's phases, in order, with what a progress display calls them; `progress(phase, done, total)`.
PHASES = {"canary": "crafting the canary", "replay": "replaying DP-SGD steps",
          "membership": "membership attack", "shadows": "LiRA shadow fits"}
Progress = Callable[[str, int, int], None]
LIKELIHOOD_CHUNK = 500  # rows scored per progress update of the membership attack
REPLAY_BUDGET_ROWS = 120_000  # default replay: about this many example gradients (q N per round) in all
AUTO_ROUNDS = (14, 100)  # the default number of rounds stays in this range (14: the fewest that flag sigma 0)


def auto_rounds(expected_batch: float) -> int:
    """The default number of replayed rounds for an expected batch of `expected_batch` rows: about
    `REPLAY_BUDGET_ROWS` example gradients in all, an even number in `AUTO_ROUNDS`."""
    lo, hi = AUTO_ROUNDS
    rounds = int(REPLAY_BUDGET_ROWS / max(float(expected_batch), 1.0))
    return max(lo, min(hi, rounds - rounds % 2))


def value_token_table(codec: TabularCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """([d, Vmax] token id of value v of column j (0 where v is out of range), [d, Vmax] valid mask)."""
    sizes = torch.as_tensor(codec.value_sizes)
    width = int(sizes.max())
    v = torch.arange(width)
    mask = v[None, :] < sizes[:, None]
    ids = torch.as_tensor(codec.value_offsets)[:, None] + v[None, :]
    return torch.where(mask, ids, torch.zeros_like(ids)), mask


def soft_row_loss(model: Transformer, codec: TabularCodec) -> Callable[[torch.Tensor], torch.Tensor]:
    """weights [d, Vmax] (a distribution over each column's values) -> the training loss of that soft row
    in schema order: value positions get the weighted mix of the column's value embeddings, and the loss is
    the expected constrained NLL per column. One-hot weights give exactly the synthesizer's training loss
    (`RowObjective` without column permutations or augmentations)."""
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
    """How much measuring to do. The defaults take a few minutes on 2 CPU cores, all of Adult included; what
    they buy (for a large table: a check for gross failures, not a tight estimate) is in the module
    docstring."""

    # replayed DP-SGD steps, half with the canary, each about one training step; None: `auto_rounds`
    rounds: int | None = None
    canary: str = "input"  # "input": a crafted table row; "gradient": a gradient-space canary
    design_pool: int = 32  # examples the adversary uses to craft the canary
    craft_steps: int = 30
    craft_lr: float = 0.1
    direction_draws: int = 8  # column permutations averaged into the canary's score direction
    membership_rows: int = 2000  # members and as many held-out rows for the loss attack
    shadows: int = 0  # LiRA shadow synthesizers (0: loss attack only)
    confidence: float = 0.95
    micro_batch_size: int = 2048  # rows per physical batch of the replay (larger is faster on CPU)
    seed: int | None = 0  # seeds batches, noise and crafting of the audit (a measurement, not a release)

    def __post_init__(self) -> None:
        if self.canary not in CANARY_KINDS:
            raise ConfigError(f"canary must be one of {CANARY_KINDS}, got {self.canary!r}")
        if self.rounds is not None and self.rounds < 4:
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


def _schema_of(synth: Synthesizer) -> Schema:
    if synth.schema is None:
        raise ConfigError("the synthesizer has no schema: call fit(df) or Synthesizer.load(dir) first")
    return synth.schema


def schema_was_given(synth: Synthesizer) -> bool:
    """Whether `fit` was handed its schema (and so refused rows outside it) rather than inferring it (and so
    dropping, row by row, the rows holding values the inferred schema left out)."""
    source = synth.summary.schema_source if synth.summary is not None else None
    if source == "public":
        return True
    inference = synth.schema.metadata.get("inference") if synth.schema is not None else None
    return source == "non-private" and not isinstance(inference, dict)  # a non-private schema file


def training_rows(synth: Synthesizer, data: pd.DataFrame) -> pd.DataFrame:
    """The rows `synth.fit(data)` trained on, prepared exactly as fit prepared them: a given schema is
    validated first (fit refuses a table outside it), then `Schema.conform` maps numbers and drops, row by
    row, rows holding values outside the schema (with an inferred DP schema: its dropped rare values).

    Raises `SchemaError` (naming columns and rules, never values) when a given schema does not fit `data`:
    it cannot be the table the synthesizer was trained on. How many rows were dropped is not reported.
    """
    schema = _schema_of(synth)
    df = _schema_columns(data, schema)
    if schema_was_given(synth):
        try:
            schema.validate(df)
        except SchemaError as err:
            raise SchemaError(f"the audit data is not the table this synthesizer was trained on: its fit was "
                              f"given this schema and accepted only rows that match it. {err}") from None
    return schema.conform(df)


def rows_note(synth: Synthesizer) -> str | None:
    """What to tell the data holder about rows the audit (like the fit) could not use, without an exact
    count: None when the fit was given its schema (every training row fits it)."""
    if schema_was_given(synth):
        return None
    about = ""
    if synth.summary is not None:
        about = f"; the fit trained on about {synth.summary.rows_dp} rows (a DP count)"
    return ("rows holding values outside the inferred schema are left out row by row, as the fit left them "
            f"out (how many is not shown: an exact count over private rows){about}")


def _dp_sgd_events(synth: Synthesizer) -> list[DpSgdEvent]:
    events = [e for e in synth.ledger if isinstance(e, DpSgdEvent) and not e.spends_nothing]
    if not events:
        raise ConfigError("the synthesizer's ledger has no DP-SGD steps to audit: fit it first")
    return events


def _craft_row_canary(model: Transformer, codec: TabularCodec, pool: torch.Tensor, max_grad_norm: float,
                      config: AuditConfig, generator: torch.Generator,
                      on_step: Callable[[int, int], None] | None = None) -> CanaryDesign:
    ids, mask = value_token_table(codec)
    logits = torch.randn(ids.shape, generator=generator)
    return craft_canary(soft_row_loss(model, codec), trainable(model), logits, pool,
                        max_grad_norm=max_grad_norm, mask=mask, steps=config.craft_steps, lr=config.craft_lr,
                        generator=generator, on_step=on_step)


class AuditInterrupted(KeyboardInterrupt):
    """Ctrl-C during `audit_synthesizer`. `partial` is the JSON-able record of what was measured so far
    (`"partial": True`; the replayed rounds and, when there are rounds with and without the canary, their
    estimate); `phase` is the phase (a key of `PHASES`) that was running."""

    def __init__(self, phase: str, partial: dict[str, Any]) -> None:
        super().__init__(f"audit interrupted during {PHASES.get(phase, phase)}")
        self.phase, self.partial = phase, partial


@dataclass
class _Record:
    """What the audit has measured so far (for `AuditInterrupted`)."""

    phase: str = "canary"
    rounds: int = 0
    canary: str = "input"
    canary_health: float | None = None
    canary_row: dict[str, Any] | None = None
    expected_signal: float | None = None
    scores_with: list[float] = field(default_factory=list)
    scores_without: list[float] = field(default_factory=list)
    membership: AttackSummary | None = None


def _plain_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def audit_synthesizer(synth: Synthesizer, data: pd.DataFrame, holdout: pd.DataFrame | None = None,
                      config: AuditConfig | None = None, progress: Progress | None = None) -> SynthAudit:
    """Audit `synth`, fitted on `data` (the same table), optionally against held-out rows `holdout`.

    The DP-SGD setting (q, sigma, S, C) is read from the synthesizer's ledger and configuration; `data`
    must be the training table, prepared here as the fit prepared it (`training_rows`); its size sets the
    expected batch q N of the replayed steps. `progress(phase, done, total)` is called for every phase of
    `PHASES` that will run (done = 0, before any work) and then as each advances. Ctrl-C raises
    `AuditInterrupted` carrying the partial results.
    """
    config = config or AuditConfig()
    model, codec = synth.model, synth.codec
    if model is None or codec is None:
        raise ConfigError("the synthesizer is not fitted: call fit(df) or Synthesizer.load(dir) first")
    schema = _schema_of(synth)
    events = _dp_sgd_events(synth)
    q, sigma = events[-1].sample_rate, events[-1].noise_multiplier
    if any((e.sample_rate, e.noise_multiplier) != (q, sigma) for e in events):
        logger.warning("the ledger mixes DP-SGD settings; the audit replays the last one (q=%g, sigma=%g)",
                       q, sigma)
    steps = sum(e.steps for e in events)
    c = synth.config.max_grad_norm
    theory = accounting.epsilon(events, synth.delta, "rdp")
    rows = training_rows(synth, data)
    if len(rows) < 2:
        raise DataError("the audit needs the training table (at least 2 rows that fit the schema)")
    summary = synth.summary
    if summary is not None and abs(summary.rows_dp - len(rows)) > 6 * summary.row_count_noise:
        logger.warning("the synthesizer was trained on about %d rows (a DP count) but the audit data has a "
                       "different size: replayed batches use q N with this table's N", summary.rows_dp)
    held = None
    if holdout is not None:
        held = schema.conform(_schema_columns(holdout, schema))
        if len(held) < 1:
            raise DataError("the held-out table has no row that fits the schema")
    n_members = _membership_size(synth, rows, held, config) if held is not None else 0
    if config.rounds is None:  # from the fit's DP batch size: the number written is no function of N itself
        batch = summary.batch_size if summary is not None else q * len(rows)
        config = replace(config, rounds=auto_rounds(batch))
    assert config.rounds is not None

    report = progress or (lambda phase, done, total: None)
    draws = config.direction_draws if synth.config.permute_columns else 1
    canary_work = config.design_pool + (config.craft_steps + draws if config.canary == "input" else 0)
    plan = {"canary": canary_work, "replay": config.rounds}
    if held is not None:
        plan["membership"] = 2 * n_members
        if config.shadows:
            plan["shadows"] = config.shadows * (synth.config.steps + 1)
    for phase, total in plan.items():
        report(phase, 0, total)

    record = _Record(canary=config.canary)
    try:
        return _audit(synth, rows, held, n_members, config, record, plan, report, q, sigma, steps, c, theory)
    except KeyboardInterrupt:
        partial = _partial(record, synth, config, q, sigma, steps, c, theory)
        raise AuditInterrupted(record.phase, partial) from None


def _audit(synth: Synthesizer, rows: pd.DataFrame, held: pd.DataFrame | None, n_members: int,
           config: AuditConfig, record: _Record, plan: dict[str, int], report: Progress, q: float,
           sigma: float, steps: int, c: float, theory: float) -> SynthAudit:
    model, codec, schema = synth.model, synth.codec, _schema_of(synth)
    assert model is not None and codec is not None and config.rounds is not None  # audit_synthesizer checked
    vids = schema.value_ids(rows)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    objective = RowObjective(codec, vids, synth.config, rng)  # the fit's own loss, drawing from the audit's rng

    done = 0

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        report("canary", done, plan["canary"])

    pool_idx = rng.choice(len(rows), size=min(config.design_pool, len(rows)), replace=False)
    pool_grads = []
    for i in pool_idx.tolist():
        pool_grads.append(clipped_example_gradients(model, objective, [i], c)[0])
        tick()
    pool = torch.stack(pool_grads)
    tick(config.design_pool - len(pool_idx))  # a table smaller than the pool
    design, canary_rows, canary_gradient, canary_row = None, None, None, None
    if config.canary == "input":
        before = done
        design = _craft_row_canary(model, codec, pool, c, config, generator,
                                   on_step=lambda k, n: tick(before + k - done))
        canary_vids = design.tokens.numpy()[None, :]
        canary_row = _plain_row(schema.frame_from_value_ids(canary_vids).iloc[0].to_dict())
        record.canary_health, record.canary_row = design.health, canary_row

        def canary_rows() -> tuple[EncodedRows, torch.Tensor | None]:
            return objective.encode(canary_vids)

        draws = config.direction_draws if synth.config.permute_columns else 1
        grads = []
        for _ in range(draws):
            grads.append(clipped_gradient(model, objective, canary_rows()[0], c))
            tick()
        direction = torch.stack(grads).mean(0)
        direction = direction / direction.norm()
        expected_signal = float(torch.stack(grads).matmul(direction).mean()) / c
    else:
        direction = orthogonal_direction(pool, generator)
        canary_gradient = c * direction
        expected_signal = 1.0
    record.expected_signal = expected_signal

    record.phase = "replay"
    seeds = rng.integers(2**62, size=2) if config.seed is not None else (None, None)
    rounds = replayed_scores(
        model, objective, len(rows), sample_rate=q, noise_multiplier=sigma, max_grad_norm=c,
        direction=direction, rounds=config.rounds, canary_rows=canary_rows, canary_gradient=canary_gradient,
        micro_batch_size=config.micro_batch_size,
        noise_seed=None if seeds[0] is None else int(seeds[0]),
        sampling_seed=None if seeds[1] is None else int(seeds[1]))
    with closing(rounds):
        for present, score in rounds:
            (record.scores_with if present else record.scores_without).append(score)
            record.rounds += 1
            report("replay", record.rounds, config.rounds)
    step = step_audit(np.asarray(record.scores_with), np.asarray(record.scores_without),
                      noise_multiplier=sigma, sample_rate=q, max_grad_norm=c, delta=synth.delta,
                      canary=config.canary, confidence=config.confidence)
    composed = compose_estimates([(step.estimate, steps)], q, synth.delta, sigma)
    membership = lira = None
    if held is not None:
        record.phase = "membership"
        membership, lira = _membership(synth, rows, held, n_members, config, rng, record, report)
    return SynthAudit(step=step, composed=composed, theoretical_epsilon=theory, delta=synth.delta,
                      steps=steps, canary_health=design.health if design else None,
                      canary_expected_signal=expected_signal, canary_row=canary_row,
                      membership=membership, lira=lira)


def _partial(record: _Record, synth: Synthesizer, config: AuditConfig, q: float, sigma: float, steps: int,
             c: float, theory: float) -> dict[str, Any]:
    """The JSON-able record of an interrupted audit: `SynthAudit.to_dict()` of the rounds replayed so far
    when there are rounds with and without the canary, else what there is; marked partial."""
    out: dict[str, Any] = {"partial": True, "interrupted_during": record.phase,
                           "rounds_replayed": record.rounds, "rounds_planned": config.rounds}
    if record.scores_with and record.scores_without:
        step = step_audit(np.asarray(record.scores_with), np.asarray(record.scores_without),
                          noise_multiplier=sigma, sample_rate=q, max_grad_norm=c, delta=synth.delta,
                          canary=config.canary, confidence=config.confidence)
        composed = compose_estimates([(step.estimate, steps)], q, synth.delta, sigma)
        audit = SynthAudit(step=step, composed=composed, theoretical_epsilon=theory, delta=synth.delta,
                           steps=steps, canary_health=record.canary_health, canary_row=record.canary_row,
                           canary_expected_signal=record.expected_signal or 0.0,
                           membership=record.membership, lira=None)
        result = {**out, **audit.to_dict()}
        result["summary"]["method"] += f" (partial: {record.rounds} of {config.rounds} rounds)"
        return result
    return {**out, "summary": None, "delta": synth.delta, "steps": steps, "theoretical_epsilon": theory,
            "canary": config.canary, "canary_health": record.canary_health, "canary_row": record.canary_row,
            "canary_expected_signal": record.expected_signal,
            "scores_with": record.scores_with, "scores_without": record.scores_without,
            "membership": record.membership.to_dict() if record.membership else None, "lira": None}


def _membership_size(synth: Synthesizer, rows: pd.DataFrame, held: pd.DataFrame, config: AuditConfig) -> int:
    """Members (and as many non-members) of the loss attack. Capped by half the fit's DP row count rather
    than by the number of usable rows, so that the written count never reveals that exact number (half the
    DP count is below it unless the table is tiny against the count's noise)."""
    cap = synth.summary.rows_dp // 2 if synth.summary is not None else len(rows)
    return max(1, min(config.membership_rows, len(held), cap, len(rows)))


def _log_likelihoods(synth: Synthesizer, rows: pd.DataFrame, on_rows: Callable[[int], None]) -> np.ndarray:
    out = []
    for start in range(0, len(rows), LIKELIHOOD_CHUNK):
        chunk = rows.iloc[start:start + LIKELIHOOD_CHUNK]
        out.append(synth.log_likelihood(chunk))
        on_rows(len(chunk))
    return np.concatenate(out) if out else np.zeros(0)


def _membership(synth: Synthesizer, rows: pd.DataFrame, held: pd.DataFrame, n: int, config: AuditConfig,
                rng: np.random.Generator, record: _Record,
                report: Progress) -> tuple[AttackSummary, AttackSummary | None]:
    members = rows.iloc[rng.choice(len(rows), n, replace=False)].reset_index(drop=True)
    nonmembers = held.iloc[rng.choice(len(held), n, replace=False)].reset_index(drop=True)
    scored = 0

    def on_rows(k: int) -> None:
        nonlocal scored
        scored += k
        report("membership", scored, 2 * n)

    target_m = _log_likelihoods(synth, members, on_rows)
    target_n = _log_likelihoods(synth, nonmembers, on_rows)
    loss = attack_summary(target_m, target_n, name="loss threshold", confidence=config.confidence)
    record.membership = loss
    lira = None
    if config.shadows:
        record.phase = "shadows"
        population = pd.concat([members, nonmembers], ignore_index=True)
        total = config.shadows * (synth.config.steps + 1)
        scores, inside = shadow_scores(synth, population, config.shadows, rng,
                                       on_step=lambda done, _: report("shadows", done, total))
        target = np.concatenate([target_m, target_n])
        lr = lira_scores(target, scores, inside)
        lira = attack_summary(lr[:n], lr[n:], name=f"LiRA ({config.shadows} shadows)",
                              confidence=config.confidence)
    return loss, lira


def shadow_scores(synth: Synthesizer, population: pd.DataFrame, shadows: int, rng: np.random.Generator,
                  on_step: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit `shadows` synthesizers like `synth` (schema, budget, configuration) on random halves of
    `population`; return their per-row log-likelihoods [K, N] and which rows each trained on [K, N].
    Each half is balanced: every row is IN for about half the shadows (Carlini et al.'s sampling).
    `on_step(done, total)`: progress over all shadows, S training steps and one scoring step each."""
    n = len(population)
    inside = np.zeros((shadows, n), dtype=bool)
    for i in range(n):  # each row IN in exactly half of the shadows (rounded), at random
        inside[rng.permutation(shadows)[: shadows // 2], i] = True
    scores = np.zeros((shadows, n))
    per_shadow = synth.config.steps + 1
    total = shadows * per_shadow
    for k in range(shadows):
        shadow = Synthesizer(synth.schema, synth.epsilon, synth.delta, synth.config,
                             seed=int(rng.integers(2**31)))

        def on_fit_step(step: int, _steps: int, _info: dict[str, float], k: int = k) -> None:
            if on_step is not None:
                on_step(k * per_shadow + step, total)

        shadow.fit(population[inside[k]].reset_index(drop=True), on_step=on_fit_step)
        scores[k] = shadow.log_likelihood(population)
        if on_step is not None:
            on_step((k + 1) * per_shadow, total)
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
    schema = _schema_of(synth)
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
    _write_json(path, {"partial": False, "card": card, "audit": audit.to_dict(), "bound_curves": curves})
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


def write_partial_audit(directory: str | Path, card: dict[str, Any] | None, partial: dict[str, Any]) -> Path:
    """Write the partial record of an interrupted audit (`AuditInterrupted.partial`) to audit.json in
    `directory`, marked `"partial": true` (no plots); returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "audit.json"
    _write_json(path, {"partial": True, "card": card, "audit": partial})
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a Ctrl-C mid-write leaves the old file or the new one); numpy numbers as floats."""
    write_json_atomic(path, json.loads(json.dumps(data, default=float)))
