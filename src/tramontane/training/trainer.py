"""The training loop: non-private, or DP-SGD with Poisson sampling, a privacy ledger and a hard budget stop.

DP-SGD steps follow Abadi et al. (2016) with the accounting of Mironov et al. (2019): every step samples a
Poisson batch at rate q = batch_size / N, clips each example's gradient, adds Gaussian noise of std sigma * C,
divides by q N (all in `tramontane.dp.DPEngine.step`), and takes an AdamW step. When N itself is private (a
synthesizer knows only a noisy row count), `TrainConfig.sample_rate` gives q publicly and the noisy sum is
divided by the public `batch_size` instead, so that nothing released depends on the exact N. Each step is
appended to the privacy ledger *after* it is applied; checkpoints save weights and ledger together, so a
resumed run continues the ledger exactly.

Resuming from `run_dir` continues the caller's ledger object with the checkpoint's events, provided the
caller's events are where the checkpoint's begin (e.g. the ledger the run started with); any other ledger is
refused (`ConfigError`), since a resume must never drop spending. With `noise_seed`, sampling and noise
draw independent streams derived from it, and a resumed run draws what the uninterrupted run would have
drawn at the same steps (`tramontane.dp.noise`), never a replay of its first steps.

Under torchrun (`tramontane.dp.distributed`), the trainer joins the launch's process group: each process
samples and clips its shard of every Poisson batch, the engine adds up the clipped sums and adds rank 0's
noise once, rank 0's initial weights are broadcast so the replicas start (and stay) bit-identical, and
rank 0 alone writes the checkpoints. The batches and the noise are those of a single-process run with the
same seed, and a checkpoint holds no per-process state: a run resumes with any number of processes.

Budget: with `target_epsilon`, the run refuses to start (`PrivacyBudgetError`, nothing spent) when the
planned steps would exceed it given what the ledger already holds, and it can never take a step past it.
With only `target_epsilon` (no `noise_multiplier`), sigma is calibrated so that exactly the planned steps fit.

What the loop records: evaluation losses from `evaluate` (meant for held-out or public data) go into the
history and checkpoints. The training loss on private batches is passed to `on_step` for a live progress
display only: it is not differentially private, so it is never stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, PrivacyEvent, PrivacyLedger
from tramontane.dp import DPEngine, Objective, PoissonSampler, distributed, micro_batches
from tramontane.errors import ConfigError, PrivacyBudgetError
from tramontane.training.state import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (privacy vocabulary as in Opacus)."""

    steps: int
    batch_size: int  # DP: expected batch size q N of Poisson sampling, the divisor of the noisy sum;
    # non-private: fixed batch size
    lr: float = 1e-3
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1  # linear decay to lr * this after warm-up
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    micro_batch_size: int = 64  # physical batch: examples per forward/backward
    private: bool = True
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: calibrate from target_epsilon
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: accounting.Accountant = "rdp"
    noise_seed: int | None = None  # None: noise and sampling from the OS CSPRNG (secure)
    # DP: a public q; the noisy sum is then divided by batch_size, not q N (N unused: it may be private)
    sample_rate: float | None = None
    data_seed: int | None = None  # order of non-private batches
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end) when a run_dir is given
    eval_every: int = 0
    label: str = "dp-sgd"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.private:
            if self.delta is None or not 0 < self.delta < 1:
                raise ConfigError(f"a private run needs delta in (0, 1), got {self.delta}")
            if self.noise_multiplier is None and self.target_epsilon is None:
                raise ConfigError("a private run needs noise_multiplier, target_epsilon, or both")
            if self.sample_rate is not None and not (isinstance(self.sample_rate, (int, float))
                                                     and 0 < self.sample_rate <= 1):
                raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        elif self.sample_rate is not None:
            raise ConfigError("sample_rate is the Poisson rate of a private run; a non-private run takes "
                              "batches of batch_size: leave sample_rate=None")


@dataclass
class TrainResult:
    steps: int
    ledger: PrivacyLedger
    epsilon: float | None  # None for a non-private run
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: str | None = None


StepCallback = Callable[[int, int, dict[str, float]], None]


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps)
        done = min(1.0, (step - config.warmup_steps) / span)
        return 1.0 - (1.0 - config.final_lr_fraction) * done
    return factor


