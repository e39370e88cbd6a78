"""The fine-tuning task of the constant-TAN search (`tramontane plan search`): one trial is a short
`tramontane finetune` run (same data path, same model and adapters, same `training.Trainer` loop with AdamW
and its schedule) at the trial's batch, noise, steps and learning rate; its metric is the mean next-token loss
on a held-out JSONL (lower is better).

`FinetuneTask` is a picklable callable (`training.search.TrainFunction`): worker processes receive the paths
and the settings, read and encode the records once per process, and load the base checkpoint afresh for every
trial (a llama.cpp .gguf base too, its metadata parsed once per trial: `models.gguf.open_gguf`). Its settings
are a `FinetuneConfig`, so that the recommended private run is trained with exactly the settings searched:
`finetune_arguments` writes them back as `tramontane finetune` options.

NOT PRIVATE: the trials train on the records without any accounting (`training.search`). Give a public or
proxy JSONL, or keep the search's output with the data holder. The trials insert no canaries: a private run
with `--canaries` samples from a few more units than the search planned for.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from tramontane.errors import ConfigError, TramontaneWarning
from tramontane.finetune import data as ft_data
from tramontane.finetune.run import FinetuneConfig, held_out_rows, load_base, row_losses, training_rows
from tramontane.models.gguf import is_gguf
from tramontane.seeding import seed_for
from tramontane.tokenizer import Tokenizer
from tramontane.training.objectives import LanguageModelingObjective
from tramontane.training.search import TrialConfig
from tramontane.training.trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)

METRIC = "held-out loss"
TRIAL_LABEL = "tan search trial (not private)"


@dataclass(frozen=True)
class _Examples:
    train: ft_data.PackedExamples
    held: ft_data.PackedExamples

    @property
    def units(self) -> int:
        return int(self.train.unit_of_row.max()) + 1


@dataclass(frozen=True)
class FinetuneTask:
    """Fine-tune `model_dir` on the JSONL `data`, score on the JSONL `eval_data` (see the module docstring).

    Args:
        model_dir: the base checkpoint with its tokenizer: a consolidated or Hugging Face folder, or a
            llama.cpp .gguf file with the tokenizer file beside it.
        data: the training records (chats or texts), as `tramontane finetune --data` reads them.
        eval_data: the held-out records whose mean token loss is the metric.
        config: the fine-tuning settings (method, LoRA, privacy unit, clipping, rows, micro-batch, warm-up,
            weight decay, seed of the user-level bound). Its privacy fields, steps, batch and learning rate
            are not read: each trial brings its own.
    """

    model_dir: str
    data: str
    eval_data: str
    config: FinetuneConfig

    def __post_init__(self) -> None:
        for name in ("model_dir", "data", "eval_data"):
            object.__setattr__(self, name, str(getattr(self, name)))
        if not (Path(self.model_dir).is_dir() or is_gguf(self.model_dir)):
            raise ConfigError(f"{self.model_dir} is not a checkpoint folder or a GGUF file: give the base model's "
                              "folder, or its llama.cpp .gguf file")
        for name in ("data", "eval_data"):
            if not Path(getattr(self, name)).is_file():
                raise ConfigError(f"{getattr(self, name)} is not a file: give a JSONL of records")

    def key(self) -> str:
        """What the task reads and how: equal keys, equal rows."""
        return json.dumps([self.model_dir, self.data, self.eval_data, self.config.to_dict()], sort_keys=True)

    def dataset_size(self) -> int:
        """The number of privacy units the private run samples from (examples, or users)."""
        return _examples(self).units

    def __call__(self, trial: TrialConfig) -> float:
        """Train once at the trial's setting and return the held-out loss (NaN when training diverged)."""
        examples = _examples(self)
        if trial.dataset_size != examples.units:
            raise ConfigError(f"the trial was planned for {trial.dataset_size} privacy units but {self.data} has "
                              f"{examples.units}: plan with FinetuneTask.dataset_size()")
        c = self.config
        model = load_base(Path(self.model_dir), c, lora_seed=trial.seed)
        objective = LanguageModelingObjective(examples.train.inputs, examples.train.labels,
                                              example_of_row=examples.train.unit_of_row, trim_padding=True)
        # A private run in mechanics (Poisson sampling, clipping, noise), not in fact: its sigma is far behind
        # the privacy wall and its ledger is dropped. delta only feeds the trainer's end-of-run accounting.
        train_config = TrainConfig(
            steps=trial.steps, batch_size=trial.batch_size, lr=trial.lr, warmup_steps=c.warmup_steps,
            weight_decay=c.weight_decay, micro_batch_size=c.micro_batch_size, private=True,
            max_grad_norm=c.max_grad_norm, noise_multiplier=trial.noise_multiplier,
            delta=c.delta if c.delta is not None else 1.0 / (examples.units + 1),
            accountant=c.accountant, noise_seed=trial.seed, label=TRIAL_LABEL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TramontaneWarning)  # the seeded noise: known, and not private anyway
            Trainer(model, objective, examples.units, train_config).fit()
        sums, counts = row_losses(model, examples.held.inputs, examples.held.labels)
        loss = float(sums.sum() / max(counts.sum(), 1))
        return loss if math.isfinite(loss) else math.nan


_CACHE: dict[str, _Examples] = {}  # per process: a worker reads and encodes the records once


def _examples(task: FinetuneTask) -> _Examples:
    """The task's packed training and held-out rows, read once per process."""
    key = task.key()
    if key not in _CACHE:
        _CACHE.clear()  # one task at a time: the rows of an earlier one are not kept
        _CACHE[key] = _read_examples(task)
    return _CACHE[key]


def _read_examples(task: FinetuneTask) -> _Examples:
    c = task.config
    tokenizer = Tokenizer.from_model_dir(task.model_dir)
    train, _ = training_rows(tokenizer, ft_data.read_records(Path(task.data)), c,
                             seed_for(c.seed, "finetune", "data"))
    return _Examples(train, held_out_rows(tokenizer, Path(task.eval_data), c))


def finetune_arguments(config: FinetuneConfig) -> list[str]:
    """The `tramontane finetune` options that reproduce the searched settings (not the privacy ones)."""
    args = ["--method", config.method, "--privacy-unit", config.privacy_unit,
            "--max-grad-norm", f"{config.max_grad_norm:g}", "--max-len", str(config.max_len),
            "--packing", config.packing, "--micro-batch-size", str(config.micro_batch_size)]
    if config.method == "lora":
        args += ["--lora-rank", str(config.lora.rank), "--lora-alpha", f"{config.lora.alpha:g}",
                 "--lora-targets", ",".join(config.lora.targets)]
        if config.lora.dropout:
            args += ["--lora-dropout", f"{config.lora.dropout:g}"]
        if config.base_dtype:
            args += ["--base-dtype", config.base_dtype]
        if config.quantize:
            args += ["--quantize", config.quantize]
            if config.quant_group_size is not None:
                args += ["--quant-group-size", str(config.quant_group_size)]
            if config.quantize_head:
                args += ["--quantize-head"]
    if config.privacy_unit == "user":
        args += ["--max-examples-per-user", str(config.max_examples_per_user)]
    return args


__all__ = ["METRIC", "FinetuneTask", "finetune_arguments"]
