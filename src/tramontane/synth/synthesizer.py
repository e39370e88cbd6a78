"""`Synthesizer`: DP synthetic tables from a Mistral-architecture language model (the synlm method).

Castellon, Gopi, Ma, ... "Privately generating tabular data using language models" (arXiv 2306.04803):
rows become token sequences (`codec.py`), a small causal LM (here our Mistral decoder: GQA, RMSNorm,
SwiGLU, RoPE) is trained from scratch with DP-SGD (`tramontane.dp`, `tramontane.training`), and synthetic
rows are sampled column by column under the schema's constraints, so every sampled row is valid.

Privacy (unit: one row; add/remove-one neighbours):
- the schema is public when given; inferred from the data it spends `schema_budget_share` of epsilon and
  delta through `dp_schema.infer_schema` (declared (epsilon, delta) events on the ledger);
- DP-SGD spends the rest: Poisson sampling at q = batch_size / N, clipping to `max_grad_norm`, Gaussian noise
  calibrated *exactly* with the accountant so that the whole ledger is (epsilon, delta)-DP; the batch size
  follows the TAN rule (Sander et al., arXiv 2210.03403): large batches with sigma in the 2..4 sweet spot;
- sampling and saving are post-processing. Rows are never logged.
The ledger travels with the saved synthesizer, and fitting refuses (nothing spent) a budget it cannot meet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tramontane import accounting
from tramontane.accounting import PrivacyLedger
from tramontane.errors import ConfigError, DataError, PrivacyParameterError
from tramontane.models import ModelArgs, Transformer
from tramontane.models.checkpoint import load_model, save_model
from tramontane.synth.codec import EncodedRows, TabularCodec
from tramontane.synth.dp_schema import SchemaInference, infer_schema
from tramontane.synth.sampling import sample_rows
from tramontane.synth.schema import Schema
from tramontane.training import TrainConfig, Trainer

logger = logging.getLogger(__name__)

STATE_FILE = "synthesizer.json"
STATE_FORMAT = "tramontane.synthesizer"
MIN_BATCH = 8  # expected rows per DP-SGD step below which a run cannot learn: refused rather than wasted


@dataclass
class SynthConfig:
    """Model and training hyper-parameters. The defaults are the configuration `benchmarks/synth.py`
    measures; `SynthConfig.fast()` is the quicker one `make demo` uses."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 192
    steps: int = 100
    noise_multiplier_target: float = 2.5  # TAN: the batch size is chosen so that sigma lands here
    max_batch_fraction: float = 0.5  # at most this share of the rows per step
    lr: float = 1e-2
    warmup_steps: int = 6
    max_grad_norm: float = 1.0
    micro_batch_size: int = 1024
    augmentations: int = 1  # K column-permuted copies of a row inside its one clipped gradient
    permute_columns: bool = True
    accountant: str = "rdp"
    schema_budget_share: float = 0.1  # of epsilon and delta, when the schema is inferred with DP
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.schema_budget_share < 1:
            raise ConfigError(f"schema_budget_share must be in (0, 1), got {self.schema_budget_share}")
        if self.noise_multiplier_target <= 0:
            raise ConfigError("noise_multiplier_target must be > 0")
        if not 0 < self.max_batch_fraction <= 1:
            raise ConfigError("max_batch_fraction must be in (0, 1]")

    @classmethod
    def fast(cls) -> "SynthConfig":
        """A shorter run with smaller batches (a few minutes on 2 CPU cores for Adult), lower utility."""
        return cls(steps=40, noise_multiplier_target=2.0, warmup_steps=3)


