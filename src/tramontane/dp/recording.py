"""Hook recording for DP-SGD: every example's share of each layer's parameter gradient, from one forward and
one backward pass, and from those each example's gradient norm.

How (the clipping and noise built on it are `engine.py`'s):

1. `Recorder.recording()` hooks every module with trainable parameters and freezes the parameters
   (requires_grad=False) for the recorded forward, so autograd propagates only activation gradients: the
   parameter gradients non-private training would compute are never formed. Forward hooks keep each
   layer's input; a hook on each layer's output receives its gradient during the single backward pass.
2. In that hook, the module's rule (`rules.py`, looked up by module type) turns (input, output gradient)
   into every example's share of the gradient (`Contribution`s: ghost norms or materialised per-example
   gradients, whichever is cheaper), keeping only what the clipped sum will need.
3. When the block closes, `Recording.per_example_norms()` adds up the squared norms over all parameters,
   and `Recording.add_clipped_sums_()` re-weights what each layer kept into sum_i c_i g_i ("book-keeping",
   Bu et al. 2023, "Differentially private optimization on large model at small cost"): no second
   backward pass.

A parameter used several times (tied embedding and output head, a layer called twice) gets the norm of its
*total* per-example gradient, cross terms included. Modules with a registered `RoutingRule` (mixtures of
experts) send token rows of several examples to each branch: the rows each branch got are recovered from
the router's output when the module's forward returns, and each is charged to its example.

Assumptions (the caller's side, see `engine.py`): dim 0 of the model's input is the example axis and no
module mixes examples; every trainable parameter is used only through its module's forward. Checked here
at run time: every hooked layer's dim 0 equals the number of examples (or, for a router, a multiple of it),
one forward and one backward per block, inputs not modified in place after the forward.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from tramontane.dp.contributions import Contribution, LinearGhost, combined_sq_norms
from tramontane.dp.rows import ByExample, Layout, RowIndex
from tramontane.dp.rules import FunctionalRule, RoutingRule, Rule, registered_rule, routing_for, rule_for
from tramontane.errors import DPInputError, DPUsageError, UnsupportedModuleError


@dataclass
class _Capture:
    """One forward call of a hooked module."""

    module: nn.Module
    name: str
    rule: Rule
    params: list[tuple[str, nn.Parameter]]
    saved: Any
    layout: Layout | None = None  # None: the recording's default (dim 0 = examples)
    pending_route: bool = False  # a routed branch's rows, example indices to come from the router's hook
    done: bool = False
    versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)


@dataclass
class Recording:
    """State of one recorded micro-batch; also the `RuleContext` the rules run in."""

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
    route_marks: dict[nn.Module, dict[nn.Module, int]] = field(default_factory=dict)
    router_outputs: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    _layouts: dict[tuple, Layout] = field(default_factory=dict)
    _pads: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _grams: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def set_batch_size(self, batch: int) -> None:
        if self.batch_size is not None and batch != self.batch_size:
            raise DPInputError(f"the model was called with {batch} examples, but the recording expects "
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

    # -- results (after the block closed) -----------------------------------------------------------
    def per_example_norms(self, dtype: torch.dtype) -> torch.Tensor:
        """[G] each example's gradient norm over all trainable parameters (`dtype`: of the parameters, for
        an empty recording)."""
        captured = sum(len(c) for c in self.captures.values())
        if captured and self.grads_seen == 0:
            raise DPUsageError("engine.record(): the forward ran but no gradient reached its layers; call "
                               "engine.backward(per_example_losses) (or loss.backward()) inside the block")
        groups = self.num_groups or 0
        parts = [sq.to(torch.promote_types(sq.dtype, torch.float32)) for sq in self.sq_norms]
        parts += [combined_sq_norms(uses) for param, uses in self.contribs.items()
                  if self.use_count[param] > 1]
        if parts:
            sq = torch.stack([p.to(parts[0].dtype) for p in parts]).sum(0)
        else:
            sq = torch.zeros(groups, dtype=torch.promote_types(dtype, torch.float32))
        return sq.clamp(min=0).sqrt()

    def add_clipped_sums_(self, sums: dict[nn.Parameter, torch.Tensor], clip: torch.Tensor) -> None:
        """sums[p] += sum_i clip_i g_i(p) for every parameter p the recording saw (clip: [G])."""
        for param, uses in self.contribs.items():
            for use in uses:
                use.add_clipped_sum_(sums[param], clip)


class Recorder:
    """The hook plan of one model: which rule handles each module with trainable parameters, which modules
    route rows to branches; `recording()` records one micro-batch with it.

    Args:
        model: any nn.Module; the parameters recorded are those with requires_grad=True now.
        linear_strategy: "auto", "ghost" or "materialize" (see `rules.LinearRule`).
    """

    def __init__(self, model: nn.Module, linear_strategy: str) -> None:
        self.model, self.linear_strategy = model, linear_strategy
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied: listed once
        self.plan = self._plan_hooks(model)
        self.routed: dict[nn.Module, nn.Module] = {}  # submodule of a branch -> the routing module
        self.routers: dict[nn.Module, nn.Module] = {}  # router child -> the routing module
        self.routings: dict[nn.Module, RoutingRule] = {}
        for module in model.modules():
            routing = routing_for(module)
            if routing is None:
                continue
            self.routings[module] = routing
            self.routers[routing.router(module)] = module
            for branch in routing.branches(module):
                for sub in branch.modules():
                    self.routed[sub] = module

    @staticmethod
    def _plan_hooks(model: nn.Module) -> dict[nn.Module, tuple[str, Rule, list[tuple[str, nn.Parameter]]]]:
        """module -> (qualified name, rule, its trainable parameters) for every module owning some."""
        plan: dict[nn.Module, tuple[str, Rule, list[tuple[str, nn.Parameter]]]] = {}
        inside_unit: set[nn.Module] = set()
        for name, module in model.named_modules():
            if module in inside_unit:
                continue
            rule = registered_rule(module)
            if rule.subtree:
                inside_unit.update(m for m in module.modules() if m is not module)
                params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
                if params:
                    plan[module] = (name or "<root>", rule, params)
                continue
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if params:
                plan[module] = (name or "<root>", rule_for(module, {n for n, _ in params}), params)
        return plan

    def describe(self) -> dict[str, str]:
        """Which rule handles each module with trainable parameters (for logs and reports)."""
        return {name: type(rule).__name__ for name, rule, _ in self.plan.values()}

    @contextmanager
    def recording(self, example_ids: torch.Tensor | Sequence[int] | None = None,
                  batch_size: int | None = None) -> Iterator[Recording]:
        """Hooks on, parameters frozen, for one forward and one backward pass; all undone on exit, and the
        yielded `Recording` closed (a later backward into it raises)."""
        rec = Recording(self.linear_strategy)
        if example_ids is not None:
            ids = torch.as_tensor(example_ids)
            if ids.dim() != 1:
                raise DPInputError(f"example_ids must be 1-D [B], got shape {tuple(ids.shape)}")
            _, rec.groups = torch.unique(ids, return_inverse=True)
            rec.num_groups = int(rec.groups.max()) + 1 if ids.numel() else 0
            rec.set_batch_size(ids.numel())
        if batch_size is not None:
            rec.set_batch_size(batch_size)
        handles = self._install_hooks(rec)
        frozen = [p for _, p in self.named]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)
            rec.active, rec.closed = False, True

    # -- hooks --------------------------------------------------------------------------------------
    def _install_hooks(self, rec: Recording) -> list[Any]:
        handles = [self.model.register_forward_pre_hook(partial(self._on_root, rec), with_kwargs=True)]
        for module in self.plan:
            handles.append(module.register_forward_hook(partial(self._on_forward, rec), with_kwargs=True))
        for router, module in self.routers.items():
            handles.append(router.register_forward_hook(partial(self._on_router, rec, module)))
        for module in self.routings:
            handles.append(module.register_forward_pre_hook(partial(self._on_route_start, rec)))
            handles.append(module.register_forward_hook(partial(self._on_route_end, rec)))
        return handles

    def _on_root(self, rec: Recording, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not rec.active or not torch.is_grad_enabled():
            return
        rec.root_calls += 1
        if rec.root_calls > 1:
            raise DPUsageError("the model ran twice in one engine.record() block; record one forward "
                               "(one micro-batch) per block")
        tensors = (t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0)
        first = next(tensors, None)
        if first is not None:
            rec.set_batch_size(first.shape[0])

    def _on_forward(self, rec: Recording, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not rec.active or not torch.is_grad_enabled():
            return None
        name, rule, params = self.plan[module]
        if rec.grads_seen:
            raise UnsupportedModuleError(
                f"{name} ran forward after the backward pass started (activation checkpointing, or a second "
                "forward in one engine.record() block); neither is supported")
        output_leaf: int | None = None
        leaves: list[Any] = []
        spec: TreeSpec | None = None
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
        assert rec.batch_size is not None
        routed = self.routed.get(module)
        if routed is not None and isinstance(rule, FunctionalRule):
            raise UnsupportedModuleError(
                f"{name} ({type(module).__name__}) runs inside a branch of {type(routed).__name__}, on rows "
                "of several examples mixed; only nn.Linear, nn.Embedding and norm layers are supported there")
        if module in self.routers:  # the router sees [B*T, dim]: example-major token rows
            ok = lead.dim() > 0 and lead.shape[0] % max(rec.batch_size, 1) == 0
        else:
            ok = routed is not None or (lead.dim() > 0 and lead.shape[0] == rec.batch_size)
        if not ok:
            raise UnsupportedModuleError(
                f"{name} ({type(module).__name__}) got an input with leading dimension "
                f"{tuple(lead.shape[:1])}, but the batch has {rec.batch_size} examples: dim 0 must be the "
                "example axis in every layer with trainable parameters")
        cap = _Capture(module, name, rule, params, saved, pending_route=routed is not None,
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
                assert spec is not None
                replaced = tree_unflatten(leaves, spec)
        target.register_hook(partial(self._on_grad, rec, cap))
        return replaced

    # -- routing: recover which example each branch row belongs to ---------------------------------
    def _on_router(self, rec: Recording, module: nn.Module, router: nn.Module, args: tuple,
                   output: Any) -> None:
        if rec.active and torch.is_grad_enabled():
            rec.router_outputs[module] = output.detach()

    def _on_route_start(self, rec: Recording, module: nn.Module, args: tuple) -> None:
        if rec.active and torch.is_grad_enabled():
            rec.route_marks[module] = {sub: len(rec.captures[sub]) for sub, m in self.routed.items()
                                       if m is module and sub in self.plan}

    def _on_route_end(self, rec: Recording, module: nn.Module, args: tuple, output: Any) -> None:
        if not rec.active or not torch.is_grad_enabled():
            return
        x = args[0]
        assert rec.batch_size is not None and rec.num_groups is not None
        kind = type(module).__name__
        if x.shape[0] != rec.batch_size:
            raise UnsupportedModuleError(f"{kind} input has leading dimension {x.shape[0]}, but the batch "
                                         f"has {rec.batch_size} examples")
        tokens = x.detach().reshape(-1, x.shape[-1])  # N dim
        per_example = tokens.shape[0] // max(rec.batch_size, 1)
        example = torch.arange(tokens.shape[0], device=x.device) // max(per_example, 1)
        if rec.groups is not None:
            example = rec.groups.to(x.device)[example]
        routing = self.routings[module]
        rows_of_branch = routing.branch_rows(module, rec.router_outputs.pop(module))
        marks = rec.route_marks.pop(module)
        for b, (branch, token_idx) in enumerate(zip(routing.branches(module), rows_of_branch)):
            new = [cap for sub in branch.modules() if sub in marks for cap in rec.captures[sub][marks[sub]:]]
            rows = tokens[token_idx]
            matched = any(isinstance(c.saved, torch.Tensor) and c.saved.shape == rows.shape
                          and torch.equal(c.saved, rows) for c in new)
            if new and not matched:
                raise UnsupportedModuleError(
                    f"could not recover the routing of {kind} branch {b}: its input rows are not the rows "
                    f"{type(routing).__name__}.branch_rows gives")
            layout = RowIndex.from_groups(example[token_idx], rec.num_groups)
            for cap in new:
                cap.layout, cap.pending_route = layout, False

    # -- backward: per-example norms as gradients arrive -------------------------------------------
    def _on_grad(self, rec: Recording, cap: _Capture, grad_out: torch.Tensor) -> None:
        if rec.closed:
            raise DPUsageError("a recorded forward was back-propagated after its engine.record() block "
                               "closed; call backward inside the block")
        if cap.done:
            raise DPUsageError(f"{cap.name} received a second gradient: back-propagate each recorded forward "
                               "once")
        cap.done = True
        rec.grads_seen += 1
        if cap.pending_route:
            raise UnsupportedModuleError(f"{cap.name} runs inside a routed branch whose routing was not seen")
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
