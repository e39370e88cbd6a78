"""Private fine-tuning, offline and end to end: a small Mistral pre-trained here on public Python source, DP LoRA
fine-tuning on private source at several epsilons (held-out perplexity, canary exposure), and the DP LoRA step's
throughput and peak memory against non-private LoRA and Opacus on the same model and batches.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/finetune.py [--workdir /tmp/tramontane-finetune-bench]
        [--quick] [--steps 80] [--epsilons 1 3 8] [--repeats 5] [--skip-sweep] [--skip-throughput]

No weights can be downloaded, so the "pretrained" model is built here:

1. Corpus: the top-level `*.py` files of this Python's standard library (`sysconfig.get_paths()["stdlib"]`,
   sorted). Modules whose names (leading underscores aside) start with a-l are public; the rest are private,
   every `--heldout-every`-th private file held out. Each file is cut on line boundaries into chunks of about
   `--chunk-tokens` tokens (mistral_common's v3 sentencepiece tokenizer), written as JSONL records
   {"text", "user_id": the file}, so `--privacy-unit user` works too.
2. Pre-training, without DP, of a small Mistral (tied embeddings over the 32k vocabulary, grouped-query
   attention) on the public chunks with AdamW (`training.Trainer`, `private=False`), saved with its tokenizer
   under `--workdir` and reused when the same settings ask for it again. Its held-out perplexity on the
   private held-out chunks is the starting point.
3. The sweep: `finetune.run.finetune` (LoRA) on the private training chunks with canaries inserted once and 10
   times, at each epsilon and without DP, with the same steps, batch and seed (so the same canary secrets).
   Held-out perplexity from the run's holder-only evaluation; exposure per repetition count from the release
   report's `canary_exposure` summary, next to the never-inserted reference canaries (repetitions 0).
4. Throughput and peak memory on the pre-trained model with the same LoRA adapters and the same fixed batches
   of B sequences of T tokens: non-private LoRA (loss.backward + AdamW, the anchor of the DP cost), tramontane's
   DPEngine (record / backward / add_noise_and_set_grads + AdamW), and Opacus' PrivacyEngine.make_private on
   the same LoRA model in each grad_sample_mode that runs on it (hooks, ghost, functorch, ew); Opacus' fastest
   mode is the anchor of the comparison. Timing: all modes in one subprocess, rounds interleaved (rotating
   order) so that background load falls on all alike; each round times a few steps per mode after a warm-up;
   samples/s = B / median step time over the rounds. Memory: each mode alone in a subprocess: the RSS after
   model, adapters, optimizer, Opacus wrapper and batches exist is the base; the kernel's peak-RSS mark is then
   reset (writing 5 to /proc/self/clear_refs) and read back (VmHWM) after the timed steps: the peak above the
   base is the training step's own memory.

Prints phase lines on stderr, tables on stdout, and as the last stdout line one JSON object: the ratios (DP /
anchor measured in the same run) and the per-epsilon held-out perplexity and exposures.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START = time.monotonic()
MODES = ("nonprivate", "tramontane", "opacus_hooks", "opacus_ghost", "opacus_functorch", "opacus_ew")
OPACUS_MODES = tuple(m for m in MODES if m.startswith("opacus_"))
TOKENIZER_FILE = "tokenizer.model.v3"
BASE_MARKER = "pretrain.json"  # written last: a base folder without it is incomplete
# Part of the cache key: change it whenever `pretrain` trains differently for the same settings.
PRETRAIN_RECIPE = "init N(0, 0.02); AdamW betas (0.9, 0.95), wd 0.01; 10% warm-up, linear decay to 0.1; flat CE"


def log(message: str) -> None:
    elapsed = time.monotonic() - START
    print(f"[{int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {message}", file=sys.stderr, flush=True)


@dataclass
class Settings:
    """Every size of one benchmark run (`FULL`, or `QUICK` for a smoke run); CLI options override some."""

    # corpus
    chunk_tokens: int = 64
    heldout_every: int = 4  # every k-th private file is held out
    heldout_chunks: int = 256  # at most this many held-out chunks (evenly spaced): bounds evaluation time
    train_chunks: int = 1000  # at most this many private training chunks (whole files, in a seeded order; 0: all)
    max_files: int = 0  # 0: every file; else the first files of each side (quick runs)
    # the model
    dim: int = 192
    n_layers: int = 4
    head_dim: int = 32
    n_heads: int = 6
    n_kv_heads: int = 2
    hidden_dim: int = 512
    # pre-training (no DP)
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_lr: float = 5e-3
    # fine-tuning sweep
    steps: int = 100
    batch_size: int = 32  # expected Poisson batch (DP) / fixed batch (non-private)
    micro_batch_size: int = 16
    lr: float = 2e-3
    nonprivate_steps: int | None = None  # not None: a second non-private run with these steps ...
    nonprivate_lr: float | None = 1e-2  # ... and / or this lr
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    delta: float = 1e-5
    privacy_unit: str = "example"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attention",)
    canaries: int = 10  # inserted canaries, split over the repetition counts; as many references again
    canary_repetitions: tuple[int, ...] = (1, 10)
    canary_length: int = 4  # digits: |R| = 10 ** length candidate secrets, all scored (exact ranks)
    mia_examples: int = 128
    seed: int = 0
    # throughput
    tp_batch: int = 16
    tp_seq: int = 128
    repeats: int = 5  # timed rounds per mode
    tp_steps: int = 2  # steps per round
    warmup: int = 1
    threads: int = 2

    @property
    def model_params(self) -> dict[str, Any]:
        return {"dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "hidden_dim": self.hidden_dim}


FULL = Settings()
QUICK = Settings(nonprivate_lr=None, chunk_tokens=48, heldout_chunks=24, max_files=6, dim=64, n_layers=2,
                 head_dim=16, n_heads=4, n_kv_heads=2, hidden_dim=128, pretrain_steps=12, pretrain_batch=8, steps=4,
                 batch_size=8, micro_batch_size=8, canaries=2, canary_length=2, mia_examples=16, tp_batch=4, tp_seq=48,
                 repeats=2, tp_steps=1)


# -- 1. corpus ---------------------------------------------------------------------------------------------

def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(public, private) top-level stdlib modules, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    public = [f for f in files if f.stem.lstrip("_")[:1].lower() <= "l"]
    private = [f for f in files if f.stem.lstrip("_")[:1].lower() > "l"]
    return public, private


def chunk_text(text: str, tokenizer: Any, chunk_tokens: int) -> list[str]:
    """Consecutive line groups of about `chunk_tokens` tokens (a longer line is a chunk of its own)."""
    chunks, lines, count = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(tokenizer.encode(line, bos=False))
        if lines and count + n > chunk_tokens:
            chunks.append("".join(lines))
            lines, count = [], 0
        lines.append(line)
        count += n
    if lines:
        chunks.append("".join(lines))
    return [c for c in chunks if c.strip()]


def file_records(files: list[Path], tokenizer: Any, chunk_tokens: int) -> list[dict[str, str]]:
    records = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        records += [{"text": c, "user_id": f"stdlib/{path.name}"} for c in chunk_text(text, tokenizer, chunk_tokens)]
    return records


def build_corpus(s: Settings, workdir: Path, tokenizer: Any) -> dict[str, Any]:
    """Public records (in memory) and the private train / held-out JSONL files."""
    public_files, private_files = stdlib_files()
    if s.max_files:
        public_files, private_files = public_files[:s.max_files], private_files[:s.max_files + 2]
    held_files = private_files[::s.heldout_every]
    train_files = [f for f in private_files if f not in held_files]
    import numpy

    public = file_records(public_files, tokenizer, s.chunk_tokens)
    train = file_records(train_files, tokenizer, s.chunk_tokens)
    if s.train_chunks and len(train) > s.train_chunks:  # whole files in a seeded order, the last one cut
        order = numpy.random.default_rng(s.seed).permutation(len(train_files))
        by_file: dict[str, list[dict[str, str]]] = {}
        for r in train:
            by_file.setdefault(r["user_id"], []).append(r)
        picked: list[dict[str, str]] = []
        for i in order:
            picked += by_file.get(f"stdlib/{train_files[i].name}", [])
            if len(picked) >= s.train_chunks:
                break
        train = picked[:s.train_chunks]
    held = file_records(held_files, tokenizer, s.chunk_tokens)
    if len(held) > s.heldout_chunks:  # evenly spaced over the held-out files
        held = [held[round(i * (len(held) - 1) / (s.heldout_chunks - 1))] for i in range(s.heldout_chunks)]
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {"train": data / "private_train.jsonl", "heldout": data / "private_heldout.jsonl"}
    for name, records in (("train", train), ("heldout", held)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    digest = hashlib.sha256(json.dumps([[f.name, f.stat().st_size] for f in public_files]).encode()).hexdigest()
    return {"public": public, "train_path": paths["train"], "heldout_path": paths["heldout"],
            "public_files": len(public_files), "train_files": len({r["user_id"] for r in train}),
            "heldout_files": len(held_files),
            "public_chunks": len(public), "train_chunks": len(train), "heldout_chunks": len(held),
            "public_digest": digest, "stdlib": sysconfig.get_paths()["stdlib"]}


# -- 2. pre-training ---------------------------------------------------------------------------------------

def pack(tokenizer: Any, records: list[Any], max_len: int) -> Any:
    """Rows exactly as `finetune` builds them for plain-text records (BOS + text + EOS, truncated)."""
    from tramontane.finetune import data as ft_data

    encoded = [ft_data.encode_record(tokenizer, r) for r in records]
    return ft_data.pack_examples(encoded, list(range(len(encoded))), max_len, mode="truncate")


def heldout_perplexity(model: Any, tokenizer: Any, heldout_path: Path, max_len: int) -> float:
    """exp(mean token loss) on the held-out rows, computed as `finetune`'s holder-only evaluation computes it."""
    from tramontane.finetune import data as ft_data
    from tramontane.finetune.run import row_losses

    held = pack(tokenizer, ft_data.read_records(heldout_path), max_len)
    sums, counts = row_losses(model, held.inputs, held.labels)
    return math.exp(float(sums.sum() / max(counts.sum(), 1)))