@dataclass
class FitSummary:
    """What fitting did, for the report (no row-level information)."""

    rows: int
    rows_dropped_by_schema: int
    steps: int
    batch_size: int
    sample_rate: float
    noise_multiplier: float
    epsilon_rdp: float
    epsilon_pld: float
    delta: float
    schema_private: bool
    schema_epsilon: float
    schema_delta: float
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def value_log_likelihood(model: Transformer, codec: TabularCodec, batch: EncodedRows) -> torch.Tensor:
    """Per-sequence log-likelihood [M] of the value tokens under the constrained softmax.

    Equal to `codec.sequence_log_likelihood(model(tokens), batch)` (end tokens are forced, so they cost 0,
    and prompts are never predicted), but the output head runs only at the d prompt positions instead of
    all 3d, which is a third of the head's cost in training.
    """
    offset = 1 if codec.bos else 0
    hidden = model.hidden_states(batch.tokens)[:, offset::3]  # M d dim: at each prompt token
    logits = model.output(hidden).float()  # M d V
    columns = batch.orders.to(logits.device)  # M d: the column whose value comes next
    allowed = codec.mask_table(logits.device)[1 + columns]  # M d V
    if logits.shape[-1] > allowed.shape[-1]:  # a model vocabulary padded beyond the codec's
        allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[-1]), value=False)
    logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    targets = batch.tokens[:, offset + 1::3].to(logits.device)  # M d: the value tokens
    return logp.gather(-1, targets[..., None]).squeeze(-1).sum(-1)


class _RowObjective:
    """Constrained next-token loss of encoded rows (fresh column permutations drawn at every step)."""

    def __init__(self, codec: TabularCodec, vids: np.ndarray, config: SynthConfig, rng: np.random.Generator):
        self.codec, self.vids, self.config, self.rng = codec, vids, config, rng

    def rows(self, indices) -> tuple[EncodedRows, torch.Tensor | None]:
        order = "random" if self.config.permute_columns else None
        enc = self.codec.encode_value_ids(self.vids[np.asarray(indices, dtype=np.int64)], order,
                                          self.config.augmentations, self.rng)
        ids = enc.example_ids if self.config.augmentations > 1 else None
        return enc, ids

    def losses(self, model: nn.Module, batch: EncodedRows) -> torch.Tensor:
        ll = value_log_likelihood(model, self.codec, batch)
        # per-value mean, and the K copies of a row average rather than add up (AugMult)
        return -ll / (self.codec.n_columns * self.config.augmentations)


