"""DP-SGD on any nn.Module: per-example clipping, the Gaussian noise, and the step that both use.

DP-SGD (Abadi et al. 2016, "Deep learning with differential privacy"): each step, clip every example's
gradient to norm at most C = `max_grad_norm`, sum, add N(0, (sigma C)^2) per coordinate (sigma =
`noise_multiplier`), divide by the expected batch size. Here:

- `record()` records one physical micro-batch (`recording.py`: per-example gradient norms in one backward
  pass, by per-module rules looked up by type in `rules.py`); when the block closes, the norms give clip
  factors c_i = min(1, C / (||g_i|| + 1e-6)) and sum_i c_i g_i is added to the step's running sum;
- `add_noise_and_set_grads()` adds the noise, drawn from `noise.SecureRandom` (a fresh OS-seeded generator
  at every step unless a seed is given), divides by the expected batch size and sets `.grad`;
- `step()` is the whole DP-SGD step on an `Objective` (`objective.py`): the Poisson batch's micro-batches
  recorded and clipped, then the noise. The trainer and the audit's replay both call it; the caller's
  optimizer then applies `.grad`.

Assumptions the guarantee relies on (the caller's side of the contract):
- dim 0 of the model's input is the example axis and no module mixes examples (`validate.py` refuses known
  offenders; every hooked layer's dim 0 is checked against the batch size);
- the loss is the SUM over examples of per-example losses (each a function of that example alone, e.g. the
  sum or mean of its token losses). Use `engine.backward(per_example_losses)` to have this checked. The
  division by the expected batch size q N (Poisson sampling, as in Opacus) is done by
  `add_noise_and_set_grads`, never by the loss;
- every trainable parameter is used only through its module's forward (F.linear(x, other.weight) in a
  parent's forward would escape the hooks);
- batches are Poisson-sampled (`sampling.PoissonSampler`) for the accountant's amplification to hold.
`verify()` tests the first three on one batch (the hooks' view against plain autograd) before training.

Typical loop (one logical batch, possibly several physical micro-batches, per step):

    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.1)
    engine.verify(objective.losses, public_or_synthetic_batch)
    sampler = PoissonSampler(N, q)
    for indices in sampler:
        engine.step(objective, indices, expected_batch_size=sampler.expected_batch_size,  # q N
                    micro_batch_size=32)  # also for an empty batch: noise only
        optimizer.step(); optimizer.zero_grad()

Over the processes of a torchrun launch, the engine takes a `reducer` (`distributed.ReplicaGroup`): each
process records its shard of the batch, and `add_noise_and_set_grads` all-reduces the clipped sums and adds
the noise rank 0 drew, once (`distributed.py`: the protocol and why the guarantee is unchanged).

The parts, for a loop of one's own:

    with engine.record():
        engine.backward(per_example_losses(model, micro))   # [b] losses
    engine.add_noise_and_set_grads(expected_batch_size)

`per_example_norms`, `clip_factors`, `examples_in_step` and `step()`'s returned losses describe private
data: debug with them, never log or release them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tramontane.dp.distributed import Reducer, refuse_sharded
from tramontane.dp.noise import SecureRandom
from tramontane.dp.objective import Objective
from tramontane.dp.recording import Recorder, Recording
from tramontane.dp.sampling import micro_batches
from tramontane.dp.validate import validate_model
from tramontane.errors import (
    ConfigError,
    DPInputError,
    DPUsageError,
    PrivacyParameterError,
    TramontaneWarning,
    UnsupportedModuleError,
)

logger = logging.getLogger(__name__)

CLIP_EPS = 1e-6  # c_i = min(1, C / (norm_i + CLIP_EPS)), as in Opacus
LINEAR_STRATEGIES = ("auto", "ghost", "materialize")


@dataclass(frozen=True)
class StepLosses:
    """The training losses `DPEngine.step` saw. NOT differentially private (a function of the private batch,
    without noise): for a live progress display only, never to be stored or released."""

    rows: int  # input rows recorded
    loss_sum: float  # sum of their losses

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.rows, 1)


class _GivenBatches:
    """An `Objective` over ready-made micro-batches (`compute_noisy_grads`): only `losses` is ever called."""

    def __init__(self, losses: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        self.losses = losses

    def rows(self, indices: Sequence[int]) -> tuple[Any, torch.Tensor | None]:
        raise AssertionError("no examples to look up: every micro-batch is given")


class DPEngine:
    """Per-example clipping and Gaussian noise for DP-SGD on `model` (see the module docstring).

    Args:
        model: any nn.Module whose input's dim 0 is the example axis. Validated on construction
            (`UnsupportedModuleError` names every module that cannot be trained privately).
        max_grad_norm: the clipping bound C > 0 on each example's gradient (all parameters together).
        noise_multiplier: sigma >= 0; the noise std per coordinate is sigma * C. sigma = 0 warns.
        seed: None (default) seeds the noise from the OS CSPRNG at every step. An int makes the noise
            reproducible and predictable: a `TramontaneWarning` says so. Step t's noise is then a function
            of (seed, t) alone (`noise.derive_seed`), independent of a `PoissonSampler` given the same seed.
        first_step: index of the first step this engine takes, for seeded noise: a resumed run passes the
            steps already taken, so that it draws fresh noise rather than replaying its first steps'.
        linear_strategy: "auto" (per layer, the cheaper of ghost norms and materialised per-example
            gradients), or "ghost" / "materialize" for every nn.Linear (testing, benchmarks).
        reducer: None for one process; in a distributed run the group of processes that each record a shard
            of every batch (`distributed.ReplicaGroup`): the clipped sums are added up over them and the noise
            is rank 0's. Every process must then call `add_noise_and_set_grads` at every step.

    The parameters trained are those with requires_grad=True when the engine is built.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, noise_multiplier: float,
                 seed: int | None = None, first_step: int = 0, linear_strategy: str = "auto",
                 reducer: Reducer | None = None) -> None:
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm)
                and max_grad_norm > 0):
            raise PrivacyParameterError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier)
                and noise_multiplier >= 0):
            raise PrivacyParameterError(
                f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: gradients are clipped but not noised; training is NOT "
                          "differentially private", TramontaneWarning, stacklevel=2)
        if linear_strategy not in LINEAR_STRATEGIES:
            raise ConfigError(f"linear_strategy must be one of {LINEAR_STRATEGIES}, got {linear_strategy!r}")
        refuse_sharded(model)
        validate_model(model)
        self.model = model
        self.reducer = reducer
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.linear_strategy = linear_strategy
        self._recorder = Recorder(model, linear_strategy)
        self._named = self._recorder.named
        self._noise = SecureRandom(seed, "DP-SGD noise", first_step)
        self._flat: dict[tuple[torch.device, torch.dtype], torch.Tensor] | None = None
        self._sums: dict[nn.Parameter, torch.Tensor] = {}
        self._rec: Recording | None = None
        self.steps = 0
        self.examples_in_step = 0
        self.per_example_norms: torch.Tensor | None = None
        self.clip_factors: torch.Tensor | None = None

    def describe(self) -> dict[str, str]:
        """Which rule handles each module with trainable parameters (for logs and reports)."""
        return self._recorder.describe()

    # -- one DP-SGD step ----------------------------------------------------------------------------
    def step(self, objective: Objective, indices: Sequence[int], *, expected_batch_size: float,
             micro_batch_size: int,
             extra_batches: Iterable[tuple[Any, torch.Tensor | None]] = ()) -> StepLosses:
        """One DP-SGD step on the logical batch `indices` (a Poisson sample of the objective's examples): each
        micro-batch of at most `micro_batch_size` examples recorded and clipped (`objective.rows`, then
        `objective.losses`, inside `record()`), then `add_noise_and_set_grads(expected_batch_size)`. An empty
        batch is a step too: noise only. The caller's optimizer then applies `.grad`.

        Args:
            objective: the examples and their per-row losses (see `objective.Objective` for its contract).
            indices: the examples of this step's batch.
            expected_batch_size: q N for Poisson sampling at rate q over N examples (see
                `add_noise_and_set_grads`); never the realised batch size.
            micro_batch_size: examples per forward/backward pass (memory; the result does not depend on it).
            extra_batches: further micro-batches (model input, example id of each row or None) recorded
                after the batch's, as more examples of this step (an audit's canary). Iterated only then,
                so a generator may build them lazily.

        Returns the step's training losses (`StepLosses`: not private, for display only). If anything
        raises, the step's clipped sums are dropped (`reset`), so that no later step adds them.
        """
        if self._rec is not None:
            raise DPUsageError("engine.step() inside an engine.record() block")
        self._check_expected(expected_batch_size)
        parts = micro_batches(indices, micro_batch_size)

        def micro() -> Iterator[tuple[Any, torch.Tensor | None]]:  # rows looked up as each one is recorded
            for part in parts:
                yield objective.rows(part)
            yield from extra_batches

        total, rows = 0.0, 0
        try:
            for batch, example_ids in micro():
                with self.record(example_ids=example_ids):
                    losses = objective.losses(self.model, batch)
                    self.backward(losses)
                total, rows = total + float(losses.detach().sum()), rows + losses.shape[0]
        except BaseException:
            self.reset()
            raise
        self.add_noise_and_set_grads(expected_batch_size)
        return StepLosses(rows, total)

    def compute_noisy_grads(self, per_example_losses: Callable[[nn.Module, Any], torch.Tensor],
                            micro_batches: Iterable[Any], expected_batch_size: float) -> None:
        """`step` on ready-made micro-batches: record each (`per_example_losses(model, micro_batch)` -> [b],
        one example per row), then add noise and set `.grad`. No micro-batch: noise only."""
        self.step(_GivenBatches(per_example_losses), (), expected_batch_size=expected_batch_size,
                  micro_batch_size=1, extra_batches=((batch, None) for batch in micro_batches))

    # -- recording ----------------------------------------------------------------------------------
    @contextmanager
    def record(self, example_ids: torch.Tensor | Sequence[int] | None = None,
               batch_size: int | None = None) -> Iterator[DPEngine]:
        """Record one physical micro-batch: run the forward pass and `backward()` inside the block.

        On exit the micro-batch's examples are clipped and their clipped gradient sum is added to the
        step's running sum (`clipped_grad_sum()`); `per_example_norms` and `clip_factors` describe them.

        Args:
            example_ids: optional [B] labels of the privacy unit of each input row: rows sharing a label
                (e.g. K augmentations of one example) share one clip. Default: each row is one example.
            batch_size: the number of input rows B; default: dim 0 of the model's first tensor argument.
        """
        if self._rec is not None:
            raise DPUsageError("engine.record() blocks cannot be nested")
        with self._recorder.recording(example_ids, batch_size) as rec:
            self._rec = rec
            try:
                yield self
            finally:
                self._rec = None
        self._clip(rec)

    def backward(self, per_example_losses: torch.Tensor) -> None:
        """Backward pass of the sum of per-example losses [B] (checks the shape; call inside `record()`)."""
        rec = self._rec
        if rec is None:
            raise DPUsageError("engine.backward() must be called inside `with engine.record():`")
        if per_example_losses.dim() != 1:
            raise DPInputError(
                "engine.backward() takes one loss per example, shape [B]; got shape "
                f"{tuple(per_example_losses.shape)}. Reduce each example's token losses yourself (sum or "
                "mean over its tokens), never over examples")
        if rec.batch_size is not None and per_example_losses.shape[0] != rec.batch_size:
            raise DPInputError(
                f"got {per_example_losses.shape[0]} losses for a batch of {rec.batch_size} rows")
        per_example_losses.sum().backward()

    def verify(self, per_example_losses: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
               examples: int = 2, rtol: float = 1e-3) -> None:
        """A one-off self-test of the contract on one (public or synthetic) batch, before training.

        With clipping off, the engine's gradient sum must equal autograd's gradient of the summed loss: a
        parameter that differs is used where the hooks cannot see it (outside its module's forward). And
        for the first `examples` examples, the engine's per-example norm must equal the norm of autograd's
        gradient of that example's loss alone: a difference means some module mixes examples. Raises
        `UnsupportedModuleError` naming what failed. Nothing is added to the step; `.grad` is untouched.
        """
        clip, self.max_grad_norm = self.max_grad_norm, math.inf
        rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            with self.record():
                self.backward(per_example_losses(self.model, batch))
            ours, norms = self.clipped_grad_sum(), self.per_example_norms
        finally:
            self.max_grad_norm = clip
            self.reset()
        assert norms is not None
        params = [p for _, p in self._named]

        def grads_of(loss: torch.Tensor) -> list[torch.Tensor]:
            got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params)]

        def close(x: torch.Tensor, y: torch.Tensor) -> bool:
            return bool((x - y).norm() <= rtol * max(y.norm().item(), x.norm().item()) + 1e-12)

        torch.set_rng_state(rng[0])  # the same dropout masks in both forwards
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        losses = per_example_losses(self.model, batch)
        batch_grads = grads_of(losses.sum())
        missed = [name for (name, _), ref in zip(self._named, batch_grads) if not close(ours[name], ref)]
        if missed:
            raise UnsupportedModuleError(
                f"the per-example gradients of {missed} do not add up to their batch gradient: these "
                "parameters are used outside their module's forward (e.g. F.linear(x, other.weight)); call "
                "the module instead")
        for i in range(min(examples, losses.shape[0])):
            alone = torch.sqrt(sum((g.double().pow(2).sum() for g in grads_of(losses[i])),
                                   torch.zeros((), dtype=torch.float64)))
            if not close(norms[i].double(), alone):
                raise UnsupportedModuleError(
                    f"example {i}'s gradient norm is {alone.item():.6g} from its own loss but "
                    f"{norms[i].item():.6g} as attributed by the engine: some module mixes examples (e.g. "
                    "batch statistics), so per-example clipping would not bound its influence")

    # -- clipping -----------------------------------------------------------------------------------
    def _clip(self, rec: Recording) -> None:
        """Clip the examples of a closed recording and add their clipped sum to the step's."""
        dtype = self._named[0][1].dtype if self._named else torch.float32
        norms = rec.per_example_norms(dtype)
        clip = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        if rec.contribs:
            rec.add_clipped_sums_(self._running_sums(), clip)
        self.per_example_norms, self.clip_factors = norms, clip
        self.examples_in_step += rec.num_groups or 0

    def _buckets(self) -> dict[tuple[torch.device, torch.dtype], list[nn.Parameter]]:
        """Trainable parameters grouped by (device, dtype), in a fixed order: one flat buffer each."""
        buckets: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for _, param in self._named:
            buckets.setdefault((param.device, param.dtype), []).append(param)
        return buckets

    @staticmethod
    def _views(flat: torch.Tensor, params: list[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor]:
        views, offset = {}, 0
        for param in params:
            views[param] = flat[offset:offset + param.numel()].view(param.shape)
            offset += param.numel()
        return views

    def _running_sums(self) -> dict[nn.Parameter, torch.Tensor]:
        """The step's clipped sums: views into one zero-initialised flat buffer per bucket (so that noise,
        normalisation and `.grad` take a few large operations rather than a few per parameter)."""
        if self._flat is None:
            self._flat, self._sums = {}, {}
            for (device, dtype), params in self._buckets().items():
                flat = torch.zeros(sum(p.numel() for p in params), device=device, dtype=dtype)
                self._flat[(device, dtype)] = flat
                self._sums.update(self._views(flat, params))
        return self._sums

    def clipped_grad_sum(self) -> dict[str, torch.Tensor]:
        """sum_i c_i g_i over the examples recorded since the last step, per parameter (no noise)."""
        return {n: self._sums[p].clone() if p in self._sums else torch.zeros_like(p) for n, p in self._named}

    # -- noise --------------------------------------------------------------------------------------
    @staticmethod
    def _check_expected(expected_batch_size: float) -> None:
        if not (isinstance(expected_batch_size, (int, float)) and math.isfinite(expected_batch_size)
                and expected_batch_size > 0):
            raise PrivacyParameterError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")

    def add_noise_and_set_grads(self, expected_batch_size: float) -> None:
        """Set each trainable parameter's `.grad` to (clipped sum + N(0, (sigma C)^2 I)) / expected_batch_size
        and start a new step. Call once per logical batch, also when it was empty (noise only). The
        gradients are views into one buffer per (device, dtype), freshly allocated at every step.

        `expected_batch_size` is q N for Poisson sampling with rate q over N examples: a constant, so the
        normalisation does not depend on the (private) realised batch size.

        With a `reducer`, the clipped sums are first added up over the processes (each recorded its shard of
        the batch; a process whose shard was empty adds zeros), and the noise is rank 0's draw, broadcast:
        every process sets the same `.grad`, with the noise in it once."""
        if self._rec is not None:
            raise DPUsageError("add_noise_and_set_grads() inside an engine.record() block")
        self._check_expected(expected_batch_size)
        std = self.noise_multiplier * self.max_grad_norm
        self._noise.next_step()
        buckets = self._buckets()
        drawn: list[torch.Tensor] = []
        for (device, dtype), params in buckets.items():
            numel = sum(p.numel() for p in params)
            if self.reducer is None or self.reducer.rank == 0:
                drawn.append(self._noise.normal(torch.Size([numel]), std / expected_batch_size, device, dtype))
            else:  # filled with rank 0's draw below
                drawn.append(torch.empty(numel, device=device, dtype=dtype))
        if self.reducer is not None:
            self._running_sums()  # zeros where this process's shard of the batch was empty
            assert self._flat is not None
            self.reducer.all_reduce_sum([self._flat[key] for key in buckets])
            self.reducer.broadcast_from_first(drawn)
        for noisy, ((device, dtype), params) in zip(drawn, buckets.items()):
            if self._flat is not None:
                noisy.add_(self._flat[(device, dtype)], alpha=1.0 / expected_batch_size)
            for param, grad in self._views(noisy, params).items():
                param.grad = grad
        self.reset()
        self.steps += 1

    def reset(self) -> None:
        """Drop the clipped sums recorded since the last step (no step is taken)."""
        self._flat, self._sums = None, {}
        self.examples_in_step = 0