def flat_language_modeling() -> type:
    """`LanguageModelingObjective` with the same per-row losses computed from the logits flattened to [B T, V].
    The library's cross_entropy over the [B, V, T] view runs a strided log-softmax, about 2.8 times slower on CPU
    at this vocabulary (32768); pre-training is no part of what is measured, so it takes the faster form."""
    import torch
    import torch.nn.functional as F

    from tramontane.training.objectives import IGNORE_INDEX, LanguageModelingObjective

    class FlatLanguageModeling(LanguageModelingObjective):
        def losses(self, model: Any, batch: torch.Tensor) -> torch.Tensor:
            inputs, labels = self.inputs[batch], self.labels[batch]
            scored_at = (labels != IGNORE_INDEX).any(0).nonzero()
            width = int(scored_at.max()) + 1 if scored_at.numel() else 1
            inputs, labels = inputs[:, :width], labels[:, :width]  # trim the padding after the last target
            logits = model(inputs).float()
            token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
            scored = (labels != IGNORE_INDEX).float()
            return token_loss.sum(-1) / scored.sum(-1).clamp(min=1)

    return FlatLanguageModeling


def pretrain(s: Settings, workdir: Path, corpus: dict[str, Any], tokenizer: Any, tokenizer_file: Path) -> Path:
    """The base checkpoint (model + tokenizer) for these settings: loaded from the cache, or trained now."""
    import torch
    from torch import nn

    from tramontane.finetune import data as ft_data
    from tramontane.models import ModelArgs, Transformer
    from tramontane.models.checkpoint import save_model
    from tramontane.training.trainer import TrainConfig, Trainer

    key = {"model": s.model_params, "vocab": tokenizer.vocab_size, "chunk_tokens": s.chunk_tokens,
           "steps": s.pretrain_steps, "batch": s.pretrain_batch, "lr": s.pretrain_lr, "seed": s.seed,
           "corpus": corpus["public_digest"], "max_files": s.max_files, "recipe": PRETRAIN_RECIPE}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    model_dir = workdir / f"base-{digest}"
    if (model_dir / BASE_MARKER).exists():
        log(f"pre-training: cached base model {model_dir}")
        return model_dir

    torch.manual_seed(s.seed)
    args = ModelArgs(**s.model_params, norm_eps=1e-5, vocab_size=tokenizer.vocab_size, tied_embeddings=True)
    model = Transformer(args)
    for module in model.modules():  # GPT-2's init: N(0, 1) embeddings would give huge tied logits
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
    rows = pack(tokenizer, ft_data.records_from_dicts(corpus["public"], source="public"), s.chunk_tokens + 16)
    objective = flat_language_modeling()(rows.inputs, rows.labels, trim_padding=True)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pre-training: {n_params / 1e6:.2f}M parameters, {s.pretrain_steps} steps of {s.pretrain_batch} "
        f"public chunks ({rows.inputs.shape[0]} chunks, {int((rows.labels >= 0).sum())} tokens), AdamW lr "
        f"{s.pretrain_lr:g}, no DP")
    every = max(1, s.pretrain_steps // 10)

    def on_step(step: int, total: int, info: dict[str, float]) -> None:
        if step % every == 0 or step == total:
            log(f"  pre-training step {step}/{total}: train loss {info['train_loss']:.3f}")

    config = TrainConfig(steps=s.pretrain_steps, batch_size=s.pretrain_batch, lr=s.pretrain_lr,
                         warmup_steps=max(1, s.pretrain_steps // 10), weight_decay=0.01, betas=(0.9, 0.95),
                         private=False,
                         micro_batch_size=s.pretrain_batch, data_seed=s.seed, label="pretrain")
    started = time.monotonic()
    Trainer(model, objective, rows.inputs.shape[0], config, on_step=on_step).fit()
    seconds = time.monotonic() - started
    save_model(model, model_dir, overwrite=True)
    shutil.copy(tokenizer_file, model_dir / TOKENIZER_FILE)
    (model_dir / BASE_MARKER).write_text(json.dumps({**key, "parameters": n_params, "seconds": seconds,
                                                     "public_chunks": rows.inputs.shape[0]}, indent=1))
    log(f"pre-training: done in {seconds:.0f} s, saved {model_dir}")
    return model_dir


# -- 3. the sweep ------------------------------------------------------------------------------------------

def sweep(s: Settings, workdir: Path, model_dir: Path, corpus: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from tramontane.finetune.lora import LoraConfig
    from tramontane.finetune.run import FinetuneConfig, finetune

    results: dict[str, dict[str, Any]] = {}
    # every run at the same steps and lr; then, if asked, a non-private run with more steps or a larger lr (to
    # check that the canary test can detect memorisation at all when the first one memorises little)
    runs = [(f"eps{e:g}", e, s.steps, s.lr) for e in s.epsilons] + [("nonprivate", None, s.steps, s.lr)]
    raised = (s.nonprivate_steps or s.steps, s.nonprivate_lr or s.lr)
    if raised != (s.steps, s.lr):
        runs.append((f"nonprivate_{raised[0]}x{raised[1]:g}", None, *raised))
    for label, eps, steps, lr in runs:
        private = eps is not None
        config = FinetuneConfig(
            method="lora", lora=LoraConfig(rank=s.lora_rank, alpha=s.lora_alpha, targets=s.lora_targets),
            private=private, epsilon=eps, delta=s.delta if private else None, privacy_unit=s.privacy_unit,
            steps=steps, batch_size=s.batch_size, lr=lr, max_len=s.chunk_tokens + 16,
            micro_batch_size=s.micro_batch_size, checkpoint_every=steps, seed=s.seed, canaries=s.canaries,
            canary_repetitions=s.canary_repetitions, canary_length=s.canary_length, mia_examples=s.mia_examples)
        out = workdir / "sweep" / label
        if out.exists():
            shutil.rmtree(out)
        log(f"fine-tuning {label}: {steps} steps, lr {lr:g}")
        every = max(1, steps // 5)

        def on_step(step: int, total: int, info: dict[str, float], label: str = label, every: int = every) -> None:
            if step % every == 0 or step == total:
                log(f"  {label} step {step}/{total}: batch {info['batch']:.0f}")

        started = time.monotonic()
        with warnings.catch_warnings():  # the fixed seed's "predictable noise" warning: deliberate here
            warnings.filterwarnings("ignore", message=".*seed.*")
            result = finetune(model_dir, corpus["train_path"], out, config, eval_data=corpus["heldout_path"],
                              on_step=on_step, on_phase=lambda text, label=label: log(f"  {label}: {text}"))
        seconds = time.monotonic() - started
        exposure = result.release.get("canary_exposure", {})
        summary = exposure.get("summary", {})
        by_rep = {k: {"median": v["median"], "max": v["max"], "canaries": v["canaries"]}
                  for k, v in summary.get("by_repetitions", {}).items()}
        row: dict[str, Any] = {
            "epsilon": eps, "steps": result.plan.steps, "batch_size": result.plan.batch_size,
            "sample_rate": result.plan.sample_rate, "noise_multiplier": result.plan.noise_multiplier,
            "units": result.plan.units, "lr": lr,
            "epsilon_rdp": result.statement.epsilon_rdp if result.statement else None,
            "heldout_perplexity": result.holder.get("heldout_perplexity"),
            "mia_auc": result.holder.get("membership_attack", {}).get("auc"),
            "exposure": by_rep, "max_exposure": summary.get("max_exposure"),
            "exposure_method": summary.get("methods"), "seconds": seconds,
            "examples_truncated": result.holder.get("examples_truncated"),
        }
        results[label] = row
        med = {k: round(v["median"], 2) for k, v in by_rep.items()}
        log(f"fine-tuning {label}: done in {seconds:.0f} s; held-out perplexity {row['heldout_perplexity']:.2f}, "
            f"median exposure by repetitions {med}")
    return results


# -- 4. throughput and memory ------------------------------------------------------------------------------

def make_batches(s: Settings, tokenizer: Any, train_path: Path, out: Path, count: int) -> Path:
    """`count` fixed batches [B, T + 1] of consecutive private training tokens."""
    import torch

    stream: list[int] = []
    need = count * s.tp_batch * (s.tp_seq + 1)
    for line in train_path.read_text().splitlines():
        stream += tokenizer.encode(json.loads(line)["text"], bos=True, eos=True)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise SystemExit(f"not enough private tokens for {count} batches of {s.tp_batch} x {s.tp_seq}")
    batches = torch.tensor(stream[:need]).view(count, s.tp_batch, s.tp_seq + 1)
    torch.save(batches, out)
    return out


def build_mode(mode: str, s: Settings, model_dir: Path, batches: Any) -> tuple[Any, str]:
    """The pre-trained model with fresh LoRA adapters trained in `mode`: returns (step(batch) function, note)."""
    import torch
    import torch.nn.functional as F

    from tramontane.finetune.lora import LoraConfig, add_lora
    from tramontane.models.checkpoint import load_model

    torch.manual_seed(s.seed)
    model, args = load_model(model_dir, dtype=torch.float32)
    add_lora(model, LoraConfig(rank=s.lora_rank, alpha=s.lora_alpha, targets=s.lora_targets))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    vocab, b, t = args.vocab_size, s.tp_batch, s.tp_seq
    note = f"{sum(p.numel() for p in params)} trainable parameters"

    if mode == "nonprivate":
        def step(batch: torch.Tensor) -> None:
            logits = model(batch[:, :-1])
            F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif mode == "tramontane":
        from tramontane.dp import DPEngine

        engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
        note += "; rules: " + ", ".join(sorted(set(engine.describe().values())))

        def step(batch: torch.Tensor) -> None:
            with engine.record():
                logits = model(batch[:, :-1])
                losses = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1), reduction="none")
                engine.backward(losses.view(b, t).mean(1))  # one loss per sequence
            engine.add_noise_and_set_grads(expected_batch_size=b)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        from _opacus import make_private

        first = batches[0]
        wrapped, dp_optimizer, criterion, grad_sample_mode = make_private(
            model, optimizer, first[:, :-1], first[:, 1:], b, mode)

        def step(batch: torch.Tensor) -> None:
            logits = wrapped(batch[:, :-1])
            flat, targets = logits.reshape(-1, vocab), batch[:, 1:].reshape(-1)
            # mean over all B T tokens: Opacus scales by B, so each sequence's gradient is its mean token loss's
            loss = criterion(flat, targets, shape=logits.shape) if grad_sample_mode == "ghost" \
                else criterion(flat, targets)
            loss.backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)

    return step, note


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _hwm_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_worker(mode: str, s: Settings, model_dir: Path, batches_path: Path) -> dict[str, Any]:
    """Peak RSS of `mode`'s training steps alone in this process, above the RSS once everything is built."""
    import torch

    torch.set_num_threads(s.threads)
    batches = torch.load(batches_path)
    step, note = build_mode(mode, s, model_dir, batches)
    base, process_peak = _rss_kib(), _hwm_kib()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "VmHWM (not resettable: includes set-up)"
    for i in range(s.warmup + s.tp_steps):
        step(batches[i % len(batches)])
    peak = _hwm_kib()
    return {"peak_mib": max(peak, process_peak) / 1024, "peak_above_base_mib": (peak - base) / 1024,
            "base_mib": base / 1024, "method": method, "note": note}


def timing_worker(modes: list[str], s: Settings, model_dir: Path, batches_path: Path) -> dict[str, Any]:
    """Every mode in this one process; rounds interleaved with a rotating order. Per mode: seconds per step of
    each round (the mean of its `tp_steps` steps), or the error that stopped it."""
    import torch

    torch.set_num_threads(s.threads)
    batches = torch.load(batches_path)
    steps, notes, errors = {}, {}, {}
    for mode in modes:
        try:
            steps[mode], notes[mode] = build_mode(mode, s, model_dir, batches)
            for i in range(s.warmup):
                steps[mode](batches[i % len(batches)])
        except Exception as exc:  # noqa: BLE001 - a mode that does not run on this model is reported, not fatal
            errors[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            steps.pop(mode, None)
        print(f"built {mode}", file=sys.stderr, flush=True)
    alive = [m for m in modes if m in steps]
    times: dict[str, list[float]] = {m: [] for m in alive}
    k = s.warmup
    for r in range(s.repeats):
        for mode in alive[r % len(alive):] + alive[:r % len(alive)]:
            started = time.perf_counter()
            for j in range(s.tp_steps):
                steps[mode](batches[(k + j) % len(batches)])
            times[mode].append((time.perf_counter() - started) / s.tp_steps)
        k += s.tp_steps
        print(f"round {r + 1}/{s.repeats}", file=sys.stderr, flush=True)
    return {"times": times, "notes": notes, "errors": errors}


def run_worker(kind: str, modes: list[str], s: Settings, model_dir: Path, batches_path: Path) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "PYTHONWARNINGS": "ignore"}
    spec = json.dumps({"kind": kind, "modes": modes, "settings": dataclasses.asdict(s),
                       "model_dir": str(model_dir), "batches": str(batches_path)})
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        log(f"{kind} worker {modes} FAILED:\n{proc.stderr[-3000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def throughput(s: Settings, workdir: Path, model_dir: Path, tokenizer: Any, train_path: Path,
               modes: list[str]) -> dict[str, Any]:
    count = s.warmup + s.repeats * s.tp_steps
    batches_path = make_batches(s, tokenizer, train_path, workdir / "throughput_batches.pt", count)
    log(f"throughput: {len(modes)} modes interleaved in one process, {s.repeats} rounds of {s.tp_steps} steps "
        f"after {s.warmup} warm-up step(s), batches of {s.tp_batch} x {s.tp_seq} tokens, {s.threads} threads")
    timing = run_worker("timing", modes, s, model_dir, batches_path) or {"times": {}, "notes": {}, "errors": {}}
    rows: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if mode in timing["errors"]:
            log(f"  {mode}: does not run on this model: {timing['errors'][mode]}")
            rows[mode] = {"error": timing["errors"][mode]}
            continue
        if mode not in timing["times"]:
            continue
        log(f"  memory: {mode} alone in a subprocess")
        memory = run_worker("memory", [mode], s, model_dir, batches_path) or {}
        per_step = timing["times"][mode]
        rows[mode] = {"samples_per_s": s.tp_batch / statistics.median(per_step),
                      "samples_per_s_best": s.tp_batch / min(per_step),
                      "step_s_median": statistics.median(per_step), **memory,
                      "note": timing["notes"].get(mode, "")}
    return rows


# -- report ------------------------------------------------------------------------------------------------

def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def report(s: Settings, args: argparse.Namespace, corpus: dict[str, Any], base_ppl: float | None,
           runs: dict[str, dict[str, Any]], tp: dict[str, dict[str, Any]], loads: tuple[float, float]) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, {s.threads} threads, python {platform.python_version()}; "
          f"load average {loads[0]:.1f} at start, {loads[1]:.1f} at end; wall {time.monotonic() - START:.0f} s")
    print(f"corpus: {corpus['stdlib']}/*.py: public {corpus['public_files']} files / {corpus['public_chunks']} "
          f"chunks; private train {corpus['train_files']} files / {corpus['train_chunks']} chunks; held-out "
          f"{corpus['heldout_files']} files / {corpus['heldout_chunks']} chunks of ~{s.chunk_tokens} tokens")
    print(f"model: dim {s.dim}, {s.n_layers} layers, {s.n_heads} heads / {s.n_kv_heads} kv, hidden "
          f"{s.hidden_dim}, tied 32k embeddings; pre-trained {s.pretrain_steps} steps x {s.pretrain_batch}")
    if base_ppl is not None:
        print(f"held-out perplexity of the pre-trained model (before fine-tuning): {base_ppl:.2f}")
    if runs:
        reps = sorted({k for r in runs.values() for k in r["exposure"]}, key=int)
        print(f"\nfine-tuning: LoRA rank {s.lora_rank} on {','.join(s.lora_targets)}, {s.privacy_unit}-level, "
              f"delta {s.delta:g}, canaries of {s.canary_length} digits (max exposure "
              f"{s.canary_length * math.log2(10):.1f} bits); exposure medians (max) by repetitions, 0 = never "
              "inserted")
        head = f"{'run':<20}{'steps':>6}{'lr':>8}{'sigma':>8}{'q':>8}{'eps(rdp)':>9}{'ppl':>8}{'MIA auc':>8}"
        head += "".join(f"{'exp x' + k:>14}" for k in reps) + f"{'time s':>8}"
        print(head)
        for label, r in runs.items():
            line = (f"{label:<20}{r['steps']:>6}{r['lr']:>8.0e}{_fmt(r['noise_multiplier'], '8.3f'):>8}"
                    f"{_fmt(r['sample_rate'], '8.4f'):>8}{_fmt(r['epsilon_rdp'], '9.2f'):>9}"
                    f"{_fmt(r['heldout_perplexity'], '8.2f'):>8}{_fmt(r['mia_auc'], '8.3f'):>8}")
            for k in reps:
                e = r["exposure"].get(k)
                line += f"{e['median']:>8.2f} ({e['max']:.1f})" if e else f"{'-':>14}"
            print(line + f"{r['seconds']:>8.0f}")
    if tp:
        anchor = tp.get("nonprivate", {})
        print(f"\nthroughput and peak memory: LoRA, batches of {s.tp_batch} x {s.tp_seq} tokens, median of "
              f"{s.repeats} rounds of {s.tp_steps} steps; memory = peak RSS above the RSS after set-up")
        print(f"{'mode':<18}{'samples/s':>10}{'vs np':>7}{'best/s':>9}{'peak MiB':>10}{'above base':>11}{'vs np':>7}")
        for mode, r in tp.items():
            if "error" in r:
                print(f"{mode:<18}  does not run: {r['error'][:100]}")
                continue
            sp = r["samples_per_s"] / anchor["samples_per_s"] if anchor.get("samples_per_s") else float("nan")
            mem = r.get("peak_above_base_mib")
            mr = mem / anchor["peak_above_base_mib"] if mem and anchor.get("peak_above_base_mib") else float("nan")
            print(f"{mode:<18}{r['samples_per_s']:>10.2f}{sp:>7.2f}{r['samples_per_s_best']:>9.2f}"
                  f"{_fmt(r.get('peak_mib'), '10.0f'):>10}{_fmt(mem, '11.0f'):>11}{mr:>7.2f}")
        for mode, r in tp.items():
            if r.get("note"):
                print(f"  {mode}: {r['note']}")