class Synthesizer:
    """Fit a DP language model on a table and sample synthetic rows from it.

    Args:
        schema: the public schema (a `Schema`, or a JSON/YAML path). None: inferred from the data with DP,
            spending `config.schema_budget_share` of the budget.
        epsilon, delta: the total privacy budget of `fit` (schema inference included).
        config: model and training hyper-parameters (`SynthConfig`).
        allow_non_private_schema: infer a missing schema WITHOUT DP (warns; the report says so).
        seed: makes model initialisation, column permutations and default sampling reproducible. The DP noise
            and Poisson sampling stay cryptographically seeded unless `noise_seed` is given (warns).
    """

    def __init__(self, schema: Schema | str | Path | None = None, epsilon: float = 3.0, delta: float = 1e-5,
                 config: SynthConfig | None = None, *, allow_non_private_schema: bool = False,
                 seed: int | None = None, noise_seed: int | None = None) -> None:
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise PrivacyParameterError(f"epsilon must be a positive number, got {epsilon!r}")
        if not 0 < delta < 1:
            raise PrivacyParameterError(f"delta must be in (0, 1), got {delta!r}")
        self.schema = Schema.load(schema) if isinstance(schema, (str, Path)) else schema
        self.epsilon, self.delta = float(epsilon), float(delta)
        self.config = config or SynthConfig()
        self.allow_non_private_schema = allow_non_private_schema
        self.seed, self.noise_seed = seed, noise_seed
        self.ledger = PrivacyLedger()
        self.model: Transformer | None = None
        self.codec: TabularCodec | None = None
        self.schema_inference: SchemaInference | None = None
        self.summary: FitSummary | None = None

    # -- fitting --------------------------------------------------------------------------------------
    def _model_args(self, codec: TabularCodec) -> ModelArgs:
        c = self.config
        return ModelArgs(dim=c.dim, n_layers=c.n_layers, head_dim=c.dim // c.n_heads, hidden_dim=c.hidden_dim,
                         n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, norm_eps=1e-5, vocab_size=codec.vocab_size,
                         rope_theta=10_000.0)

    def _plan_batch(self, n: int, epsilon: float, delta: float) -> tuple[int, float]:
        """TAN rule: the batch size whose calibrated sigma is near the target, then sigma exactly."""
        c = self.config
        eta = accounting.eta_for_eps_tan(epsilon, delta)
        batch = eta * c.noise_multiplier_target * math.sqrt(2.0 / c.steps) * n
        if batch < MIN_BATCH:
            raise PrivacyParameterError(
                f"epsilon={epsilon:.3g} cannot be met usefully with {n} rows in {c.steps} DP-SGD steps: the noise "
                f"it needs allows batches of only {batch:.2g} rows (at least {MIN_BATCH} are needed to learn "
                "anything). Raise epsilon, give more rows, or lower config.steps.")
        batch = int(min(batch, c.max_batch_fraction * n))
        cal = accounting.calibrate_noise_multiplier(epsilon, delta, batch / n, c.steps, accountant=c.accountant)
        return batch, cal.noise_multiplier

    def fit(self, df: pd.DataFrame, *, test: pd.DataFrame | None = None,
            on_step: Callable[[int, int, dict[str, float]], None] | None = None) -> "Synthesizer":
        """Train on `df` (the private table). `test`, if given, is held-out data (never trained on) whose
        per-row NLL is tracked during training for the report's learning curve."""
        import time

        start = time.perf_counter()
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"fit() takes a pandas DataFrame, got {type(df).__name__}")
        if len(df) == 0:
            raise DataError("the table is empty: nothing to fit")
        if len(self.ledger):
            raise ConfigError("this synthesizer was already fitted; create a new one (its budget is spent)")
        c = self.config
        ledger = PrivacyLedger()
        eps_train, delta_train = self.epsilon, self.delta
        if self.schema is None:
            share = c.schema_budget_share
            inference = infer_schema(df, epsilon=None if self.allow_non_private_schema else self.epsilon * share,
                                     delta=None if self.allow_non_private_schema else self.delta * share,
                                     allow_non_private=self.allow_non_private_schema)
            self.schema_inference = inference
            for event in inference.ledger_events():
                ledger.append(event)
            eps_train -= inference.epsilon
            delta_train -= inference.delta
            schema = inference.schema
            rows = schema.conform(df)  # row by row: rare values DP inference dropped take their rows along
        else:
            schema = self.schema
            schema.validate(df)
            rows = schema.conform(df)
        if len(rows) == 0:
            raise DataError("no row fits the schema")
        codec = TabularCodec(schema)
        vids = schema.value_ids(rows)
        n = len(rows)
        batch, sigma = self._plan_batch(n, eps_train, delta_train)

        if self.seed is not None:
            torch.manual_seed(self.seed)
        args = self._model_args(codec)
        model = Transformer(args)
        _init_weights(model)
        rng = np.random.default_rng(self.seed)
        objective = _RowObjective(codec, vids, c, rng)

        evaluate = None
        if test is not None:
            test_rows = schema.conform(test)
            test_enc = codec.encode(test_rows.iloc[:2000])  # schema order: comparable across runs

            def evaluate(m: nn.Module) -> float:
                return -float(value_log_likelihood(m, codec, test_enc).mean())

        train_config = TrainConfig(steps=c.steps, batch_size=batch, lr=c.lr, warmup_steps=c.warmup_steps,
                                   micro_batch_size=c.micro_batch_size, max_grad_norm=c.max_grad_norm,
                                   noise_multiplier=sigma, target_epsilon=self.epsilon, delta=self.delta,
                                   accountant=c.accountant, noise_seed=self.noise_seed,
                                   eval_every=max(1, c.steps // 10) if evaluate else 0, label="synth dp-sgd")
        trainer = Trainer(model, objective, n, train_config, ledger=ledger, evaluate=evaluate, on_step=on_step)
        result = trainer.fit()
        self.model, self.codec, self.schema, self.ledger = model, codec, schema, result.ledger
        eps_pld = accounting.epsilon(self.ledger, self.delta, "pld")
        self.summary = FitSummary(
            rows=n, rows_dropped_by_schema=len(df) - n, steps=result.steps, batch_size=batch,
            sample_rate=result.sample_rate, noise_multiplier=sigma, epsilon_rdp=result.epsilon,
            epsilon_pld=eps_pld, delta=self.delta,
            schema_private=self.schema_inference.private if self.schema_inference else True,
            schema_epsilon=self.schema_inference.epsilon if self.schema_inference else 0.0,
            schema_delta=self.schema_inference.delta if self.schema_inference else 0.0,
            eval_curve=result.history, seconds=time.perf_counter() - start)
        if result.epsilon > self.epsilon * (1 + 1e-9):
            raise AssertionError("spent more than the budget")  # guarded by the trainer; never expected
        return self

    # -- using the model ------------------------------------------------------------------------------
    def _fitted(self) -> tuple[Transformer, TabularCodec]:
        if self.model is None or self.codec is None:
            raise ConfigError("the synthesizer is not fitted: call fit(df) or Synthesizer.load(dir) first")
        return self.model, self.codec

    def sample(self, n: int, seed: int | None = None, batch_size: int = 2048) -> pd.DataFrame:
        """n synthetic rows, every one valid under the schema; reproducible when `seed` is given."""
        model, codec = self._fitted()
        if n < 0:
            raise ConfigError(f"n must be >= 0, got {n}")
        if seed is None:
            seed = self.seed
        return sample_rows(model, codec, n, order="random" if self.config.permute_columns else None,
                           temperature=self.config.temperature, seed=seed, batch_size=batch_size)

    def log_likelihood(self, df: pd.DataFrame) -> np.ndarray:
        """Per-row log-likelihood (nats) of `df` under the model, columns in schema order."""
        model, codec = self._fitted()
        rows = self.schema.conform(df)
        out = []
        with torch.no_grad():
            for start in range(0, len(rows), 4096):
                enc = codec.encode(rows.iloc[start:start + 4096])
                out.append(value_log_likelihood(model, codec, enc).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def privacy(self) -> dict[str, Any]:
        """The ledger and what it amounts to under both accountants."""
        spent = {acc: accounting.epsilon(self.ledger, self.delta, acc) for acc in ("rdp", "pld")} \
            if len(self.ledger) else {"rdp": 0.0, "pld": 0.0}
        return {"target_epsilon": self.epsilon, "delta": self.delta, "epsilon_rdp": spent["rdp"],
                "epsilon_pld": spent["pld"], "ledger": self.ledger.to_dict()}

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write model, schema, ledger and settings to `directory` atomically (replacing it)."""
        model, _ = self._fitted()
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            save_model(model, tmp / "model", format="consolidated")
            self.schema.save(tmp / "schema.json")
            state = {"format": STATE_FORMAT, "version": 1, "epsilon": self.epsilon, "delta": self.delta,
                     "config": asdict(self.config), "seed": self.seed, "ledger": self.ledger.to_dict(),
                     "summary": asdict(self.summary) if self.summary else None,
                     "schema_inference": self.schema_inference.to_dict() if self.schema_inference else None}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Synthesizer":
        directory = Path(directory)
        try:
            state = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{directory} is not a saved synthesizer (no {STATE_FILE})") from None
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{directory / STATE_FILE} is not a tramontane synthesizer")
        synth = cls(Schema.load(directory / "schema.json"), state["epsilon"], state["delta"],
                    SynthConfig(**state["config"]), seed=state.get("seed"))
        synth.ledger = PrivacyLedger.from_dict(state["ledger"])
        synth.summary = FitSummary(**state["summary"]) if state.get("summary") else None
        synth.model, _ = load_model(directory / "model")
        synth.model.eval()
        synth.codec = TabularCodec(synth.schema)
        synth._saved_schema_inference = state.get("schema_inference")
        return synth


def _init_weights(model: Transformer) -> None:
    """Small normal init (std 0.02), output head scaled down, norms at one (GPT-2 style)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        for layer in model.layers:
            layer.attention.wo.weight.mul_(1 / math.sqrt(2 * len(model.layers)))