def _continuation(prefix: Sequence[PrivacyEvent], full: Sequence[PrivacyEvent]) -> list[PrivacyEvent] | None:
    """The events that extend ledger `prefix` to ledger `full` (both merged), or None if `full` does not
    begin with `prefix`. The last DP-SGD event of `prefix` may hold only some of its counterpart's steps."""
    if not prefix:
        return list(full)
    if len(prefix) > len(full) or list(prefix[:-1]) != list(full[:len(prefix) - 1]):
        return None
    if prefix[-1] == full[len(prefix) - 1]:
        return list(full[len(prefix):])
    last, ref = prefix[-1], full[len(prefix) - 1]
    if (isinstance(last, DpSgdEvent) and isinstance(ref, DpSgdEvent) and last.steps <= ref.steps
            and (last.sample_rate, last.noise_multiplier, last.label)
            == (ref.sample_rate, ref.noise_multiplier, ref.label)):
        return [DpSgdEvent(ref.sample_rate, ref.noise_multiplier, ref.steps - last.steps, ref.label),
                *full[len(prefix):]]
    return None


class Trainer:
    """Train `model` on `objective` over `num_examples` examples; resumable from `run_dir`."""

    def __init__(self, model: nn.Module, objective: Objective, num_examples: int, config: TrainConfig,
                 run_dir: str | Path | None = None, ledger: PrivacyLedger | None = None,
                 evaluate: Callable[[nn.Module], float] | None = None,
                 on_step: StepCallback | None = None, save_frozen: bool = True) -> None:
        if num_examples < 1:
            raise ConfigError("cannot train on an empty dataset")
        self.model, self.objective, self.num_examples, self.config = model, objective, num_examples, config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.evaluate, self.on_step = evaluate, on_step
        self.save_frozen = save_frozen  # False: checkpoints hold the trained parameters only (an adapter's)
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.group = distributed.replica_group()  # None: one process
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        self.step = 0
        self.history: list[dict[str, float]] = []
        if self.run_dir is not None and (ckpt := latest_checkpoint(self.run_dir)) is not None:
            self._resume(ckpt)
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None  # what the noisy clipped sum is divided by
        if config.private and config.sample_rate is not None:
            self.sample_rate, self.expected_batch_size = float(config.sample_rate), float(config.batch_size)
        elif config.private:
            self.sample_rate = min(1.0, config.batch_size / num_examples)
            self.expected_batch_size = self.sample_rate * num_examples
        self.noise_multiplier = self._noise_multiplier() if config.private else None
        self._check_budget()

    # -- privacy set-up -------------------------------------------------------------------------------
    def _noise_multiplier(self) -> float:
        c = self.config
        if c.noise_multiplier is not None:
            return c.noise_multiplier
        if len(self.ledger) and self.step == 0:
            raise ConfigError("the ledger already holds spending: give noise_multiplier explicitly (calibration "
                              "assumes this run is the only spend)")
        if self.step > 0:  # resumed: the sigma chosen at the start is in the saved config
            return float(self._saved_config["noise_multiplier_used"])
        # a private run: __post_init__ checked delta and target_epsilon, __init__ set the sample rate
        assert c.target_epsilon is not None and c.delta is not None and self.sample_rate is not None
        cal = accounting.calibrate_noise_multiplier(c.target_epsilon, c.delta, self.sample_rate, c.steps,
                                                    accountant=c.accountant)
        return cal.noise_multiplier

    def _check_budget(self) -> None:
        c = self.config
        self.max_steps = c.steps
        if not c.private or c.target_epsilon is None:
            return
        remaining = c.steps - self.step
        assert c.delta is not None and self.sample_rate is not None and self.noise_multiplier is not None
        allowed = accounting.max_steps_within_budget(self.ledger, self.sample_rate, self.noise_multiplier,
                                                     c.target_epsilon, c.delta, c.accountant,
                                                     upper=max(remaining, 1), label=c.label)
        if allowed < remaining:
            raise PrivacyBudgetError(
                f"{remaining} more DP-SGD steps at q={self.sample_rate:.4g}, sigma={self.noise_multiplier:.4g} "
                f"would exceed epsilon={c.target_epsilon} at delta={c.delta} (only {allowed} fit, given the "
                f"{len(self.ledger)} event(s) already on the ledger). Lower the steps, raise the noise, or "
                "raise the target; nothing was spent.")
        self.max_steps = self.step + allowed

    # -- checkpoints ----------------------------------------------------------------------------------
    def _config_record(self) -> dict[str, Any]:
        return {**asdict(self.config), "noise_multiplier_used": self.noise_multiplier,
                "sample_rate_used": self.sample_rate, "num_examples": self.num_examples}

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, self.model, self.optimizer)
        saved = state.config
        for key in ("private", "batch_size", "sample_rate", "max_grad_norm", "delta", "target_epsilon",
                    "label"):
            if saved.get(key) != getattr(self.config, key):
                raise ConfigError(f"cannot resume {path}: it was trained with {key}={saved.get(key)!r}, this run "
                                  f"asks for {getattr(self.config, key)!r}")
        if saved.get("num_examples") != self.num_examples:
            raise ConfigError(f"cannot resume {path}: it was trained on {saved.get('num_examples')} examples, "
                              f"this run has {self.num_examples}")
        self._saved_config = saved
        self._continue_ledger(state.ledger, path)
        self.step, self.history = state.step, state.history
        self.scheduler.last_epoch = state.step
        factor = _lr_lambda(self.config)(state.step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        if state.rng_state is not None:
            torch.set_rng_state(state.rng_state)
        logger.info("resumed %s at step %d", path, self.step)

    def _continue_ledger(self, saved: PrivacyLedger, path: Path) -> None:
        """Extend the caller's ledger (in place: whoever holds it sees every step) to the checkpoint's.

        Sound only when the caller's events are where the checkpoint's begin: the run started from that
        ledger. Anything else (events the checkpoint lacks, spent elsewhere or after it was written) is
        refused, as neither replacing nor keeping either ledger would be guaranteed to count every spend."""
        mine, theirs = PrivacyLedger(self.ledger.events).events, PrivacyLedger(saved.events).events  # merged
        rest = _continuation(mine, theirs)
        if rest is None:
            raise ConfigError(
                f"cannot resume {path}: its privacy ledger does not begin with the {len(mine)} event(s) of "
                "the ledger passed in, which therefore holds spending the checkpoint lacks (spent elsewhere, "
                "or after the checkpoint was written); a resume never drops events. Resume with the ledger "
                "this run started with (ledger=None if it started with none), or start a new run_dir with "
                f"the ledger you hold. Checkpoint ledger: {list(theirs)}; ledger passed in: {list(mine)}")
        for event in rest:
            self.ledger.append(event)

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0 only in a distributed run: the others wait for it)."""
        if self.run_dir is None:
            return None
        run_dir = self.run_dir

        def write() -> Path:
            state = TrainState(self.step, self.ledger, self._config_record(), self.history, torch.get_rng_state())
            return save_checkpoint(run_dir, self.model, self.optimizer, state, trainable_only=not self.save_frozen)

        return write() if self.group is None else self.group.on_first(write)

    # -- the loop -------------------------------------------------------------------------------------
    def _private_batches(self, steps: int) -> Iterator[list[int]]:
        # The seed reaches sampler and engine alike: each derives its own stream from it (purpose-labelled),
        # from this run's step index on, so a resumed run continues both streams.
        # Distributed: the same draws on every process (rank 0's seed), each keeping its shard's examples.
        assert self.sample_rate is not None
        group = self.group
        sampler = PoissonSampler(self.num_examples, self.sample_rate, steps=steps,
                                 seed=self.config.noise_seed, first_step=self.step,
                                 shard=group.shard(self.num_examples) if group is not None else None,
                                 agree_seed=group.agree_seed if group is not None else None)
        yield from sampler

    def _plain_batches(self, steps: int) -> Iterator[list[int]]:
        """The batches of steps `self.step` .. `self.step + steps - 1`: epochs of a shuffled order drawn from
        `data_seed`, so a resumed run goes on where it stopped instead of repeating the first batches (without
        a data_seed the order is fresh at every start)."""
        seed = self.config.data_seed if self.config.data_seed is not None else torch.seed()
        gen = torch.Generator()
        gen.manual_seed(seed if self.group is None else self.group.agree_seed(seed))
        size = min(self.config.batch_size, self.num_examples)
        first, done = self.step, 0
        while done < first + steps:
            order = torch.randperm(self.num_examples, generator=gen).tolist()
            for start in range(0, self.num_examples - size + 1, size):
                if done == first + steps:
                    return
                if done >= first:
                    yield order[start:start + size]
                done += 1

    def _plain_step(self, indices: list[int]) -> float:
        mine = indices
        if self.group is not None:  # this process's share of the batch; the gradients are summed below
            shard = self.group.shard(self.num_examples)
            mine = [i for i in indices if i in shard]
        total, rows = 0.0, 0
        for micro in micro_batches(mine, self.config.micro_batch_size):
            batch, _ = self.objective.rows(micro)
            losses = self.objective.losses(self.model, batch)
            (losses.sum() / len(indices)).backward()
            total, rows = total + float(losses.detach().sum()), rows + losses.shape[0]
        if self.group is not None:
            grads = []
            for param in self.params:
                if param.grad is None:  # unused by this process's examples: it adds zeros
                    param.grad = torch.zeros_like(param)
                grads.append(param.grad)
            self.group.all_reduce_sum(grads)
        return total / max(rows, 1)

    def fit(self) -> TrainResult:
        c = self.config
        self.model.train()
        remaining = c.steps - self.step
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.group is not None:  # one starting point, rank 0's (e.g. a fresh adapter's random init)
            self.group.broadcast_from_first([p.detach() for p in self.params])
            self.group.check_in_sync(self.model.named_parameters())  # the frozen weights too
        engine = None
        if c.private:
            assert self.noise_multiplier is not None
            engine = DPEngine(self.model, max_grad_norm=c.max_grad_norm, noise_multiplier=self.noise_multiplier,
                              seed=c.noise_seed, first_step=self.step, reducer=self.group)
            batches = self._private_batches(remaining) if remaining > 0 else iter(())
        else:
            batches = self._plain_batches(remaining)
        stopped = None  # (a run resumed at its last step has nothing left to do)
        for indices in batches:
            if self.step >= self.max_steps:  # unreachable after _check_budget; kept as a last guard
                stopped = "privacy budget reached"
                break
            if engine is not None:  # clipped sum + noise on .grad, as the engine's one DP step sets it
                assert self.expected_batch_size is not None
                loss = engine.step(self.objective, indices, expected_batch_size=self.expected_batch_size,
                                   micro_batch_size=c.micro_batch_size).mean
            else:
                loss = self._plain_step(indices)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if c.private:
                assert self.sample_rate is not None and self.noise_multiplier is not None
                self.ledger.append(DpSgdEvent(self.sample_rate, self.noise_multiplier, 1, c.label))
            self.step += 1
            if self.group is not None:
                self.group.check_in_sync(named, step=self.step)
            info = {"train_loss": loss, "lr": float(self.scheduler.get_last_lr()[0]),
                    "batch": float(len(indices))}
            if self.evaluate is not None and c.eval_every and (self.step % c.eval_every == 0 or self.step == c.steps):
                self.model.eval()
                with torch.no_grad():
                    info["eval_loss"] = float(self.evaluate(self.model))
                self.model.train()
                self.history.append({"step": self.step, "eval_loss": info["eval_loss"]})
            if self.on_step is not None:
                self.on_step(self.step, c.steps, info)
            if self.run_dir is not None and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save()
        if self.group is not None:
            self.group.check_in_sync(named)
        self.model.eval()
        self.save()
        eps = None
        if c.private:
            assert c.delta is not None
            eps = accounting.epsilon(self.ledger, c.delta, c.accountant) if len(self.ledger) else 0.0
            if c.target_epsilon is not None:
                assert eps <= c.target_epsilon * (1 + 1e-9), "budget check failed"
        return TrainResult(self.step, self.ledger, eps, c.delta, self.noise_multiplier, self.sample_rate,
                           self.history, stopped)