def ratios(tp: dict[str, dict[str, Any]]) -> dict[str, Any]:
    dp, np_ = tp.get("tramontane", {}), tp.get("nonprivate", {})
    opacus = {m: r for m, r in tp.items() if m in OPACUS_MODES and "samples_per_s" in r}
    best = max(opacus, key=lambda m: opacus[m]["samples_per_s"]) if opacus else None

    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    out = {
        "dp_vs_nonprivate": ratio(dp.get("samples_per_s"), np_.get("samples_per_s")),
        "dp_vs_opacus_best": ratio(dp.get("samples_per_s"), opacus[best]["samples_per_s"] if best else None),
        "opacus_best_mode": best,
        "memory_above_base_vs_nonprivate": ratio(dp.get("peak_above_base_mib"), np_.get("peak_above_base_mib")),
        "memory_vs_nonprivate": ratio(dp.get("peak_mib"), np_.get("peak_mib")),
        "dp_vs_nonprivate_best_step": ratio(dp.get("samples_per_s_best"), np_.get("samples_per_s_best")),
    }
    out["goals"] = {"dp_vs_nonprivate>=0.85": None if out["dp_vs_nonprivate"] is None
                    else out["dp_vs_nonprivate"] >= 0.85,
                    "dp_vs_opacus_best>=1.5": None if out["dp_vs_opacus_best"] is None
                    else out["dp_vs_opacus_best"] >= 1.5,
                    "memory_above_base_vs_nonprivate<=1.2": None if out["memory_above_base_vs_nonprivate"] is None
                    else out["memory_above_base_vs_nonprivate"] <= 1.2}
    return out


