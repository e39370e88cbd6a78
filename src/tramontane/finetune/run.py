"""A private fine-tuning run (`tramontane finetune`): a released checkpoint, a JSONL of chats or text, DP-SGD
on LoRA adapters (or every weight), and a folder with the adapter, its ledger and the run's report.

What one run does, in order:

1. Checks the privacy parameters, and a starting adapter's ledger against the budget, before reading any
   training record (`PrivacyBudgetError`: nothing spent).
2. Reads and encodes the records (`data.py`: loss on assistant tokens only), inserts the secret-exposure
   canaries when asked (`audit.exposure`), groups the rows by privacy unit (one example, or all of one
   user's examples, at most `max_examples_per_user` of them) and plans the DP-SGD setting: the TAN rule
   (Sander, Stock and Sablayrolles, arXiv 2210.03403) picks the expected batch for the steps unless given,
   and the noise multiplier is calibrated so that the ledger (the starting adapter's events included) ends
   exactly at the target epsilon.
3. Trains with `training.Trainer`: Poisson sampling of privacy units, the DP engine's step (per-unit
   clipping of the adapter gradients, Gaussian noise), a checkpoint every few steps in `RUN/run/` carrying
   the ledger. A killed run resumes with `resume=True` from the last checkpoint with the same ledger, the
   same plan and the same canaries (`RUN/run/setup.json`, for the data holder only). Under torchrun
   (`tramontane.dp.distributed`) every process trains on its shard of each batch; rank 0 alone draws the
   setup (canaries, seeds) and writes files, and the other processes return without writing (a result
   with empty `release` and `holder`).
4. Writes `RUN/adapter/` (PEFT layout, with `tramontane_privacy.json`: the ledger and the privacy unit) or,
   for `method="full"`, `RUN/model/`; then measures: the privacy card (RDP and PLD epsilon, membership and
   reconstruction bounds), each canary's exposure, the held-out loss and a loss-threshold membership attack.

Released and not (`RUN/report/release/report.json` lists each field with its status):
- shareable: the adapter or model and its ledger (DP), the plan (q, sigma, steps: in the ledger), the
  hyper-parameters (public inputs), the bounds (functions of the ledger) and the canaries' exposures (the
  DP model scored on synthetic canary texts: post-processing);
- for the data holder only (`RUN/report/holder-only/`, `RUN/run/`, mode 0600): the held-out loss and
  perplexity, the membership attack on training vs held-out examples, counts of records, units, dropped and
  truncated examples, the checkpoints and the canary secrets. None of these is covered by DP.

QLoRA-style (Dettmers et al. 2023, "QLoRA: efficient finetuning of quantized LLMs", with tramontane's int8 / int4
weight-only schemes in place of NF4): with `quantize="int8" | "int4"` the frozen base's decoder linear layers are
quantized (`models.quant`, as `tramontane generate --quantize` does) before the adapters wrap them, so the base
holds 1 or ~0.56 byte per weight; `quantize_head` quantizes the output head and the token embeddings the same way
(the head is often the largest frozen matrix of a small model). Each adapted layer is then the quantized layer's
output (its weight dequantized in training) plus the float32 adapter's. Clipping, noise and the ledger are the same
as over the float base: the quantized layers hold no parameters, and the plan does not depend on them.

The base is a checkpoint folder (consolidated or Hugging Face) or a llama.cpp GGUF file (`models.gguf`: its
tensors dequantized to float32, the tokenizer file beside it). Over a GGUF base, `quantize` re-quantizes those
dequantized weights with tramontane's scheme (a Q4_K file trains over int4 of its dequantized values, not over
its own blocks); the adapter's `base_model_name_or_path` is the file's path and the adapter loads over the same
file (`tramontane generate --model X.gguf --adapter RUN/adapter`). Full fine-tuning writes `RUN/model/` in the
Hugging Face format whatever the base (tramontane writes no GGUF; llama.cpp's convert_hf_to_gguf.py converts it),
with the base's tokenizer files, from the GGUF's folder for a GGUF base.

The number of privacy units N is used as public, as in Opacus and dp-transformers: q = B / N is in the
ledger, so N can be read from it. A unit is one example (`privacy_unit="example"`) or one user
(`"user"`: the `user_id` of each record; one clipped gradient per user per step).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, PrivacyLedger, PrivacyStatement
from tramontane.audit import exposure as canary_audit
from tramontane.audit.card import ledger_bounds
from tramontane.audit.membership import attack_summary, loss_threshold_scores
from tramontane.dp import distributed
from tramontane.errors import ConfigError, PrivacyBudgetError
from tramontane.files import HOLDER_MODE, SHAREABLE_MODE, write_json_atomic
from tramontane.finetune import data as ft_data
from tramontane.finetune.adapter import load_adapter, save_adapter, tokenizer_files
from tramontane.finetune.lora import LoraConfig, add_lora
from tramontane.models.checkpoint import load_args, load_model, save_model
from tramontane.models.quant import QuantConfig, quantization_config, quantize_model
from tramontane.models.transformer import Transformer
from tramontane.seeding import numpy_rng, seed_for
from tramontane.tokenizer import Tokenizer
from tramontane.training.objectives import IGNORE_INDEX, LanguageModelingObjective, token_losses
from tramontane.training.trainer import StepCallback, TrainConfig, Trainer

logger = logging.getLogger(__name__)

PRIVACY_FILE = "tramontane_privacy.json"
PRIVACY_FORMAT = "tramontane.finetune_privacy"
METHODS = ("lora", "full")
PRIVACY_UNITS = ("example", "user")
DEFAULT_STEPS = 100
SETUP_FILE = "setup.json"
EXHAUSTED_RTOL = 1e-3  # a budget within this fraction of being spent counts as spent


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Privacy vocabulary as in Opacus; `batch_size` is the expected Poisson batch of
    privacy units (None: the TAN rule picks it for `steps`, at noise multiplier `noise_multiplier_guess`).
    `quantize` ("int8" or "int4", LoRA only) trains the adapters over a weight-only quantized base (see the
    module docstring); `quant_group_size` is int4's group of input columns, recorded as the value used (64
    unless given, as for `tramontane generate`); `quantize_head` quantizes the output head and the token
    embeddings too (the gradient reaches the adapters through the dequantized head)."""

    method: str = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    base_dtype: str | None = None  # "bfloat16": keep the frozen base in bf16, adapters in fp32 (LoRA only)
    quantize: str | None = None  # "int8" | "int4": the frozen base weight-only quantized (LoRA only)
    quant_group_size: int | None = None  # int4 only; None: models.quant's default (64)
    quantize_head: bool = False  # with quantize: the output head and the token embeddings as well
    private: bool = True
    epsilon: float | None = None
    delta: float | None = None
    accountant: accounting.Accountant = "rdp"
    privacy_unit: str = "example"
    max_examples_per_user: int = 16  # user level: each user's contribution, in examples
    steps: int | None = None  # None: `epochs`, or DEFAULT_STEPS
    epochs: float | None = None
    batch_size: int | None = None
    noise_multiplier: float | None = None  # None: calibrated to the budget
    noise_multiplier_guess: float = 3.0  # the TAN rule's sigma when it picks the batch
    max_grad_norm: float = 1.0
    lr: float | None = None  # None: 2e-3 for LoRA, 1e-4 for full fine-tuning
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_len: int = 512
    packing: str = "truncate"  # "split" long examples over rows, or "pack" each unit's examples (data.py)
    micro_batch_size: int = 8
    checkpoint_every: int = 10
    eval_every: int = 0
    seed: int | None = None  # None: noise, sampling and canaries from the OS CSPRNG
    canaries: int = 0
    canary_repetitions: tuple[int, ...] = (1, 10)
    canary_format: str = "my secret code is {secret}"
    canary_length: int = 6
    mia_examples: int = 1000  # at most this many training and held-out examples in the membership attack

    def __post_init__(self) -> None:
        if self.packing not in ("truncate", "split", "pack"):
            raise ConfigError(f"packing must be truncate, split or pack, got {self.packing!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.privacy_unit not in PRIVACY_UNITS:
            raise ConfigError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {self.privacy_unit!r}")
        if self.base_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ConfigError(f"base_dtype must be bfloat16, float16 or float32, got {self.base_dtype!r}")
        if self.base_dtype is not None and self.method != "lora":
            raise ConfigError("base_dtype keeps a frozen base in low precision: it needs method='lora'")
        if self.quantize is None:
            if self.quant_group_size is not None:
                raise ConfigError("quant_group_size is the int4 group size: it needs quantize='int4'")
            if self.quantize_head:
                raise ConfigError("quantize_head quantizes the output head and embeddings with the base's scheme: "
                                  "it needs quantize='int8' or 'int4'")
        else:
            if self.method != "lora":
                raise ConfigError(f"quantize={self.quantize!r} freezes the base's weights in {self.quantize}, "
                                  "which full fine-tuning would have to train: use method='lora' (--method lora: "
                                  "LoRA adapters over the quantized base), or leave quantize unset to train "
                                  "every weight in float")
            # validated as models.quant validates it; the group size used is recorded, default included
            self.quant_group_size = QuantConfig(self.quantize, self.quant_group_size).group_size
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give steps or epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        for name in ("max_examples_per_user", "max_len", "micro_batch_size", "mia_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.canaries < 0 or any(r < 1 for r in self.canary_repetitions) or not self.canary_repetitions:
            raise ConfigError("canaries must be >= 0 and canary_repetitions a non-empty list of counts >= 1")
        self.canary_repetitions = tuple(int(r) for r in self.canary_repetitions)
        if self.private:
            if self.delta is None:
                raise ConfigError("a private run needs delta (--delta), e.g. below 1 / the number of units")
            accounting.events.check_delta(self.delta, "delta")
            if self.epsilon is None and self.noise_multiplier is None:
                raise ConfigError("a private run needs a target epsilon (--epsilon), a noise multiplier, or both")
            if self.epsilon is not None:
                accounting.events.check_epsilon(self.epsilon, "epsilon", positive=True)
            if self.epsilon is None and self.batch_size is None:
                raise ConfigError("without a target epsilon, give the batch size as well as the noise multiplier")
            if self.max_grad_norm <= 0:
                raise ConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")

    @property
    def quant_config(self) -> QuantConfig | None:
        """The base's quantization scheme (None: a float base)."""
        if self.quantize is None:
            return None
        return QuantConfig(self.quantize, self.quant_group_size, embeddings=self.quantize_head,
                           output=self.quantize_head)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-3 if self.method == "lora" else 1e-4)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["canary_repetitions"] = list(self.canary_repetitions)
        out["lora"]["targets"] = list(self.lora.targets)
        return out


@dataclass(frozen=True)
class Plan:
    """The DP-SGD setting of a run: Poisson rate over `units` privacy units, noise, steps."""

    units: int
    steps: int
    batch_size: int  # expected batch q N (private) or the fixed batch (not private)
    sample_rate: float | None
    noise_multiplier: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    out: Path
    weights_dir: Path  # RUN/adapter (LoRA) or RUN/model (full)
    plan: Plan
    statement: PrivacyStatement | None
    release: dict[str, Any]  # RUN/report/release/report.json
    holder: dict[str, Any]  # RUN/report/holder-only/evaluation.json


# -- the privacy file of a saved adapter or model ---------------------------------------------------------

def privacy_record(ledger: PrivacyLedger, config: FinetuneConfig) -> dict[str, Any]:
    """What a saved adapter carries about its privacy: the whole ledger (earlier adapters' events included),
    delta, accountant, target epsilon and the privacy unit."""
    return {"format": PRIVACY_FORMAT, "version": 1, "private": config.private, "ledger": ledger.to_dict(),
            "delta": config.delta, "target_epsilon": config.epsilon, "accountant": config.accountant,
            "privacy_unit": config.privacy_unit,
            "max_examples_per_user": config.max_examples_per_user if config.privacy_unit == "user" else None}


def read_privacy(weights_dir: str | Path) -> dict[str, Any] | None:
    """The privacy record of an adapter or model folder written by `finetune`, or None when it has none."""
    path = Path(weights_dir) / PRIVACY_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != PRIVACY_FORMAT:
            raise ValueError("unknown format")
        record["ledger"] = PrivacyLedger.from_dict(record["ledger"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a readable privacy record ({err}); its ledger cannot be trusted, so "
                          "the adapter cannot be trained further") from None
    return record


def prior_ledger(init_adapter: str | Path | None, config: FinetuneConfig) -> PrivacyLedger:
    """The ledger a run starts from: the starting adapter's (its spending counts against this run's budget).
    Refuses, before any record is read, a budget the prior spending already exhausts."""
    if init_adapter is None:
        return PrivacyLedger()
    record = read_privacy(init_adapter)
    if record is None or not record["private"]:
        if config.private:
            raise PrivacyBudgetError(
                f"{init_adapter} carries no privacy ledger (it was trained without DP, or elsewhere): training it "
                "further cannot be stated as DP. Start from the base model, or train without --epsilon")
        return PrivacyLedger()
    ledger: PrivacyLedger = record["ledger"]
    if record["privacy_unit"] != config.privacy_unit:
        raise ConfigError(f"{init_adapter} was trained at the {record['privacy_unit']} level; train it further at "
                          f"the same level (--privacy-unit {record['privacy_unit']})")
    if config.private and config.epsilon is not None and len(ledger):
        assert config.delta is not None
        spent = accounting.epsilon(ledger, config.delta, config.accountant)
        # A run calibrated to a budget ends within the calibration's tolerance below it: that is exhausted too.
        if spent >= config.epsilon * (1 - EXHAUSTED_RTOL):
            raise PrivacyBudgetError(
                f"{init_adapter} has already spent epsilon {spent:.4g} at delta {config.delta:g} "
                f"({config.accountant}), which leaves nothing of the budget epsilon {config.epsilon:g}; nothing "
                "was read or spent. Raise --epsilon (the budget covers the adapter's whole history)")
    return ledger


# -- planning ----------------------------------------------------------------------------------------------

def plan_run(config: FinetuneConfig, units: int, prior: PrivacyLedger) -> Plan:
    """Steps, expected batch and noise multiplier for `units` privacy units (see the module docstring)."""
    steps = config.steps
    if not config.private:
        fixed = min(config.batch_size or 16, units)
        if steps is None:
            steps = math.ceil(config.epochs * units / fixed) if config.epochs is not None else DEFAULT_STEPS
        return Plan(units, steps, fixed, None, None)
    assert config.delta is not None
    batch: int | None = config.batch_size
    if batch is None:
        assert config.epsilon is not None
        guess = config.noise_multiplier or config.noise_multiplier_guess
        steps_now = steps or DEFAULT_STEPS
        for _ in range(50):  # with epochs, steps = E N / B and B = TAN(steps): a fixed point, reached fast
            batch = max(1, min(units, round(accounting.tan_batch_size(units, config.epsilon, config.delta,
                                                                      steps_now, guess))))
            if config.epochs is None:
                break
            new_steps = max(1, math.ceil(config.epochs * units / batch))
            if new_steps == steps_now:
                break
            steps_now = new_steps
        steps = steps_now
    elif steps is None:
        steps = math.ceil(config.epochs * units / batch) if config.epochs is not None else DEFAULT_STEPS
    assert batch is not None and steps is not None
    batch = min(batch, units)
    q = batch / units
    sigma = config.noise_multiplier
    if sigma is None:
        assert config.epsilon is not None
        sigma = accounting.calibrate_noise_multiplier(config.epsilon, config.delta, q, steps, config.accountant,
                                                      prior=prior.events).noise_multiplier
    return Plan(units, steps, batch, q, float(sigma))


# -- measurement -------------------------------------------------------------------------------------------

@torch.no_grad()
def row_losses(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
               batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Each row's summed next-token loss over its labelled positions, and that number of positions."""
    model.eval()
    sums, counts = [], []
    for start in range(0, inputs.shape[0], batch_size):
        x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
        scored = y != IGNORE_INDEX
        width = int(scored.any(0).nonzero().max()) + 1 if scored.any() else 1
        x, y, scored = x[:, :width], y[:, :width], scored[:, :width]
        loss = token_losses(model(x).float(), y)
        sums.append((loss * scored).sum(-1).double().numpy())
        counts.append(scored.sum(-1).numpy())
    if not sums:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(sums), np.concatenate(counts)


def _mean_loss(model: nn.Module, packed: ft_data.PackedExamples) -> float:
    sums, counts = row_losses(model, packed.inputs, packed.labels)
    return float(sums.sum() / max(counts.sum(), 1))


def _membership(model: nn.Module, train: ft_data.PackedExamples, held: ft_data.PackedExamples,
                limit: int, rng: np.random.Generator, delta: float | None) -> dict[str, Any]:
    """Loss-threshold attack (Yeom et al. 2018) on training rows vs held-out rows: for the data holder."""
    def pick(packed: ft_data.PackedExamples) -> np.ndarray:
        rows = np.arange(packed.inputs.shape[0])
        return np.sort(rng.choice(rows, size=min(limit, len(rows)), replace=False))

    scores = []
    for packed in (train, held):
        rows = torch.as_tensor(pick(packed))
        sums, counts = row_losses(model, packed.inputs[rows], packed.labels[rows])
        scores.append(loss_threshold_scores(sums / np.maximum(counts, 1)))
    summary = attack_summary(scores[0], scores[1], name="loss threshold", delta=delta)
    return summary.to_dict()


def _exposures(model: nn.Module, tokenizer: Tokenizer, canaries: Sequence[canary_audit.Canary],
               fmt: canary_audit.CanaryFormat, seed: int | None) -> dict[str, Any]:
    rng = numpy_rng(seed, "finetune", "exposure")
    model.eval()
    measured = canary_audit.canary_exposures(model, lambda text: tokenizer.encode(text, bos=True), canaries, fmt,
                                             rng=rng)
    return {"format": fmt.template, "space": fmt.space_size,
            "canaries": [m.to_dict() for m in measured],
            "summary": canary_audit.exposure_summary(measured)}


# -- the run -----------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# FinetuneConfig's settings added since the first release: a run set up before them had their defaults
ADDED_SETTING_DEFAULTS: dict[str, Any] = {"quantize": None, "quant_group_size": None, "quantize_head": False}


def _setup(run_dir: Path, config: FinetuneConfig, data_path: Path, resume: bool) -> dict[str, Any]:
    """The run's fixed choices (config, data fingerprint, canary secrets, seeds), written before the first
    step and read back on resume: a resumed run trains on exactly what the first one did."""
    path = run_dir / SETUP_FILE
    fingerprint = _sha256(data_path)
    if path.exists():
        if not resume:
            raise ConfigError(f"{run_dir.parent} already holds a run: pass --resume to continue it, or choose "
                              "another --out")
        setup = json.loads(path.read_text())
        # a setting added since the run started is absent from its setup: it ran with that setting's default
        stored = {**ADDED_SETTING_DEFAULTS, **setup["config"]}
        if stored != config.to_dict():
            changed = sorted(k for k, v in config.to_dict().items() if stored.get(k) != v)
            raise ConfigError(f"cannot resume {run_dir.parent}: it was started with other settings ({changed}); "
                              "resume with the same options")
        if setup["data_sha256"] != fingerprint:
            raise ConfigError(f"cannot resume {run_dir.parent}: the training file differs from the one the run "
                              "started on")
        return setup
    if resume:
        raise ConfigError(f"nothing to resume in {run_dir.parent}: run without --resume to start it")
    canaries: list[dict[str, Any]] = []
    if config.canaries:
        fmt = canary_audit.CanaryFormat(config.canary_format, length=config.canary_length)
        rng = numpy_rng(config.seed, "finetune", "canaries")
        reps = config.canary_repetitions
        per = math.ceil(config.canaries / len(reps))
        made = canary_audit.make_canaries(fmt, reps, per, rng)
        canaries = [c.to_dict() for c in made]
    setup = {"config": config.to_dict(), "data_sha256": fingerprint, "canaries": canaries,
             "data_seed": seed_for(config.seed, "finetune", "data")}  # stored: a resume bounds users alike
    write_json_atomic(path, setup, HOLDER_MODE)
    return setup


def _encode_all(tokenizer: Tokenizer, records: Sequence[ft_data.Record]) -> list[ft_data.EncodedExample]:
    return [ft_data.encode_record(tokenizer, record) for record in records]


def training_rows(tokenizer: Tokenizer, records: Sequence[ft_data.Record], config: FinetuneConfig,
                  data_seed: int) -> tuple[ft_data.PackedExamples, int]:
    """The records as packed training rows, each tagged with its privacy unit, and how many examples were
    dropped to bound a user's contribution (`max_examples_per_user`, chosen with `data_seed`)."""
    encoded = _encode_all(tokenizer, records)
    units = ft_data.units_for(records, config.privacy_unit)
    dropped = 0
    if config.privacy_unit == "user":
        keep, dropped = ft_data.bound_contributions(units, config.max_examples_per_user,
                                                    np.random.default_rng(data_seed))
        encoded = [encoded[i] for i in keep]
        units = [units[i] for i in keep]
    return ft_data.pack_examples(encoded, units, config.max_len, mode=config.packing), dropped


def held_out_rows(tokenizer: Tokenizer, path: Path, config: FinetuneConfig) -> ft_data.PackedExamples:
    """The held-out records of `path`, one row each (truncated to `max_len`)."""
    encoded = _encode_all(tokenizer, ft_data.read_records(path))
    return ft_data.pack_examples(encoded, list(range(len(encoded))), config.max_len, mode="truncate")


def _resolve_base_quantization(model_dir: Path, config: FinetuneConfig) -> None:
    """Settle, before the run writes anything, how the base is quantized, so the report and a resume record
    the base the adapters were really trained over.

    A checkpoint saved quantized (`models.quant`'s layout) is the base as it was saved: `config.quantize`,
    `quant_group_size` and `quantize_head` (true if its head or its embeddings are quantized) take its scheme
    (a different one asked for is refused: re-quantize the float checkpoint instead). A float checkpoint with
    `config.quantize` is checked on a meta-device skeleton (no weight read) for layer sizes the scheme cannot
    take, e.g. an int4 group size that does not divide them."""
    args = load_args(model_dir)
    if "quantization" in args.extra:
        saved = QuantConfig.from_params(args.extra["quantization"], str(model_dir / "params.json"))
        if config.method == "full":
            raise ConfigError(f"{model_dir} is a quantized checkpoint ({saved.mode}), whose weights full "
                              "fine-tuning cannot train: fine-tune the float checkpoint, or train LoRA adapters "
                              "(method='lora')")
        if config.quantize is not None and (config.quantize, config.quant_group_size) != (saved.mode,
                                                                                          saved.group_size):
            raise ConfigError(f"{model_dir} is already quantized ({saved.mode}"
                              + (f", group size {saved.group_size}" if saved.group_size else "")
                              + f"), not as quantize={config.quantize!r} asks: leave --quantize out to train "
                              "over the checkpoint as saved, or quantize the float checkpoint it was made from")
        saved_head = saved.output or saved.embeddings
        if config.quantize_head and not saved_head:
            raise ConfigError(f"{model_dir} was saved with a float output head and embeddings, not quantized as "
                              "quantize_head asks: leave --quantize-head out, or quantize the float checkpoint "
                              "it was made from")
        config.quantize, config.quant_group_size, config.quantize_head = saved.mode, saved.group_size, saved_head
        return
    quant = config.quant_config
    if quant is None:
        return
    with torch.device("meta"):
        quantize_model(Transformer(args), quant)


def load_base(model_dir: Path, config: FinetuneConfig, init_adapter: Path | None = None,
              lora_seed: int | None = None) -> nn.Module:
    """The float32 base checkpoint with the adapters to train: `init_adapter`'s, or fresh ones whose random
    initialisation `lora_seed` makes reproducible (a public choice); only the adapters train.

    With `config.quantize` the base's decoder linear layers are quantized first (`models.quant.quantize_model`,
    deterministic: a resumed run rebuilds the same base) and the adapters, float32, wrap the quantized layers.
    The adapter a run saves is an ordinary PEFT LoRA: it loads over the float (unquantized) base as well, but
    it was trained against the quantized one, so over the float base it meets weights that differ from those
    it was trained with by the quantization error."""
    saved_quantized = "quantization" in load_args(model_dir).extra  # loads as saved (its scheme is config's)
    model, _ = load_model(model_dir, dtype=torch.float32, quantize=None if saved_quantized else config.quant_config)
    if config.method == "full" and quantization_config(model) is not None:
        raise ConfigError(f"{model_dir} is a quantized checkpoint, whose weights full fine-tuning cannot train: "
                          "fine-tune the float checkpoint, or train LoRA adapters (method='lora')")
    if config.method == "lora":
        if init_adapter is not None:
            loaded = load_adapter(model, init_adapter, base_dtype=config.base_dtype)
            if loaded != config.lora:
                raise ConfigError(f"{init_adapter} has rank {loaded.rank}, alpha {loaded.alpha}, targets "
                                  f"{list(loaded.targets)}: train it further with the same LoRA settings")
            for name, param in model.named_parameters():
                param.requires_grad_("lora_" in name)
        else:  # the adapters' random initialisation, reproducible with a seed (a public choice)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_for(lora_seed, "finetune", "lora init"))
                add_lora(model, config.lora,
                         base_dtype=getattr(torch, config.base_dtype) if config.base_dtype else None)
    elif init_adapter is not None:
        raise ConfigError("a starting adapter needs method='lora'")
    return model


@contextlib.contextmanager
def _discarded_if_unstarted(new_out: Path | None, run_dir: Path, fresh: bool) -> Iterator[None]:
    """A fresh run that fails before training starts (a bad record, a LoRA target that matches nothing)
    leaves no folder behind that would need --resume: its setup is removed, and `new_out` (the output folder
    when this run created it) too if nothing else is in it. Nothing was trained or spent; the failure is
    raised as it was."""
    try:
        yield
    except BaseException:
        if fresh and run_dir.is_dir() and not any(p.name != SETUP_FILE for p in run_dir.iterdir()):
            shutil.rmtree(run_dir)
            if new_out is not None and not any(new_out.iterdir()):
                new_out.rmdir()
        raise


def finetune(model_dir: str | Path, data: str | Path, out: str | Path, config: FinetuneConfig, *,
             eval_data: str | Path | None = None, init_adapter: str | Path | None = None, resume: bool = False,
             on_step: StepCallback | None = None, on_phase: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune the checkpoint `model_dir` (a folder, or a llama.cpp .gguf file) on the JSONL `data` and write
    everything under `out` (see the module docstring). `init_adapter`: continue a LoRA adapter written by an
    earlier run (its ledger counts against this run's budget). `resume`: continue this `out`'s interrupted run
    from its last checkpoint."""
    phase = on_phase or (lambda text: None)
    base_name = os.fspath(model_dir)  # the adapter records the base as it was given
    model_dir, data_path, out = Path(model_dir), Path(data), Path(out)
    init = Path(init_adapter) if init_adapter is not None else None
    ledger = prior_ledger(init, config)  # refuses an exhausted budget before any record is read
    tokenizer = Tokenizer.from_model_dir(model_dir)
    _resolve_base_quantization(model_dir, config)
    run_dir = out / "run"
    if not resume and out.exists() and any(p.name in ("adapter", "model", "report") for p in out.iterdir()):
        raise ConfigError(f"{out} already holds a finished run; choose another --out")
    fresh = not resume and not (run_dir / SETUP_FILE).exists()
    new_out = not out.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)
    with _discarded_if_unstarted(out if new_out else None, run_dir, fresh and distributed.is_first()):
        # rank 0's, under torchrun
        setup = distributed.on_first(lambda: _setup(run_dir, config, data_path, resume))

        phase("reading and encoding the training records")
        records = ft_data.read_records(data_path)
        fmt = canary_audit.CanaryFormat(config.canary_format, length=config.canary_length)
        canaries = [canary_audit.Canary.from_dict(c) for c in setup["canaries"]]
        real_users = {str(r.user_id) for r in records if r.user_id is not None}
        records += ft_data.records_from_dicts(canary_audit.canary_records(canaries, real_users),
                                              source="canaries")
        packed, dropped = training_rows(tokenizer, records, config, setup["data_seed"])
        held = held_out_rows(tokenizer, Path(eval_data), config) if eval_data is not None else None
        n_units = int(packed.unit_of_row.max()) + 1 if packed.unit_of_row.numel() else 0
        if n_units == 0:
            raise ConfigError(f"{data_path} has no training example left")

        plan = plan_run(config, n_units, ledger)
        phase(f"{'DP-SGD' if config.private else 'training'}: {plan.steps} steps, "
              f"expected batch {plan.batch_size} "
              f"of {n_units} {config.privacy_unit}s" + (f", noise multiplier {plan.noise_multiplier:.4g}"
                                                       if config.private else ""))
        model = load_base(model_dir, config, init, lora_seed=config.seed)
        objective = LanguageModelingObjective(packed.inputs, packed.labels, example_of_row=packed.unit_of_row,
                                              trim_padding=True)
        train_config = TrainConfig(
            steps=plan.steps, batch_size=plan.batch_size, lr=config.learning_rate,
            warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
            micro_batch_size=config.micro_batch_size, private=config.private,
            max_grad_norm=config.max_grad_norm, noise_multiplier=plan.noise_multiplier,
            target_epsilon=config.epsilon if config.private else None,
            delta=config.delta if config.private else None,
            accountant=config.accountant, noise_seed=config.seed, data_seed=setup["data_seed"],
            checkpoint_every=config.checkpoint_every, eval_every=config.eval_every if held is not None else 0,
            label="finetune")
        evaluate = (lambda m: _mean_loss(m, held)) if held is not None else None
        trainer = Trainer(model, objective, n_units, train_config, run_dir=run_dir, ledger=ledger,
                          evaluate=evaluate, on_step=on_step, save_frozen=config.method == "full")
    result = trainer.fit()

    phase("writing the weights and the report")
    statement = None
    if config.private:
        assert config.delta is not None
        statement = PrivacyStatement.of(result.ledger, config.delta, config.accountant,
                                        target_epsilon=config.epsilon,
                                        dp_sgd=DpSgdEvent(plan.sample_rate or 1.0, plan.noise_multiplier or 0.0,
                                                          plan.steps))
    if not distributed.is_first():  # under torchrun rank 0 writes and measures; every rank holds these weights
        return FinetuneResult(out, out / ("adapter" if config.method == "lora" else "model"), plan, statement,
                              {}, {})
    privacy = privacy_record(result.ledger, config)
    if config.method == "lora":
        weights_dir = out / "adapter"
        save_adapter(model, weights_dir, config.lora, base_model_name_or_path=base_name,
                     extra_json={PRIVACY_FILE: privacy})
    else:
        weights_dir = out / "model"
        save_model(model, weights_dir, format="hf")  # whatever the base's format: GGUF is not written
        for path in tokenizer_files(model_dir):  # the tokenizer goes with the weights
            shutil.copy2(path, weights_dir / path.name)
        write_json_atomic(weights_dir / PRIVACY_FILE, privacy, SHAREABLE_MODE)

    phase("measuring: privacy bounds, canary exposure, held-out loss, membership attack")
    release = _release_report(config, plan, statement, fmt,
                              _exposures(model, tokenizer, canaries, fmt, config.seed) if canaries else None)
    holder = {
        "note": "for the data holder only: computed from private records, not covered by differential privacy",
        "records": len(records) - sum(c.repetitions for c in canaries),
        "canary_records": sum(c.repetitions for c in canaries),
        "rows": int(packed.inputs.shape[0]), "privacy_units": n_units,
        "examples_dropped_by_user_bound": dropped, "examples_truncated": int(packed.truncated),
        "eval_history": result.history,
    }
    if held is not None:
        loss = _mean_loss(model, held)
        holder["heldout_loss"] = loss
        holder["heldout_perplexity"] = math.exp(min(loss, 700.0))
        holder["membership_attack"] = _membership(model, packed, held, config.mia_examples,
                                                  numpy_rng(config.seed, "finetune", "membership"), config.delta)
    (out / "report" / "release").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report" / "release" / "report.json", release, SHAREABLE_MODE)
    (out / "report" / "holder-only").mkdir(parents=True, exist_ok=True)
    (out / "report" / "holder-only").chmod(0o700)
    write_json_atomic(out / "report" / "holder-only" / "evaluation.json", holder, HOLDER_MODE)
    return FinetuneResult(out, weights_dir, plan, statement, release, holder)


def _release_report(config: FinetuneConfig, plan: Plan, statement: PrivacyStatement | None,
                    fmt: canary_audit.CanaryFormat, exposures: dict[str, Any] | None) -> dict[str, Any]:
    """The shareable report: every field is DP (the ledger's), a function of the ledger, or a public input."""
    report: dict[str, Any] = {
        "format": "tramontane.finetune_report", "version": 1,
        "config": config.to_dict(), "plan": plan.to_dict(),
    }
    fields = {"config": "public: the hyper-parameters chosen by the data holder",
              "plan": "DP: the DP-SGD setting recorded in the ledger (q, sigma, steps); units = B / q"}
    if statement is not None:
        report["privacy"] = statement.to_dict()
        card = ledger_bounds(statement.events, statement.delta, num_values=fmt.space_size)
        report["bounds"] = card
        report["tan"] = {"eta": statement.eta, "total_amount_of_noise": statement.total_amount_of_noise,
                         "epsilon_tan": statement.epsilon_tan}
        fields.update({"privacy": "DP: the ledger under the RDP and PLD accountants",
                       "bounds": "a function of the ledger: membership-inference advantage and confidence "
                                 "bounds; reconstruction bound for a secret of the canary format's space",
                       "tan": "a function of the ledger: TAN heuristics (not a guarantee)"})
    if exposures is not None:
        report["canary_exposure"] = exposures
        fields["canary_exposure"] = ("DP (post-processing): the DP weights scored on synthetic canary texts "
                                     "inserted by the run")
    report["fields"] = fields
    return report
