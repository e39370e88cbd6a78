"""`Synthesizer`: DP synthetic tables from a Mistral-architecture language model (the synlm method).

Sablayrolles, Wang and Karrer, "Privately generating tabular data using language models" (arXiv 2306.04803):
rows become token sequences (`codec.py`), a small causal LM (here our Mistral decoder: GQA, RMSNorm,
SwiGLU, RoPE) is trained from scratch with DP-SGD (`tramontane.dp`, `tramontane.training`), and synthetic
rows are sampled column by column under the schema's constraints, so every sampled row is valid.

Privacy unit: one row of the table. Neighbouring tables differ by adding or removing one row, so the number
of rows N is private too. What `fit` reads from the rows, in order, each on the ledger:
- the schema, only when none is given: `dp_schema.infer_schema` spends 1% of the budget's rho per column (at
  most `schema_budget_share`) with Gaussian mechanisms (one Gaussian event, plus the thresholds' delta); a
  given schema is a public input;
- the row count: N + N(0, row_count_noise^2) (a Gaussian event). This DP count, never N, sets the sampling
  rate q = batch / count, the expected batch and the default number of synthetic rows;
- DP-SGD: Poisson sampling at q, clipping to `max_grad_norm`, Gaussian noise calibrated *exactly* with the
  accountant so that the whole ledger (schema, count, steps) is (epsilon, delta)-DP; the batch size follows
  the TAN rule (Sander et al., arXiv 2210.03403): large batches with sigma in the 2..4 sweet spot.
- measured marginals (`marginals.py`, `marginal_share` of the budget's zCDP rho, planned before training so
  DP-SGD's noise is calibrated for them too): every column's 1-way marginal, then `marginal_rounds` 2- and
  3-way marginals chosen one at a time by the exponential mechanism where the calibrated model is furthest
  from the rows (AIM's rounds, McKenna et al. 2022, with the language model as the base distribution),
  grouped from the trained model's own samples, counted on the rows with Gaussian noise (one Gaussian and
  one exponential-mechanism event).
Sampling and saving are post-processing: `sample` draws rows from the model and resamples them with the
tilt that best fits the noisy marginals; numbers are drawn uniformly inside their bins. Rows are never
logged. What each written field is (DP, public, or for the data holder only) is listed in
`tramontane.synth.release`.
Under torchrun (`tramontane.dp.distributed`) every process trains on its shard of each DP-SGD batch; rank 0
alone plans (schema, row count: the spends before training) and measures the marginals, and every process
gets its results, so all hold the same model and ledger.
The ledger travels with the saved synthesizer. A budget that cannot be met is refused before any private
read when it can be known then; a refusal after a spend keeps that spend on `Synthesizer.ledger`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, GaussianEvent, PrivacyEvent, PrivacyLedger, PrivacyStatement
from tramontane.dp import distributed
from tramontane.dp.noise import SecureRandom
from tramontane.errors import ConfigError, DataError, PrivacyError, PrivacyParameterError, SchemaError
from tramontane.files import SHAREABLE_MODE, write_dir_atomic, write_json_atomic
from tramontane.models import ModelArgs, Transformer
from tramontane.models.checkpoint import load_model, save_model
from tramontane.models.transformer import TransformerBlock
from tramontane.seeding import derived_seed, numpy_rng
from tramontane.synth import marginals
from tramontane.synth.codec import EncodedRows, TabularCodec
from tramontane.synth.dp_schema import SchemaInference, infer_schema
from tramontane.synth.marginals import MarginalSet
from tramontane.synth.sampling import sample_tokens
from tramontane.tables.schema import Schema
from tramontane.training import TrainConfig, Trainer

logger = logging.getLogger(__name__)

STATE_FILE = "synthesizer.json"
MARGINALS_FILE = "marginals.json"
STATE_FORMAT = "tramontane.synthesizer"
STATE_VERSION = 2  # 2: DP row count, no exact row counts
MIN_BATCH = 8  # expected rows per DP-SGD step below which a run cannot learn: refused rather than wasted
# Value tokens per DP-SGD example that `SynthConfig.augmentations=None` fills with column orders of the row:
# the fit's per-example compute is then about the same whatever the column count (Adult and CPS measured
# best at this K among 1, 2 and 4 orders; BENCHMARKS.md)
TOKENS_PER_EXAMPLE = 30


@dataclass
class SynthConfig:
    """Model and training hyper-parameters. The defaults are the configuration `benchmarks/synth.py`
    measures and `make demo` runs; `SynthConfig.fast()` (`tramontane synth --fast`) is a quicker, weaker one."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 192
    steps: int = 600  # DP-SGD steps: the model is step-limited (held-out NLL falls from 100 to 600 steps)
    noise_multiplier_target: float = 2.1  # TAN: the batch size is chosen so that sigma lands here
    # At most this share of the rows per step (and never fewer than MIN_BATCH): bounds the fit's compute
    # (steps x batch x augmentations) at large epsilon, where the TAN batch for the target sigma grows past
    # half of the table. At epsilon 1 the TAN batch is about 1.6% of the rows, under the cap.
    max_batch_fraction: float = 0.017
    lr: float = 1e-2
    warmup_steps: int = 6
    max_grad_norm: float = 1.0
    micro_batch_size: int = 1024
    # K column-permuted copies of a row inside its one clipped gradient: free in privacy (one row, one
    # clipped gradient), K times the compute of a step. None: as many orders as fit in TOKENS_PER_EXAMPLE
    # value tokens (`orders_per_row`: 2 for Adult's 15 columns, 4 for CPS's 7)
    augmentations: int | None = None
    permute_columns: bool = True
    accountant: accounting.Accountant = "pld"  # calibrates sigma; the tighter accountant, a smaller sigma
    schema_budget_share: float = 0.3  # at most this share of rho and delta for a DP schema (1% a column)
    row_count_noise: float = 20.0  # std of the Gaussian noise on the released row count (sensitivity 1)
    temperature: float = 1.0
    # Measured marginals that calibrate the model's samples (`marginals.py`): this share of the budget's
    # rho (`accounting.budget_rho`) buys every column's 1-way marginal and `marginal_rounds` more 2- or 3-way ones, each chosen by
    # the exponential mechanism (`selection_share` of its round) where the calibrated model is furthest off;
    # every 1-way measurement costs `one_way_weight` times a chosen one (its noise std 1 / sqrt of that);
    # at most `marginal_groups` value groups per column in 1-way marginals, `pair_groups` in pairs,
    # `triple_groups` in triples; the tilt fitted on `pool_factor` x n model samples. 0 turns it off.
    marginal_share: float = 0.2
    marginal_rounds: int = 30
    selection_share: float = 0.1
    one_way_weight: float = 1.0
    marginal_groups: int = 64
    pair_groups: int = 16
    triple_groups: int = 6
    pool_factor: float = 4.0

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "steps", "micro_batch_size",
                     "augmentations"):
            value = getattr(self, name)
            if name == "augmentations" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError("dim must be a multiple of n_heads, and n_heads a multiple of n_kv_heads")
        for name in ("lr", "max_grad_norm", "noise_multiplier_target", "row_count_noise", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not 0 < self.schema_budget_share < 1:
            raise ConfigError(f"schema_budget_share must be in (0, 1), got {self.schema_budget_share}")
        if not 0 <= self.marginal_share < 1:
            raise ConfigError(f"marginal_share must be in [0, 1), got {self.marginal_share!r}")
        for name in ("marginal_groups", "pair_groups", "triple_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"{name} must be a whole number >= 2, got {value!r}")
        if isinstance(self.marginal_rounds, bool) or not isinstance(self.marginal_rounds, int) \
                or self.marginal_rounds < 0:
            raise ConfigError(f"marginal_rounds must be a whole number >= 0, got {self.marginal_rounds!r}")
        if isinstance(self.one_way_weight, bool) or not (isinstance(self.one_way_weight, (int, float))
                                                         and 0 < self.one_way_weight <= 1000):
            raise ConfigError(f"one_way_weight must be a number in (0, 1000], got {self.one_way_weight!r}")
        if not 0 < self.selection_share < 1:
            raise ConfigError(f"selection_share must be in (0, 1), got {self.selection_share!r}")
        if isinstance(self.pool_factor, bool) or not (isinstance(self.pool_factor, (int, float))
                                                      and 1.0 <= self.pool_factor <= 100):
            raise ConfigError(f"pool_factor must be a number in [1, 100], got {self.pool_factor!r}")
        if not 0 < self.max_batch_fraction <= 1:
            raise ConfigError("max_batch_fraction must be in (0, 1]")
        if self.accountant not in accounting.ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {list(accounting.ACCOUNTANTS)}, got {self.accountant!r}")

    def orders_per_row(self, n_columns: int) -> int:
        """K, the column orders of a row in one example: `augmentations`, or when None as many as fit in
        TOKENS_PER_EXAMPLE value tokens, at least 1 and at most the n_columns! orders there are."""
        if self.augmentations is not None:
            return self.augmentations
        return max(1, min(TOKENS_PER_EXAMPLE // n_columns, math.factorial(min(n_columns, 5))))

    @classmethod
    def fast(cls) -> SynthConfig:
        """A shorter run with smaller batches and one column order per row (a minute or two on 2 CPU cores
        for Adult), lower utility."""
        return cls(steps=40, noise_multiplier_target=2.0, warmup_steps=3, augmentations=1)


SCHEMA_SOURCES = ("public", "dp", "non-private")


@dataclass
class FitSummary:
    """What fitting released about the run. Every field is DP or public (`tramontane.synth.release`):
    `rows_dp` is the DP row count; batch size and sample rate are computed from it."""

    rows_dp: int  # the DP count of the training rows (ledger event "row count"), at least 1
    row_count_noise: float
    steps: int
    batch_size: int  # expected rows per step, q * rows_dp
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    epsilon_rdp: float  # the whole ledger under the RDP accountant
    epsilon_pld: float  # the whole ledger under the PLD accountant
    delta: float
    schema_source: str  # "public" (given), "dp" (inferred with DP) or "non-private" (read off the rows)
    schema_epsilon: float
    schema_delta: float
    schema_notes: list[str] = field(default_factory=list)
    marginal_sigma: float = 0.0  # noise std of every measured 2- or 3-way marginal cell (0: none measured)
    marginal_one_way_sigma: float = 0.0  # of every 1-way cell (0: marginal_sigma)
    marginal_queries: int = 0  # how many marginals were measured (ledger event "marginals")
    marginal_rounds: int = 0  # how many of them were chosen by the exponential mechanism


@dataclass
class FitDiagnostics:
    """What fitting measured on real rows, for the data holder only (never saved with the model, never in
    the shareable release): not covered by the DP guarantee."""

    rows_given: int  # rows of the input table
    rows_used: int  # rows that fit the schema and were trained on
    heldout_curve: list[dict[str, float]] = field(default_factory=list)  # NLL of held-out real rows
    seconds: float = 0.0  # wall time grows with the number of rows


def value_log_likelihood(model: Transformer, codec: TabularCodec, batch: EncodedRows,
                         temperature: float = 1.0) -> torch.Tensor:
    """Per-sequence log-likelihood [M] of the value tokens under the constrained softmax (of the logits divided
    by `temperature`, as `sample_tokens` draws at it).

    Equal to `codec.sequence_log_likelihood(model(tokens), batch)` (end tokens are forced, so they cost 0,
    and prompts are never predicted), but the output head runs only at the d prompt positions instead of
    all 3d, which is a third of the head's cost in training.
    """
    offset = 1 if codec.bos else 0
    hidden = model.hidden_states(batch.tokens)[:, offset::3]  # M d dim: at each prompt token
    logits = model.output(hidden).float()  # M d V
    if temperature != 1.0:
        logits = logits / temperature
    columns = batch.orders.to(logits.device)  # M d: the column whose value comes next
    allowed = codec.mask_table(logits.device)[1 + columns]  # M d V
    if logits.shape[-1] > allowed.shape[-1]:  # a model vocabulary padded beyond the codec's
        allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[-1]), value=False)
    logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    targets = batch.tokens[:, offset + 1::3].to(logits.device)  # M d: the value tokens
    return logp.gather(-1, targets[..., None]).squeeze(-1).sum(-1)


class RowObjective:
    """The synthesizer's training objective: the constrained next-token loss of table rows, one example per
    row (the privacy unit), as `Synthesizer.fit` trains with DP-SGD and the audit replays it.

    A row's loss is minus its value log-likelihood under the constrained softmax (`value_log_likelihood`:
    only the column's allowed values compete) divided by the number of columns. With `permute_columns` a
    fresh random column order is drawn for every row at every step (synlm, arXiv 2306.04803); with
    `augmentations` = K > 1 each row is encoded in K orders whose losses average inside the one clipped
    gradient of that row (augmentation multiplicity, De et al. 2022, arXiv 2204.13650), so a row still
    contributes one gradient of norm at most C. `rng` draws the orders: the same rng and calls give the same
    batches.

    Args:
        codec: the schema's token codec.
        vids: the training rows as value ids [N, d] (`Schema.value_ids`); `rows(indices)` selects from them.
        config: the fit's `SynthConfig` (reads `permute_columns` and `augmentations`).
        rng: draws the column orders.
    """

    def __init__(self, codec: TabularCodec, vids: np.ndarray, config: SynthConfig, rng: np.random.Generator):
        self.codec, self.vids, self.config, self.rng = codec, vids, config, rng
        self.orders = config.orders_per_row(codec.n_columns)

    def encode(self, vids: np.ndarray) -> tuple[EncodedRows, torch.Tensor | None]:
        """(encoded rows, example id of each sequence or None without augmentations) of value-id rows [M, d]
        that need not be training rows (the audit's canary)."""
        order = "random" if self.config.permute_columns else None
        enc = self.codec.encode_value_ids(vids, order, self.orders, self.rng)
        ids = enc.example_ids if self.orders > 1 else None
        return enc, ids

    def rows(self, indices: Sequence[int]) -> tuple[EncodedRows, torch.Tensor | None]:
        """The training rows at `indices`, encoded as `encode` does."""
        return self.encode(self.vids[np.asarray(indices, dtype=np.int64)])

    def losses(self, model: nn.Module, batch: EncodedRows) -> torch.Tensor:
        assert isinstance(model, Transformer)
        ll = value_log_likelihood(model, self.codec, batch)
        # per-value mean, and the K copies of a row average rather than add up (AugMult)
        return -ll / (self.codec.n_columns * self.orders)


PLAN_FILE = "plan.json"
PLAN_FORMAT = "tramontane.synthesizer_plan"


@dataclass
class _FitPlan:
    """What a fit decided before training, written to its run folder so that a resumed fit spends nothing
    again. For the data holder only: `fingerprint` is a hash of the conformed private table."""

    settings: dict[str, Any]
    schema: dict[str, Any]
    schema_source: str
    schema_epsilon: float
    schema_delta: float
    schema_notes: list[str]
    rows_dp: int
    batch_size: int
    sample_rate: float
    noise_multiplier: float
    ledger: dict[str, Any]  # the ledger when training starts
    fingerprint: str
    marginal_sigma: float = 0.0  # planned noise of the marginals measured after training (0: none)
    marginal_queries: int = 0
    marginal_rounds: int = 0  # of which chosen by the exponential mechanism, at this epsilon each
    selection_epsilon: float = 0.0
    marginal_one_way_sigma: float = 0.0  # of the 1-way ones (0: marginal_sigma)

    @classmethod
    def read(cls, run_dir: Path) -> _FitPlan | None:
        path = run_dir / PLAN_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.pop("format", None) != PLAN_FORMAT:
                raise ValueError("not a plan")
            return cls(**data)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise ConfigError(f"{path} is damaged: it cannot be resumed; start a new folder") from None

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(run_dir, 0o700)  # the data holder's: a fingerprint of the table, checkpoints
        write_json_atomic(run_dir / PLAN_FILE, {"format": PLAN_FORMAT, **asdict(self)})


def _fingerprint(schema: Schema, rows: pd.DataFrame) -> str:
    """SHA-256 of the table as training sees it (value ids in schema order), to refuse a resume on another
    table. A hash of private data: kept in the data holder's run folder only."""
    ids = np.ascontiguousarray(schema.value_ids(rows), dtype=np.int64)
    return hashlib.sha256(repr(ids.shape).encode() + ids.tobytes()).hexdigest()


class Synthesizer:
    """Fit a DP language model on a table and sample synthetic rows from it.

    Args:
        schema: the public schema (a `Schema`, or a JSON/YAML path). None: inferred from the data with DP,
            spending `config.schema_budget_share` of the budget.
        epsilon, delta: the total privacy budget of `fit` (schema inference and row count included).
        config: model and training hyper-parameters (`SynthConfig`).
        allow_non_private_schema: infer a missing schema WITHOUT DP (warns; the report says so).
        seed: makes model initialisation, column permutations and default sampling reproducible. The DP noise
            and Poisson sampling stay cryptographically seeded unless `noise_seed` is given (warns).

    `ledger` holds every spend on the data, including those of a `fit` that failed after spending: a retry
    on the same object is charged against what is left of the budget.
    """

    def __init__(self, schema: Schema | str | Path | None = None, epsilon: float = 3.0, delta: float = 1e-5,
                 config: SynthConfig | None = None, *, allow_non_private_schema: bool = False,
                 seed: int | None = None, noise_seed: int | None = None) -> None:
        if isinstance(epsilon, bool) or not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon)
                                             and epsilon > 0):
            raise PrivacyParameterError(f"epsilon must be a positive finite number, got {epsilon!r}")
        if isinstance(delta, bool) or not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise PrivacyParameterError(f"delta must be in (0, 1), got {delta!r}")
        for name, value in (("seed", seed), ("noise_seed", noise_seed)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be a whole number >= 0, got {value!r}")
        self.schema = Schema.load(schema) if isinstance(schema, (str, Path)) else schema
        self.epsilon, self.delta = float(epsilon), float(delta)
        self.config = config or SynthConfig()
        self.allow_non_private_schema = allow_non_private_schema
        self.seed, self.noise_seed = seed, noise_seed
        self.ledger = PrivacyLedger()
        self.model: Transformer | None = None
        self.codec: TabularCodec | None = None
        self.schema_inference: SchemaInference | None = None
        self.marginals: MarginalSet | None = None
        self.summary: FitSummary | None = None
        self.diagnostics: FitDiagnostics | None = None
        self._statement: PrivacyStatement | None = None  # `statement`: computed once per fit or load

    # -- fitting --------------------------------------------------------------------------------------
    def _model_args(self, codec: TabularCodec) -> ModelArgs:
        c = self.config
        return ModelArgs(dim=c.dim, n_layers=c.n_layers, head_dim=c.dim // c.n_heads, hidden_dim=c.hidden_dim,
                         n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, norm_eps=1e-5, vocab_size=codec.vocab_size,
                         rope_theta=10_000.0)

    def _spent_note(self) -> str:
        spent = accounting.epsilon(self.ledger, self.delta, "rdp") if len(self.ledger) else 0.0
        return (f"This attempt spent epsilon {spent:.4g} at delta {self.delta:g} on the data; it counts, and it "
                "stays on this synthesizer's ledger." if len(self.ledger) else "Nothing was spent.")

    def _plan_batch(self, rows_dp: int, epsilon: float, delta: float,
                    later: tuple[PrivacyEvent, ...] = ()) -> tuple[int, float, float]:
        """TAN rule (`accounting.tan_batch_size`) on the DP row count: the expected batch whose calibrated
        sigma is near the target at `epsilon` (this run's share), capped at `max_batch_fraction` of the rows
        and rounded down; then sigma exactly, for the whole ledger (what is already on it, this run, and the
        `later` releases planned after it). (batch, q, sigma)."""
        c = self.config
        batch = accounting.tan_batch_size(rows_dp, epsilon, delta, c.steps, c.noise_multiplier_target)
        if batch < MIN_BATCH:
            raise PrivacyParameterError(
                f"epsilon={self.epsilon:.3g} cannot be met usefully with about {rows_dp} rows (a DP count) in "
                f"{c.steps} DP-SGD steps: the noise it needs allows batches of only {batch:.2g} rows (at least "
                f"{MIN_BATCH} are needed to learn anything). Raise --epsilon, give more rows, or lower --steps. "
                + self._spent_note())
        batch = int(min(batch, max(MIN_BATCH, c.max_batch_fraction * rows_dp)))
        q = min(1.0, batch / rows_dp)
        try:
            cal = accounting.calibrate_noise_multiplier(self.epsilon, self.delta, q, c.steps,
                                                        accountant=c.accountant,
                                                        prior=[*self.ledger.events, *later])
        except PrivacyParameterError as err:
            raise PrivacyParameterError(f"{err} {self._spent_note()}") from None
        return batch, q, cal.noise_multiplier

    def _infer_schema(self, df: pd.DataFrame) -> Schema:
        """The schema of `df` inferred with Gaussian mechanisms (`dp_schema.infer_schema(rho=...)`) from a share
        of the whole ledger: `dp_schema.schema_share` of the columns, at most `schema_budget_share`, of the
        rho and delta of the budget (`dp_schema.schema_budget`). DP-SGD is then calibrated with the ledger as
        its prior, so the inference's events are composed exactly. Without DP when allowed."""
        from tramontane.synth.dp_schema import schema_budget, schema_share

        if self.allow_non_private_schema:
            inference = infer_schema(df, allow_non_private=True)
        else:
            share = schema_share(df.shape[1], self.config.schema_budget_share)
            budget = schema_budget(self.epsilon, self.delta, share, prior=self.ledger)
            try:
                inference = infer_schema(df, rho=budget.rho, delta=budget.delta,
                                         seed=derived_seed(self.noise_seed, "schema inference"))
            except SchemaError as err:
                events = getattr(err, "events", ())
                for event in events:  # what the failed inference spent stays on the ledger the caller holds
                    self.ledger.append(event)
                if events:  # the message already says what was spent and that it counts
                    spent = accounting.epsilon(self.ledger, self.delta, self.config.accountant)
                    raise SchemaError(f"{err} This fit has spent epsilon {spent:.4g} (at delta {self.delta:g}) "
                                      "so far; it is recorded on this synthesizer's ledger.") from None
                raise
            inference = replace(inference, epsilon_share=budget.epsilon_share)
        self.schema_inference = inference
        for event in inference.ledger_events():
            self.ledger.append(event)
        return inference.schema

    def _count_rows(self, n: int) -> int:
        sigma = self.config.row_count_noise
        seed = derived_seed(self.noise_seed, "row count")
        self.ledger.append(GaussianEvent(sigma, 1, label="row count"))
        return dp_row_count(n, sigma, seed)

    def _prepare(self, df: pd.DataFrame) -> tuple[Schema, pd.DataFrame, _FitPlan]:
        """Schema (given, or inferred with DP), conformed rows, DP row count and the DP-SGD setting: every
        spend before training, on the ledger; the plan a resumed run reuses instead of spending again."""
        if self.schema is not None:
            schema = self.schema
            schema.validate(df)
            source = "public" if schema.private else "non-private"
        else:
            schema = self._infer_schema(df)
            assert self.schema_inference is not None  # _infer_schema set it
            source = "dp" if self.schema_inference.private else "non-private"
        rows = schema.conform(df)  # row by row: rare values DP inference dropped take their rows along
        if len(rows) == 0:
            raise DataError("no row fits the schema. " + self._spent_note())
        rows_dp = self._count_rows(len(rows))
        inference = self.schema_inference
        eps_train = self.epsilon - (inference.epsilon if inference else 0.0)
        later: tuple[PrivacyEvent, ...] = ()
        budget = marginals.MarginalBudget(0.0, 0.0, 0, 0)
        if self.config.marginal_share > 0:
            budget = self._marginal_budget(len(schema))
            later = tuple(budget.events())
            eps_train = accounting.epsilon_of_rho((1.0 - self.config.marginal_share)
                                                  * accounting.budget_rho(eps_train, self.delta), self.delta)
        batch, q, sigma = self._plan_batch(rows_dp, eps_train, self.delta, later)
        plan = _FitPlan(self._settings(), schema.to_dict(), source,
                        inference.epsilon if inference else 0.0, inference.delta if inference else 0.0,
                        list(inference.notes) if inference else [], rows_dp, batch, q, sigma,
                        self.ledger.to_dict(), _fingerprint(schema, rows), budget.sigma, budget.measurements,
                        budget.rounds, budget.selection_epsilon, budget.one_way_sigma)
        return schema, rows, plan

    def _marginal_budget(self, n_columns: int) -> marginals.MarginalBudget:
        c = self.config
        return marginals.plan_budget(self.epsilon, self.delta, c.marginal_share, n_columns, c.marginal_rounds,
                                     c.selection_share, c.one_way_weight)

    def _settings(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "config": asdict(self.config), "seed": self.seed,
                "schema": self.schema.to_dict() if self.schema is not None else None,
                "allow_non_private_schema": self.allow_non_private_schema}

    def _resume_plan(self, plan: _FitPlan, df: pd.DataFrame) -> tuple[Schema, pd.DataFrame]:
        """Check that a saved plan belongs to this run (settings and table) and restore its spends."""
        mine = self._settings()
        changed = [k for k in mine if json.dumps(mine[k], sort_keys=True) != json.dumps(plan.settings.get(k),
                                                                                     sort_keys=True)]
        if changed:
            raise ConfigError(f"cannot resume: the run folder was started with other settings ({', '.join(changed)}"
                              "); use the same options, or a new folder")
        schema = Schema.from_dict(plan.schema)
        if self.schema is not None:
            schema.validate(df)
        rows = schema.conform(df)
        if _fingerprint(schema, rows) != plan.fingerprint:
            raise ConfigError("cannot resume: the run folder was started on a different table; use the same "
                              "--data, or a new folder")
        self.ledger = PrivacyLedger.from_dict(plan.ledger)  # what was spent before training, exactly once
        return schema, rows

    def fit(self, df: pd.DataFrame, *, test: pd.DataFrame | None = None,
            on_step: Callable[[int, int, dict[str, float]], None] | None = None,
            run_dir: str | Path | None = None, checkpoint_every: int = 10) -> Synthesizer:
        """Train on `df` (the private table). `test`, if given, is held-out data (never trained on) whose
        per-row NLL is tracked for the data holder's learning curve (`diagnostics`, not DP).

        `run_dir`: a folder for the data holder (it holds a fingerprint of the table and checkpoints) where
        the plan (schema, DP row count, DP-SGD setting, the ledger so far) and a checkpoint every
        `checkpoint_every` steps are written. Fitting again with the same `run_dir`, options and table
        resumes from the last checkpoint: nothing is inferred or counted again, the ledger continues, and the
        run ends with the epsilon of an uninterrupted one. Other settings or another table are refused.
        """
        import time

        start = time.perf_counter()
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"fit() takes a pandas DataFrame, got {type(df).__name__}")
        if self.model is not None:
            raise ConfigError("this synthesizer was already fitted; create a new one (its budget is spent)")
        if len(df) == 0:
            raise DataError("the table is empty: nothing to fit")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be a whole number >= 1, got {checkpoint_every!r}")
        if self.schema is not None:
            self.schema.check_columns(df)  # the column set is public: checked before any value is read
        if test is not None and self.schema is not None:
            self.schema.check_columns(test)
        c = self.config
        run_dir = Path(run_dir) if run_dir is not None else None
        planned: list[tuple[Schema, pd.DataFrame]] = []

        def plan_fit() -> _FitPlan:  # spends on the rows: once, by rank 0 alone under torchrun
            plan = _FitPlan.read(run_dir) if run_dir is not None else None
            if plan is not None:
                planned.append(self._resume_plan(plan, df))
                return plan
            if run_dir is not None and run_dir.exists() and any(run_dir.iterdir()):
                raise ConfigError(f"{run_dir} is not empty and holds no run to resume: choose a new folder")
            schema, rows, plan = self._prepare(df)
            planned.append((schema, rows))
            if run_dir is not None:
                plan.write(run_dir)
            return plan

        plan = distributed.on_first(plan_fit)
        # the other processes of a torchrun launch take rank 0's plan as a resumed fit does: spending nothing
        schema, rows = planned[0] if planned else self._resume_plan(plan, df)
        codec = TabularCodec(schema)
        vids = schema.value_ids(rows)
        if c.augmentations is None:  # from the public column count: the saved config says which K ran
            c = self.config = replace(c, augmentations=c.orders_per_row(codec.n_columns))

        if self.seed is not None:
            torch.manual_seed(self.seed)
        args = self._model_args(codec)
        model = Transformer(args)
        _init_weights(model)
        rng = np.random.default_rng(self.seed)
        objective = RowObjective(codec, vids, c, rng)

        evaluate: Callable[[nn.Module], float] | None = None
        if test is not None:
            test_rows = schema.conform(test)
            test_enc = codec.encode(test_rows.iloc[:2000])  # schema order: comparable across runs

            def test_loss(m: nn.Module) -> float:
                assert isinstance(m, Transformer)
                return -float(value_log_likelihood(m, codec, test_enc).mean())

            evaluate = test_loss

        train_config = TrainConfig(steps=c.steps, batch_size=plan.batch_size, sample_rate=plan.sample_rate,
                                   lr=c.lr, warmup_steps=c.warmup_steps, micro_batch_size=c.micro_batch_size,
                                   max_grad_norm=c.max_grad_norm, noise_multiplier=plan.noise_multiplier,
                                   target_epsilon=self.epsilon, delta=self.delta, accountant=c.accountant,
                                   noise_seed=self.noise_seed, checkpoint_every=checkpoint_every,
                                   eval_every=max(1, c.steps // 10) if evaluate else 0, label="synth dp-sgd")
        try:
            trainer = Trainer(model, objective, len(rows), train_config, ledger=self.ledger, evaluate=evaluate,
                              on_step=on_step, run_dir=run_dir / "train" if run_dir is not None else None)
        except PrivacyError as err:
            raise type(err)(f"{err} {self._spent_note()}") from None
        result = trainer.fit()
        if result.ledger is not self.ledger:
            raise AssertionError("the trainer must spend on the synthesizer's ledger")
        self.model, self.codec, self.schema = model, codec, schema
        if plan.marginal_queries:
            self.marginals = self._measure_marginals(plan, vids, run_dir)
        self._statement = spent = self._compose_ledger(
            DpSgdEvent(plan.sample_rate, plan.noise_multiplier, result.steps))  # the ledger is final
        self.summary = FitSummary(
            rows_dp=plan.rows_dp, row_count_noise=c.row_count_noise, steps=result.steps,
            batch_size=plan.batch_size, sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=c.max_grad_norm, accountant=c.accountant, epsilon_rdp=spent.epsilon_rdp,
            epsilon_pld=spent.epsilon_pld, delta=self.delta, schema_source=plan.schema_source,
            schema_epsilon=plan.schema_epsilon, schema_delta=plan.schema_delta,
            schema_notes=list(plan.schema_notes), marginal_sigma=plan.marginal_sigma,
            marginal_queries=plan.marginal_queries, marginal_rounds=plan.marginal_rounds,
            marginal_one_way_sigma=plan.marginal_one_way_sigma)
        self.diagnostics = FitDiagnostics(rows_given=len(df), rows_used=len(rows), heldout_curve=result.history,
                                          seconds=time.perf_counter() - start)
        if spent.epsilon > self.epsilon * (1 + 1e-9):
            raise AssertionError("spent more than the budget")  # guarded by the trainer; never expected
        return self

    def _measure_marginals(self, plan: _FitPlan, vids: np.ndarray, run_dir: Path | None) -> MarginalSet:
        """Measure every column's 1-way marginal and choose and measure the rounds' 2- and 3-way ones on the
        private rows, against a pool of model samples (`marginals.select_adaptive`); the planned events go on
        the ledger. In a run folder the result is kept, so a resumed fit reuses it instead of measuring
        again."""
        c = self.config
        assert self.schema is not None  # fit() set it before measuring
        schema = self.schema
        path = run_dir / MARGINALS_FILE if run_dir is not None else None

        def measure() -> MarginalSet:  # once, by rank 0 alone under torchrun; every process gets the result
            if path is not None and path.is_file():
                return MarginalSet.from_dict(json.loads(path.read_text()))
            rng = numpy_rng(self.seed, "marginal pool")
            pool = self._model_ids(max(1000, int(c.pool_factor * plan.rows_dp)), rng)
            budget = marginals.MarginalBudget(plan.marginal_sigma, plan.selection_epsilon,
                                              len(schema), plan.marginal_rounds, plan.marginal_one_way_sigma)
            noise_seed = derived_seed(self.noise_seed, "marginals")
            ms = marginals.select_adaptive(schema, budget, pool, vids, plan.rows_dp, noise_seed,
                                           (c.marginal_groups, c.pair_groups, c.triple_groups))
            if ms.events() != budget.events():
                raise AssertionError("what is measured must be what the plan calibrated for")
            if path is not None:
                write_json_atomic(path, ms.to_dict())
            return ms

        ms = distributed.on_first(measure)
        for event in ms.events():
            self.ledger.append(event)
        return ms

    # -- using the model ------------------------------------------------------------------------------
    def _fitted(self) -> tuple[Transformer, TabularCodec]:
        if self.model is None or self.codec is None:
            raise ConfigError("the synthesizer is not fitted: call fit(df) or Synthesizer.load(dir) first")
        return self.model, self.codec

    def _model_ids(self, n: int, rng: np.random.Generator, batch_size: int = 2048) -> np.ndarray:
        """Value ids [n, d] of rows drawn from the language model itself (no calibration)."""
        model, codec = self._fitted()
        tokens = sample_tokens(model, codec, n, order="random" if self.config.permute_columns else None,
                               temperature=self.config.temperature, seed=int(rng.integers(2**62)),
                               batch_size=batch_size)
        return codec.decode_value_ids(tokens)

    def sample(self, n: int, seed: int | None = None, batch_size: int = 2048) -> pd.DataFrame:
        """n synthetic rows, every one valid under the schema; reproducible when `seed` is given.

        With measured marginals, the rows are drawn from `pool_factor` x n rows of the language model with
        probability proportional to the fitted tilt (`marginals.resample`); numbers are drawn uniformly
        inside their bins."""
        self._fitted()
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"n must be a whole number >= 0, got {n!r}")
        rng = np.random.default_rng(self.seed if seed is None else seed)
        if self.marginals is None:
            ids = self._model_ids(n, rng, batch_size)
        else:
            pool = self._model_ids(math.ceil(self.config.pool_factor * n), rng, batch_size)
            ids = marginals.resample(self.marginals, pool, n, rng)
        assert self.schema is not None  # set with the model
        return self.schema.frame_from_value_ids(ids, rng)

    def log_likelihood(self, df: pd.DataFrame) -> np.ndarray:
        """Per-row log-likelihood (nats) of `df` under the model, columns in schema order."""
        model, codec = self._fitted()
        assert self.schema is not None  # set with the model
        rows = self.schema.conform(df)
        out = []
        with torch.no_grad():
            for start in range(0, len(rows), 4096):
                enc = codec.encode(rows.iloc[start:start + 4096])
                out.append(value_log_likelihood(model, codec, enc).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    @property
    def statement(self) -> PrivacyStatement:
        """What the ledger amounts to (`accounting.PrivacyStatement`): epsilon under both accountants at
        `delta`, the budget, and the TAN figures of the DP-SGD run. Computed once when `fit` ends, or on
        first use after `load`; computed again only for a ledger that has grown since (a fit interrupted or
        refused midway, whose spend counts)."""
        if self._statement is None or self._statement.events != self.ledger.events:
            s = self.summary
            self._statement = self._compose_ledger(
                DpSgdEvent(s.sample_rate, s.noise_multiplier, s.steps) if s is not None else None)
        return self._statement

    def _compose_ledger(self, dp_sgd: DpSgdEvent | None) -> PrivacyStatement:
        return PrivacyStatement.of(self.ledger, self.delta, self.config.accountant, target_epsilon=self.epsilon,
                                   dp_sgd=dp_sgd)

    def privacy(self) -> dict[str, Any]:
        """The ledger and what it amounts to under both accountants: `statement.to_dict()`."""
        return self.statement.to_dict()

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write model, schema, ledger and settings to `directory`, which appears complete or not at all.

        An existing file, or a non-empty folder, is refused unless `overwrite=True`, which replaces it whole:
        the old one is kept aside until the new one is in place, then removed (nothing of it is left, hidden
        or not). Debris of an earlier save that was killed midway (`.NAME.tmp-*`) is removed first. A saved
        model is meant to be shared: shareable modes (`tramontane.files.write_dir_atomic`).
        """
        model, _ = self._fitted()
        directory = Path(directory)
        if directory.exists() and not overwrite and (not directory.is_dir() or any(directory.iterdir())):
            raise ConfigError(f"{directory} already exists: choose a new folder, or save with overwrite=True "
                              "(--overwrite) to replace it")
        # Only DP and public fields (tramontane.synth.release); the data holder's diagnostics stay out.
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "epsilon": self.epsilon,
                 "delta": self.delta, "config": asdict(self.config), "seed": self.seed,
                 "ledger": self.ledger.to_dict(), "summary": asdict(self.summary) if self.summary else None}

        schema = self.schema
        assert schema is not None  # set with the model

        def write(folder: Path) -> None:
            save_model(model, folder / "model", format="consolidated")
            schema.save(folder / "schema.json")
            if self.marginals is not None:
                (folder / MARGINALS_FILE).write_text(json.dumps(self.marginals.to_dict()))
            (folder / STATE_FILE).write_text(json.dumps(state, indent=1))

        return write_dir_atomic(directory, write, SHAREABLE_MODE)

    @classmethod
    def load(cls, directory: str | Path) -> Synthesizer:
        """A synthesizer saved by `save`; `ConfigError` naming the problem for anything else."""
        directory = Path(directory)
        if not directory.exists():
            raise ConfigError(f"{directory} does not exist")
        if not directory.is_dir():
            raise ConfigError(f"{directory} is a file, not a saved synthesizer directory")
        path = directory / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{directory} is not a saved synthesizer (no {STATE_FILE})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path} is damaged (not valid JSON): save the synthesizer again") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{path} is not a tramontane synthesizer")
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"{path} has version {state.get('version')!r}; this tramontane reads version "
                              f"{STATE_VERSION}: fit the synthesizer again with this version")
        try:
            synth = cls(Schema.load(directory / "schema.json"), state["epsilon"], state["delta"],
                        SynthConfig(**state["config"]), seed=state.get("seed"))
            synth.ledger = PrivacyLedger.from_dict(state["ledger"])
            synth.summary = FitSummary(**state["summary"]) if state.get("summary") else None
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{path} is damaged ({type(err).__name__}: {err}): save the synthesizer "
                              "again") from None
        synth.model, _ = load_model(directory / "model")
        synth.model.eval()
        assert synth.schema is not None  # loaded above
        synth.codec = TabularCodec(synth.schema)
        if (directory / MARGINALS_FILE).is_file():
            try:
                synth.marginals = MarginalSet.from_dict(json.loads((directory / MARGINALS_FILE).read_text()))
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(f"{directory / MARGINALS_FILE} is damaged ({type(err).__name__}): save the "
                                  "synthesizer again") from None
        return synth



def dp_row_count(n: int, noise_std: float, seed: int | None = None) -> int:
    """The Gaussian mechanism on a row count: round(n + N(0, noise_std^2)), at least 1.

    Sensitivity 1 under add/remove-one neighbours, so this is the release of a `GaussianEvent` with noise
    multiplier `noise_std`; rounding and the floor are post-processing. The noise is drawn from a generator
    seeded by the OS CSPRNG unless `seed` is given (tests only: warns).
    """
    noise = SecureRandom(seed, "the row count's noise").normal(torch.Size([1]), noise_std, torch.device("cpu"),
                                                               torch.float64)
    return max(1, int(round(n + float(noise[0]))))


def _init_weights(model: Transformer) -> None:
    """Small normal init (std 0.02), output head scaled down, norms at one (GPT-2 style)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        for layer in model.layers:
            assert isinstance(layer, TransformerBlock)
            layer.attention.wo.weight.mul_(1 / math.sqrt(2 * len(model.layers)))