# -- main --------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tramontane-finetune-bench"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a minute or two")
    parser.add_argument("--steps", type=int, help="fine-tuning steps of every run")
    parser.add_argument("--epsilons", type=float, nargs="*", help="none: the non-private run only")
    parser.add_argument("--repeats", type=int, help="timed rounds per throughput mode")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--batch-size", type=int, help="fine-tuning (expected) batch")
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate")
    parser.add_argument("--nonprivate-steps", type=int, help="a second non-private run with these steps")
    parser.add_argument("--nonprivate-lr", type=float, help="a second non-private run with this lr (0: none)")
    parser.add_argument("--canaries", type=int)
    parser.add_argument("--canary-repetitions", type=int, nargs="+")
    parser.add_argument("--canary-length", type=int)
    parser.add_argument("--privacy-unit", choices=["example", "user"])
    parser.add_argument("--chunk-tokens", type=int)
    parser.add_argument("--train-chunks", type=int, help="cap on private training chunks (0: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS, else 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # child process: one throughput/memory job, its result as JSON on the last stdout line
        spec = json.loads(args.worker)
        known = dict(spec["settings"])
        for name in ("epsilons", "lora_targets", "canary_repetitions"):
            known[name] = tuple(known[name])
        s = Settings(**known)
        if spec["kind"] == "memory":
            out = memory_worker(spec["modes"][0], s, Path(spec["model_dir"]), Path(spec["batches"]))
        else:
            out = timing_worker(spec["modes"], s, Path(spec["model_dir"]), Path(spec["batches"]))
        print(json.dumps(out))
        return

    s = dataclasses.replace(QUICK if args.quick else FULL)
    overrides = {"steps": args.steps, "epsilons": tuple(args.epsilons) if args.epsilons is not None else None,
                 "repeats": args.repeats, "pretrain_steps": args.pretrain_steps, "batch_size": args.batch_size,
                 "lr": args.lr, "nonprivate_steps": args.nonprivate_steps,
                 "nonprivate_lr": args.nonprivate_lr,
                 "canaries": args.canaries, "canary_length": args.canary_length, "privacy_unit": args.privacy_unit,
                 "chunk_tokens": args.chunk_tokens, "train_chunks": args.train_chunks,
                 "canary_repetitions": tuple(args.canary_repetitions) if args.canary_repetitions else None,
                 "threads": args.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))}
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    if s.nonprivate_lr == 0:
        s = dataclasses.replace(s, nonprivate_lr=None)

    import torch
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from tramontane.models.checkpoint import load_model
    from tramontane.tokenizer import Tokenizer

    torch.set_num_threads(s.threads)
    # dp_accounting's RDP logs each order it skips at small sigma ("failed to converge"): noise on the progress
    logging.getLogger("absl").setLevel(logging.ERROR)
    load_start = os.getloadavg()[0]
    log(f"settings: {'quick' if args.quick else 'full'}; load average {load_start:.2f}; workdir {args.workdir}")
    workdir = args.workdir / ("quick" if args.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_file = Path(MistralTokenizer.v3().instruct_tokenizer.tokenizer.file_path)
    tokenizer = Tokenizer.from_file(tokenizer_file)

    log("corpus: chunking the standard library's modules")
    corpus = build_corpus(s, workdir, tokenizer)
    log(f"corpus: public {corpus['public_chunks']} chunks, private train {corpus['train_chunks']}, held-out "
        f"{corpus['heldout_chunks']}")
    model_dir = pretrain(s, workdir, corpus, tokenizer, tokenizer_file)
    model, _ = load_model(model_dir, dtype=torch.float32)
    base_ppl = heldout_perplexity(model, tokenizer, corpus["heldout_path"], s.chunk_tokens + 16)
    del model
    log(f"pre-trained model: held-out perplexity {base_ppl:.2f} (before fine-tuning)")

    runs = {} if args.skip_sweep else sweep(s, workdir, model_dir, corpus)
    tp = {} if args.skip_throughput else throughput(s, workdir, model_dir, tokenizer, corpus["train_path"],
                                                    args.modes)
    loads = (load_start, os.getloadavg()[0])
    report(s, args, corpus, base_ppl, runs, tp, loads)
    result: dict[str, Any] = ratios(tp) if tp else {}
    result["pretrained_heldout_perplexity"] = round(base_ppl, 3)
    result["sweep"] = {label: {"epsilon": r["epsilon"], "heldout_perplexity": round(r["heldout_perplexity"], 3),
                               "noise_multiplier": r["noise_multiplier"], "steps": r["steps"], "lr": r["lr"],
                               "exposure_median": {k: round(v["median"], 3) for k, v in r["exposure"].items()},
                               "exposure_max": {k: round(v["max"], 3) for k, v in r["exposure"].items()}}
                       for label, r in runs.items()}
    result["throughput"] = {m: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                if k in ("samples_per_s", "samples_per_s_best", "peak_mib", "peak_above_base_mib",
                                         "error")} for m, r in tp.items()}
    result["config"] = {k: v for k, v in dataclasses.asdict(s).items()}
    result["load_average"] = [round(x, 2) for x in loads]
    result["wall_s"] = round(time.monotonic() - START, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
