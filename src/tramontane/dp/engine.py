"""DP-SGD on any nn.Module: per-example gradient norms in one backward pass, clipping, Gaussian noise.

DP-SGD (Abadi et al. 2016, "Deep learning with differential privacy"): each step, clip every example's
gradient to norm at most C = `max_grad_norm`, sum, add N(0, (sigma C)^2) per coordinate (sigma =
`noise_multiplier`), divide by the expected batch size. How the clipped sum is computed here:

1. `record()` hooks every layer with trainable parameters and freezes the parameters (requires_grad=False)
   for the recorded forward, so autograd propagates only activation gradients: the parameter gradients
   non-private training would compute are never formed. Forward hooks keep each layer's input; a hook on
   each layer's output receives its gradient during the single backward pass.
2. In that hook, each layer turns (input, output gradient) into every example's share of the squared
   gradient norm (ghost norms or materialised per-example gradients, whichever is cheaper, see `rules.py`),
   keeping only what the clipped sum will need.
3. When the `with` block closes, norms give clip factors c_i = min(1, C / (||g_i|| + 1e-6)) and each layer
   forms sum_i c_i g_i by re-weighting what it kept ("book-keeping", Bu et al. 2023, "Differentially private
   optimization on large model at small cost"): no second backward pass.

A parameter used several times (tied embedding and output head, a layer called twice) gets the norm of its
*total* per-example gradient, cross terms included. MoE experts receive token rows of several examples
mixed; the router's choice is recovered from its output (`MoeLayer`), so each row is charged to its example.

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

Typical step (one logical batch, possibly several physical micro-batches):

    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.1)
    engine.verify(per_example_losses, public_or_synthetic_batch)
    sampler = PoissonSampler(N, q)
    for batch_indices in sampler:
        for micro in micro_batches(batch_indices, 32):
            with engine.record():
                engine.backward(per_example_losses(model, micro))   # [b] losses
        engine.add_noise_and_set_grads(sampler.expected_batch_size)  # q N; also for an empty batch
        optimizer.step(); optimizer.zero_grad()

(`engine.compute_noisy_grads(per_example_losses, micro_batch_list, q * N)` does the inner part in one call.)
`per_example_norms`, `clip_factors` and `examples_in_step` describe private data: debug with them, never log
or release them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from tramontane.dp.contributions import Contribution, LinearGhost, combined_sq_norms
from tramontane.dp.noise import SecureRandom
from tramontane.dp.rows import ByExample, Layout, RowIndex
from tramontane.dp.rules import FunctionalRule, Rule, rule_for
from tramontane.dp.validate import OPAQUE_MODULES, validate_model
from tramontane.errors import PrivacyParameterError, TramontaneWarning, UnsupportedModuleError
from tramontane.models.moe import MoeLayer

logger = logging.getLogger(__name__)

CLIP_EPS = 1e-6  # c_i = min(1, C / (norm_i + CLIP_EPS)), as in Opacus
LINEAR_STRATEGIES = ("auto", "ghost", "materialize")


@dataclass
class _Capture:
    """One forward call of a hooked module."""

    module: nn.Module
    name: str
    rule: Rule
    params: list[tuple[str, nn.Parameter]]
    saved: Any
    layout: Layout | None = None  # None: the recording's default (dim 0 = examples)
    pending_moe: bool = False  # an MoE expert's rows, example indices to come from the MoeLayer hook
    done: bool = False
    versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)


@dataclass
class _Recording:
    """State of one `record()` block; also the `RuleContext` the rules run in."""

    linear_strategy: str
    batch_size: int | None = None
    groups: torch.Tensor | None = None  # [B] privacy unit of each input row, when example_ids were given
    num_groups: int | None = None
    active: bool = True
    closed: bool = False
    root_calls: int = 0
    grads_seen: int = 0
    captures: dict[nn.Module, list[_Capture]] = field(default_factory=lambda: defaultdict(list))
    use_count: Counter = field(default_factory=Counter)
    contribs: dict[nn.Parameter, list[Contribution]] = field(default_factory=lambda: defaultdict(list))
    sq_norms: list[torch.Tensor] = field(default_factory=list)  # [G] each, parameters used once
    moe_marks: dict[nn.Module, dict[nn.Module, int]] = field(default_factory=dict)
    moe_logits: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    _layouts: dict[tuple, Layout] = field(default_factory=dict)
    _pads: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _grams: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def set_batch_size(self, batch: int) -> None:
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"the model was called with {batch} examples, but the recording expects "
                             f"{self.batch_size} (batch_size / example_ids)")
        self.batch_size = batch
        if self.groups is None:
            self.num_groups = batch

    # -- RuleContext --------------------------------------------------------------------------------
    def default_layout(self, rows: int, device: torch.device) -> Layout:
        """Rows example-major, rows/B per example (dim 0 of [B, T, ...], or its flattened tokens)."""
        assert self.batch_size is not None and self.num_groups is not None
        key = (-1, None) if self.groups is None else (rows, device)  # one ByExample: caches key on identity
        if key not in self._layouts:
            if self.groups is None:
                self._layouts[key] = ByExample(self.batch_size)
            else:
                per = rows // self.batch_size
                group = self.groups.to(device).repeat_interleave(per)
                self._layouts[key] = RowIndex.from_groups(group, self.num_groups)
        return self._layouts[key]

    @staticmethod
    def _key(x: torch.Tensor, layout: Layout) -> tuple:
        return (id(layout), x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version, x.dtype)

    def padded(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        if isinstance(layout, ByExample):
            return layout.pad(x)
        key = self._key(x, layout)
        if key not in self._pads:  # layers reading the same input (w1, w3) pad it once
            self._pads[key] = (x, layout.pad(x))
        return self._pads[key][1]

    def gram(self, x: torch.Tensor, layout: Layout, padded: torch.Tensor) -> torch.Tensor:
        key = self._key(x, layout)
        if key not in self._grams:
            self._grams[key] = (x, torch.bmm(padded, padded.transpose(1, 2)))
        return self._grams[key][1]

    def is_shared(self, param: nn.Parameter) -> bool:
        return self.use_count[param] > 1

    def dim0_groups(self) -> tuple[torch.Tensor, int] | None:
        return None if self.groups is None else (self.groups, self.num_groups)  # type: ignore[return-value]


    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Hooks off while a rule re-runs a module (torch.func fallback)."""
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was


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

    The parameters trained are those with requires_grad=True when the engine is built.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, noise_multiplier: float,
                 seed: int | None = None, first_step: int = 0, linear_strategy: str = "auto") -> None:
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
            raise ValueError(f"linear_strategy must be one of {LINEAR_STRATEGIES}, got {linear_strategy!r}")
        validate_model(model)
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.linear_strategy = linear_strategy
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied: listed once
        self._noise = SecureRandom(seed, "DP-SGD noise", first_step)
        self._plan = self._plan_hooks(model)
        self._moe_member: dict[nn.Module, tuple[MoeLayer, int]] = {}
        self._moe_gates: dict[nn.Module, MoeLayer] = {}
        for moe in (m for m in model.modules() if isinstance(m, MoeLayer)):
            self._moe_gates[moe.gate] = moe
            for e, expert in enumerate(moe.experts):
                for sub in expert.modules():
                    self._moe_member[sub] = (moe, e)
        self._flat: dict[tuple[torch.device, torch.dtype], torch.Tensor] | None = None
        self._sums: dict[nn.Parameter, torch.Tensor] = {}
        self._rec: _Recording | None = None
        self.steps = 0
        self.examples_in_step = 0
        self.per_example_norms: torch.Tensor | None = None
        self.clip_factors: torch.Tensor | None = None

    # -- set-up -------------------------------------------------------------------------------------
    @staticmethod
    def _plan_hooks(model: nn.Module) -> dict[nn.Module, tuple[str, Rule, list[tuple[str, nn.Parameter]]]]:
        """module -> (qualified name, rule, its trainable parameters) for every module owning some."""
        plan: dict[nn.Module, tuple[str, Rule, list[tuple[str, nn.Parameter]]]] = {}
        inside_opaque: set[nn.Module] = set()
        for name, module in model.named_modules():
            if module in inside_opaque:
                continue
            if isinstance(module, OPAQUE_MODULES):
                inside_opaque.update(m for m in module.modules() if m is not module)
                params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
                if params:
                    plan[module] = (name, FunctionalRule(recurse=True), params)
                continue
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if params:
                plan[module] = (name or "<root>", rule_for(module, {n for n, _ in params}), params)
        return plan

    def describe(self) -> dict[str, str]:
        """Which rule handles each module with trainable parameters (for logs and reports)."""
        return {name: type(rule).__name__ for name, rule, _ in self._plan.values()}

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
            raise RuntimeError("engine.record() blocks cannot be nested")
        rec = _Recording(self.linear_strategy)
        if example_ids is not None:
            ids = torch.as_tensor(example_ids)
            if ids.dim() != 1:
                raise ValueError(f"example_ids must be 1-D [B], got shape {tuple(ids.shape)}")
            _, rec.groups = torch.unique(ids, return_inverse=True)
            rec.num_groups = int(rec.groups.max()) + 1 if ids.numel() else 0
            rec.set_batch_size(ids.numel())
        if batch_size is not None:
            rec.set_batch_size(batch_size)
        handles = self._install_hooks(rec)
        frozen = [p for _, p in self._named]
        for p in frozen:
            p.requires_grad_(False)
        self._rec = rec
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)
            rec.active, rec.closed = False, True
            self._rec = None
        self._finish(rec)

    def backward(self, per_example_losses: torch.Tensor) -> None:
        """Backward pass of the sum of per-example losses [B] (checks the shape; call inside `record()`)."""
        rec = self._rec
        if rec is None:
            raise RuntimeError("engine.backward() must be called inside `with engine.record():`")
        if per_example_losses.dim() != 1:
            raise ValueError(
                "engine.backward() takes one loss per example, shape [B]; got shape "
                f"{tuple(per_example_losses.shape)}. Reduce each example's token losses yourself (sum or "
                "mean over its tokens), never over examples")
        if rec.batch_size is not None and per_example_losses.shape[0] != rec.batch_size:
            raise ValueError(f"got {per_example_losses.shape[0]} losses for a batch of {rec.batch_size} rows")
        per_example_losses.sum().backward()

    def compute_noisy_grads(self, per_example_losses: Callable[[nn.Module, Any], torch.Tensor],
                            micro_batches: Iterable[Any], expected_batch_size: float) -> None:
        """One logical batch: record each micro-batch (`per_example_losses(model, micro_batch)` -> [b]),
        then add noise and set `.grad` (see `add_noise_and_set_grads`). No micro-batch: noise only."""
        for micro_batch in micro_batches:
            with self.record():
                self.backward(per_example_losses(self.model, micro_batch))
        self.add_noise_and_set_grads(expected_batch_size)

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
            alone = torch.sqrt(sum(g.double().pow(2).sum() for g in grads_of(losses[i])))
            if not close(norms[i].double(), alone):
                raise UnsupportedModuleError(
                    f"example {i}'s gradient norm is {alone.item():.6g} from its own loss but "
                    f"{norms[i].item():.6g} as attributed by the engine: some module mixes examples (e.g. "
                    "batch statistics), so per-example clipping would not bound its influence")

    def _install_hooks(self, rec: _Recording) -> list[Any]:
        handles = [self.model.register_forward_pre_hook(partial(self._on_root, rec), with_kwargs=True)]
        for module in self._plan:
            handles.append(module.register_forward_hook(partial(self._on_forward, rec), with_kwargs=True))
        for gate, moe in self._moe_gates.items():
            handles.append(gate.register_forward_hook(partial(self._on_gate, rec, moe)))
        for moe in set(self._moe_gates.values()):
            handles.append(moe.register_forward_pre_hook(partial(self._on_moe_start, rec)))
            handles.append(moe.register_forward_hook(partial(self._on_moe_end, rec)))
        return handles

    def _on_root(self, rec: _Recording, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not rec.active or not torch.is_grad_enabled():
            return
        rec.root_calls += 1
        if rec.root_calls > 1:
            raise RuntimeError("the model ran twice in one engine.record() block; record one forward "
                               "(one micro-batch) per block")
        tensors = (t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0)
        first = next(tensors, None)
        if first is not None:
            rec.set_batch_size(first.shape[0])

    def _on_forward(self, rec: _Recording, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not rec.active or not torch.is_grad_enabled():
            return None
        name, rule, params = self._plan[module]
        if rec.grads_seen:
            raise UnsupportedModuleError(
                f"{name} ran forward after the backward pass started (activation checkpointing, or a second "
                "forward in one engine.record() block); neither is supported")
        output_leaf, leaves, spec = None, None, None
        if not isinstance(output, torch.Tensor):
            leaves, spec = tree_flatten(output)
            floating = [i for i, t in enumerate(leaves)
                        if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if not rule.tuple_outputs or len(floating) != 1:
                raise UnsupportedModuleError(
                    f"{name} ({type(module).__name__}) returns {type(output).__name__}; modules with "
                    "trainable parameters must return one tensor")
            output_leaf = floating[0]
        saved = rule.capture(module, args, kwargs, output, output_leaf)
        lead = rule.rows_of(saved)
        if rec.batch_size is None:
            rec.set_batch_size(lead.shape[0] if lead.dim() else 0)
        in_moe = module in self._moe_member
        if in_moe and isinstance(rule, FunctionalRule):
            raise UnsupportedModuleError(
                f"{name} ({type(module).__name__}) runs inside an MoE expert, on token rows of several "
                "examples mixed; only nn.Linear, nn.Embedding and norm layers are supported there")
        if module in self._moe_gates:  # the router sees [B*T, dim]: example-major token rows
            ok = lead.dim() > 0 and lead.shape[0] % max(rec.batch_size, 1) == 0
        else:
            ok = in_moe or (lead.dim() > 0 and lead.shape[0] == rec.batch_size)
        if not ok:
            raise UnsupportedModuleError(
                f"{name} ({type(module).__name__}) got an input with leading dimension "
                f"{tuple(lead.shape[:1])}, but the batch has {rec.batch_size} examples: dim 0 must be the "
                "example axis in every layer with trainable parameters")
        cap = _Capture(module, name, rule, params, saved, pending_moe=in_moe,
                       versions=[(t, t._version) for t in rule.must_be_unmodified(saved)])
        rec.captures[module].append(cap)
        for _, p in params:
            rec.use_count[p] += 1
        target = output if output_leaf is None else leaves[output_leaf]
        replaced = None
        if not target.requires_grad:  # first layer: nothing upstream is trained, start the graph here
            # (a non-leaf copy, so that the caller may still modify it in place)
            target = target.detach().requires_grad_().clone()
            if output_leaf is None:
                replaced = target
            else:
                leaves[output_leaf] = target
                replaced = tree_unflatten(leaves, spec)
        target.register_hook(partial(self._on_grad, rec, cap))
        return replaced

    # -- MoE: recover which example each expert row belongs to -------------------------------------
    def _on_gate(self, rec: _Recording, moe: MoeLayer, module: nn.Module, args: tuple, output: Any) -> None:
        if rec.active and torch.is_grad_enabled():
            rec.moe_logits[moe] = output.detach()

    def _on_moe_start(self, rec: _Recording, moe: MoeLayer, args: tuple) -> None:
        if rec.active and torch.is_grad_enabled():
            rec.moe_marks[moe] = {sub: len(rec.captures[sub]) for sub, (m, _) in self._moe_member.items()
                                  if m is moe and sub in self._plan}

    def _on_moe_end(self, rec: _Recording, moe: MoeLayer, args: tuple, output: Any) -> None:
        if not rec.active or not torch.is_grad_enabled():
            return
        x = args[0]
        assert rec.batch_size is not None and rec.num_groups is not None
        if x.shape[0] != rec.batch_size:
            raise UnsupportedModuleError(f"MoeLayer input has leading dimension {x.shape[0]}, but the batch "
                                         f"has {rec.batch_size} examples")
        tokens = x.detach().reshape(-1, x.shape[-1])  # N dim
        per_example = tokens.shape[0] // max(rec.batch_size, 1)
        example = torch.arange(tokens.shape[0], device=x.device) // max(per_example, 1)
        if rec.groups is not None:
            example = rec.groups.to(x.device)[example]
        # The router's choice is a deterministic function of its logits: the same top-k as MoeLayer.forward.
        top = torch.topk(rec.moe_logits.pop(moe), moe.num_experts_per_tok, dim=-1).indices  # N k
        marks = rec.moe_marks.pop(moe)
        for e, expert in enumerate(moe.experts):
            token_idx, _ = torch.where(top == e)
            new = [cap for sub in expert.modules() if sub in marks for cap in rec.captures[sub][marks[sub]:]]
            rows = tokens[token_idx]
            matched = any(isinstance(c.saved, torch.Tensor) and c.saved.shape == rows.shape
                          and torch.equal(c.saved, rows) for c in new)
            if new and not matched:
                raise UnsupportedModuleError(
                    f"could not recover the routing of {type(moe).__name__} expert {e}: its input rows are "
                    "not tokens[where(top_k == e)]")
            layout = RowIndex.from_groups(example[token_idx], rec.num_groups)
            for cap in new:
                cap.layout, cap.pending_moe = layout, False

    # -- backward: per-example norms as gradients arrive -------------------------------------------
    def _on_grad(self, rec: _Recording, cap: _Capture, grad_out: torch.Tensor) -> None:
        if rec.closed:
            raise RuntimeError("a recorded forward was back-propagated after its engine.record() block "
                               "closed; call backward inside the block")
        if cap.done:
            raise RuntimeError(f"{cap.name} received a second gradient: back-propagate each recorded forward "
                               "once")
        cap.done = True
        rec.grads_seen += 1
        if cap.pending_moe:
            raise UnsupportedModuleError(f"{cap.name} runs inside an MoE expert whose routing was not seen")
        if any(t._version != v for t, v in cap.versions):
            raise UnsupportedModuleError(
                f"the input of {cap.name} ({type(cap.module).__name__}) was modified in place after the "
                "forward; use out-of-place operations there")
        cap.versions = []
        if not rec.num_groups:
            return
        rule = cap.rule
        layout = cap.layout
        if layout is None:
            lead = rule.rows_of(cap.saved)
            feat = rule.feat_dims_of(cap.module)
            rows = math.prod(lead.shape[:lead.dim() - feat]) if lead.dim() >= feat else 0
            layout = rec.default_layout(rows, grad_out.device)
        want = [n for n, _ in cap.params]
        contributions = rule.contributions(cap.module, cap.saved, grad_out.detach(), layout, want, rec)
        cap.saved = None
        params = dict(cap.params)
        for pname, contribution in contributions.items():
            param = params[pname]
            if rec.use_count[param] == 1:
                rec.sq_norms.append(contribution.sq_norms())
                if isinstance(contribution, LinearGhost):
                    contribution.gram_a = None  # only the clipped sum is still to come
            rec.contribs[param].append(contribution)

    def _finish(self, rec: _Recording) -> None:
        captured = sum(len(c) for c in rec.captures.values())
        if captured and rec.grads_seen == 0:
            raise RuntimeError("engine.record(): the forward ran but no gradient reached its layers; call "
                               "engine.backward(per_example_losses) (or loss.backward()) inside the block")
        groups = rec.num_groups or 0
        dtype = self._named[0][1].dtype if self._named else torch.float32
        parts = [sq.to(torch.promote_types(sq.dtype, torch.float32)) for sq in rec.sq_norms]
        parts += [combined_sq_norms(uses) for param, uses in rec.contribs.items() if rec.use_count[param] > 1]
        if parts:
            sq = torch.stack([p.to(parts[0].dtype) for p in parts]).sum(0)
        else:
            sq = torch.zeros(groups, dtype=torch.promote_types(dtype, torch.float32))
        norms = sq.clamp(min=0).sqrt()
        clip = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        if rec.contribs:
            sums = self._running_sums()
            for param, uses in rec.contribs.items():
                for use in uses:
                    use.add_clipped_sum_(sums[param], clip)
        self.per_example_norms, self.clip_factors = norms, clip
        self.examples_in_step += groups

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

    # -- the step -----------------------------------------------------------------------------------
    def clipped_grad_sum(self) -> dict[str, torch.Tensor]:
        """sum_i c_i g_i over the examples recorded since the last step, per parameter (no noise)."""
        return {n: self._sums[p].clone() if p in self._sums else torch.zeros_like(p) for n, p in self._named}

    def add_noise_and_set_grads(self, expected_batch_size: float) -> None:
        """Set each trainable parameter's `.grad` to (clipped sum + N(0, (sigma C)^2 I)) / expected_batch_size
        and start a new step. Call once per logical batch, also when it was empty (noise only). The
        gradients are views into one buffer per (device, dtype), freshly allocated at every step.

        `expected_batch_size` is q N for Poisson sampling with rate q over N examples: a constant, so the
        normalisation does not depend on the (private) realised batch size."""
        if self._rec is not None:
            raise RuntimeError("add_noise_and_set_grads() inside an engine.record() block")
        if not (isinstance(expected_batch_size, (int, float)) and math.isfinite(expected_batch_size)
                and expected_batch_size > 0):
            raise PrivacyParameterError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
        std = self.noise_multiplier * self.max_grad_norm
        self._noise.next_step()
        for (device, dtype), params in self._buckets().items():
            numel = sum(p.numel() for p in params)
            noisy = self._noise.normal(torch.Size([numel]), std / expected_batch_size, device, dtype)
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
