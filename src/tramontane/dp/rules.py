"""Per-module rules, registered by module type: from what a layer's forward saw and the gradient of its
output, each example's share of the gradient of the layer's own parameters (as `Contribution`s, see
`contributions.py`).

A registry maps module types to rules, as Opacus registers a grad sampler per module type
(`register_rule(module_type, rule)`); `rule_for` looks a module up by walking its type's MRO. Generic rules,
registered here:

- `LinearRule` (nn.Linear over [B, d] or [B, T, ..., d]): per layer, the cheaper of ghost norms (keeps the
  input and output gradient, O(P^2 (i + o)) per example) and materialised per-example gradients
  (O(P i o) to build, then O(i o) to clip and sum); see `LinearRule.choose`.
- `EmbeddingRule` (nn.Embedding): token-sparse, never materialised.
- `NormRule` (nn.RMSNorm, nn.LayerNorm): exact per-example gradients of the small weight and bias.
- `FunctionalRule`: any other module with parameters (registered for nn.Module, the fallback), through
  torch.func (functional_call + vmap + grad): the module's forward is re-run once per example on its saved
  inputs, its parameters differentiated. nn.MultiheadAttention is one such unit with its children.

A second kind, `RoutingRule`, describes a module that sends each row of its input to some of its branches
(a mixture of experts): the recording asks it which rows each branch got, to charge them to their examples.

Model-specific rules live beside their models' integration (`mistral.py` for tramontane's RMSNorm and
MoeLayer) and register themselves; this module imports no model.

Every rule assumes the module treats the rows of its input independently (no mixing across examples);
`validate.py` refuses the layers known not to. A rule found for a base class applies to a subclass only if
the subclass runs the base's `forward` unchanged (a new forward may compute something else), unless the
rule differentiates whatever forward runs (`Rule.any_forward`, as `FunctionalRule` does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from tramontane.dp.contributions import Contribution, EmbeddingRows, LinearGhost, PerExample
from tramontane.dp.rows import Layout
from tramontane.errors import ConfigError, UnsupportedModuleError


class RuleContext(Protocol):
    """What a rule may ask of the recording it runs in."""

    linear_strategy: str
    batch_size: int | None

    def padded(self, x: torch.Tensor, layout: Layout) -> torch.Tensor: ...

    def gram(self, x: torch.Tensor, layout: Layout, padded: torch.Tensor) -> torch.Tensor: ...

    def is_shared(self, param: nn.Parameter) -> bool: ...

    def dim0_groups(self) -> tuple[torch.Tensor, int] | None: ...

    def suspended(self) -> Any: ...


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    x = args[0] if args else kwargs.get(name)
    assert isinstance(x, torch.Tensor)
    return x


class Rule(ABC):
    """How one module type's own parameters get per-example gradients."""

    param_names: tuple[str, ...] = ()
    tuple_outputs = False  # may the module return a tuple (one floating tensor in it)?
    feat_dims = 1  # trailing feature axes of the saved activation (rows are all the other axes)
    any_forward = False  # correct whatever the module's forward computes (so also for subclasses)?
    subtree = False  # one unit with the module's children: their parameters too, their calls not hooked

    def covers(self, module: nn.Module, names: set[str]) -> bool:
        return names <= set(self.param_names)

    def feat_dims_of(self, module: nn.Module) -> int:
        return self.feat_dims

    @abstractmethod
    def capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any,
                output_leaf: int | None) -> Any:
        """What to keep from the forward call (detached); `output_leaf`: which leaf of a tuple output is
        differentiated (None: the output is one tensor)."""
        ...

    def rows_of(self, saved: Any) -> torch.Tensor:
        """The saved tensor whose leading axes are the rows (for the layout checks)."""
        return saved

    def must_be_unmodified(self, saved: Any) -> list[torch.Tensor]:
        """Saved tensors that an in-place update after the forward would invalidate (checked by version)."""
        return [t for t in tree_flatten(saved)[0] if isinstance(t, torch.Tensor)]

    @abstractmethod
    def contributions(self, module: nn.Module, saved: Any, grad_out: torch.Tensor, layout: Layout,
                      want: list[str], ctx: RuleContext) -> dict[str, Contribution]:
        ...


class LinearRule(Rule):
    param_names = ("weight", "bias")

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any,
                output_leaf: int | None) -> torch.Tensor:
        return _first_tensor(args, kwargs, "input").detach()

    # Materialise while i o <= MATERIALIZE_RATIO * P (i + o).
    MATERIALIZE_RATIO = 1.0

    @classmethod
    def choose(cls, rows: int, fan_in: int, fan_out: int) -> str:
        """"materialize" when the per-example gradient [o, i] is no bigger than the input and output gradient
        it is built from (i o <= P (i + o)): then it is the cheaper in time too (building it costs what the
        clipped sum would, O(P i o); its norm and clipped sum then cost O(i o), against ghost's O(P^2 (i + o))
        for the norm), and costs no extra memory since the input and output gradient are dropped at once.
        "ghost" otherwise (long sequences, wide layers), keeping the smaller input and output gradient."""
        cheaper = fan_in * fan_out <= cls.MATERIALIZE_RATIO * rows * (fan_in + fan_out)
        return "materialize" if cheaper else "ghost"

    def contributions(self, module, saved, grad_out, layout, want, ctx):
        out: dict[str, Contribution] = {}
        if "weight" in want:
            a = ctx.padded(saved, layout)  # G P i
            g = layout.pad(grad_out)  # G P o
            if a.dtype != g.dtype:  # autocast: fp32 input, half-precision output gradient
                dtype = torch.promote_types(a.dtype, g.dtype)
                a, g = a.to(dtype), g.to(dtype)
            strategy = ctx.linear_strategy
            if strategy == "auto":
                shared = ctx.is_shared(module.weight)  # tied / reused: keep the factors for cross terms
                strategy = "ghost" if shared else self.choose(a.shape[1], a.shape[2], g.shape[2])
            if strategy == "ghost":
                out["weight"] = LinearGhost(a, g, ctx.gram(saved, layout, a))
            else:
                out["weight"] = PerExample(torch.bmm(g.transpose(1, 2), a))
        if "bias" in want:
            out["bias"] = PerExample(layout.per_example_sum(grad_out))
        return out


class EmbeddingRule(Rule):
    param_names = ("weight",)
    feat_dims = 0

    def capture(self, module, args, kwargs, output, output_leaf):
        return _first_tensor(args, kwargs, "input").detach()

    def contributions(self, module, saved, grad_out, layout, want, ctx):
        idx = saved.reshape(-1)
        g = grad_out.reshape(idx.numel(), -1)
        group = layout.row_groups(saved, feat_dims=0)
        return {"weight": EmbeddingRows(idx, g, group, layout.num_groups, module.num_embeddings,
                                        module.padding_idx)}


class NormRule(Rule):
    """Elementwise-affine normalisations: y = normalize(x) * weight (+ bias).

    The weight's per-example gradient is sum_rows normalize(x) * g. Without a bias, in float32/64, with no
    zero weight entry and an output not modified in place, normalize(x) = y / weight is read off the
    output (a few ulps from the forward's own value; one pass instead of recomputing the statistics);
    otherwise it is recomputed from the input exactly as forward computes it. Either way the norm and the
    clipped sum use the same per-example gradient, so the clipping bound holds exactly.

    Args:
        normalize: (module, x) -> normalize(x), with the same operations and dtypes as the module's forward.
        feat_dims: (module) -> how many trailing axes the module normalises over.
    """

    param_names = ("weight", "bias")

    def __init__(self, normalize: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 feat_dims: Callable[[nn.Module], int]) -> None:
        self.normalize, self._feat_dims = normalize, feat_dims

    def covers(self, module, names):
        return getattr(module, "elementwise_affine", True) and super().covers(module, names)

    def capture(self, module, args, kwargs, output, output_leaf):
        x, y = _first_tensor(args, kwargs, "input").detach(), output.detach()
        return x, x._version, y, y._version

    def rows_of(self, saved):
        return saved[0]

    def must_be_unmodified(self, saved):
        return []  # checked here: either the output or the input will do

    def _normalized(self, module: nn.Module, saved: tuple) -> torch.Tensor:
        x, x_version, _, _ = saved
        if x._version != x_version:
            raise UnsupportedModuleError(
                f"the input and the output of {type(module).__name__} were both modified in place after the "
                "forward; its per-example gradient cannot be computed")
        return self.normalize(module, x)

    def feat_dims_of(self, module):
        return self._feat_dims(module)

    def contributions(self, module, saved, grad_out, layout, want, ctx):
        feat = self.feat_dims_of(module)
        out: dict[str, Contribution] = {}
        if "weight" in want:
            _, _, y, y_version = saved
            weight = module.weight.detach()
            if (getattr(module, "bias", None) is None and y._version == y_version
                    and y.dtype in (torch.float32, torch.float64) and bool((weight != 0).all())):
                # sum_t normalize(x_t) g_t = (sum_t y_t g_t) / w: one pass over the rows
                per_example = layout.per_example_sum(y * grad_out, feat) / weight
            else:
                per_example = layout.per_example_sum(self._normalized(module, saved) * grad_out, feat)
            out["weight"] = PerExample(per_example)
        if "bias" in want:
            out["bias"] = PerExample(layout.per_example_sum(grad_out, feat))
        return out


class FunctionalRule(Rule):
    """Any module with parameters: per-example gradients by torch.func, from the saved inputs.

    `subtree`: the module and its children are one unit, all their parameters differentiated here (for
    modules such as nn.MultiheadAttention that use their children's weights directly instead of calling
    the children)."""

    tuple_outputs = True
    any_forward = True

    def __init__(self, subtree: bool = False) -> None:
        self.subtree = subtree

    def covers(self, module, names):
        return True

    def capture(self, module, args, kwargs, output, output_leaf):
        leaves, spec = tree_flatten((args, kwargs))
        return [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], spec, output_leaf

    def rows_of(self, saved):
        leaves, _, _ = saved
        tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0]
        return tensors[0] if tensors else torch.empty(0)

    def contributions(self, module, saved, grad_out, layout, want, ctx):
        batch = grad_out.shape[0]
        if batch != ctx.batch_size:
            raise UnsupportedModuleError(
                f"{type(module).__name__} returns {batch} rows for a batch of {ctx.batch_size} examples: "
                "dim 0 of its output must be the example axis")
        leaves, spec, output_leaf = saved
        batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch for t in leaves]
        inputs = [t for t, b in zip(leaves, batched) if b]
        params = {n: p.detach() for n, p in module.named_parameters(recurse=self.subtree) if n in want}

        def example_loss(params: dict, inputs_i: list, g_i: torch.Tensor) -> torch.Tensor:
            it = iter(inputs_i)
            filled = [next(it).unsqueeze(0) if b else t for t, b in zip(leaves, batched)]
            args, kwargs = tree_unflatten(filled, spec)
            out = functional_call(module, params, args, kwargs)
            if output_leaf is not None:
                out = tree_flatten(out)[0][output_leaf]
            return (out * g_i.unsqueeze(0)).sum()

        with ctx.suspended():
            try:
                grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, inputs, grad_out)
            except RuntimeError as err:
                raise UnsupportedModuleError(
                    f"per-example gradients of {type(module).__name__} could not be computed with "
                    f"torch.func ({err}); randomness (dropout) or in-place updates inside a module with "
                    "parameters are not supported") from err
        grouping = ctx.dim0_groups()
        out: dict[str, Contribution] = {}
        for name, per_row in grads.items():
            if grouping is not None:
                groups, num = grouping
                per_row = per_row.new_zeros(num, *per_row.shape[1:]).index_add_(0, groups.to(per_row.device),
                                                                                 per_row)
            out[name] = PerExample(per_row)
        return out


class RoutingRule(ABC):
    """A module that sends each row of its input [B, ..., d] (flattened example-major to [N, d]) to some of
    its branches, chosen by a router child that scores every row: a mixture of experts. Each branch then sees
    rows of several examples mixed; the recording keeps the router's output and, when the module's forward
    returns, asks `branch_rows` which rows each branch got, so that every row is charged to its example.

    The branches may hold only layers whose rules take an explicit row layout (nn.Linear, nn.Embedding,
    norms); the functional rule needs dim 0 to be the example axis and is refused there."""

    @abstractmethod
    def router(self, module: nn.Module) -> nn.Module:
        """The child that scores the flattened rows [N, d]; its output decides the routing."""

    @abstractmethod
    def branches(self, module: nn.Module) -> Sequence[nn.Module]:
        """The children that each receive a subset of the rows."""

    @abstractmethod
    def branch_rows(self, module: nn.Module, router_output: torch.Tensor) -> list[torch.Tensor]:
        """For each branch, the indices [n_e] of the flattened rows it was fed, in the order it saw them
        (recomputed from the router's output exactly as the module's forward chooses them)."""


_RULES: dict[type[nn.Module], Rule] = {}
_ROUTING: dict[type[nn.Module], RoutingRule] = {}


def register_rule(module_type: type[nn.Module], rule: Rule | RoutingRule) -> None:
    """Register `rule` for `module_type` and its subclasses that keep its `forward` (see the module
    docstring); a later registration for the same type replaces the earlier one. A `Rule` computes the
    per-example gradients of the module's own parameters; a `RoutingRule` describes how the module routes
    rows to its children (both may be registered for one type)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ConfigError(f"register_rule takes an nn.Module subclass, got {module_type!r}")
    if isinstance(rule, Rule):
        _RULES[module_type] = rule
    elif isinstance(rule, RoutingRule):
        _ROUTING[module_type] = rule
    else:
        raise ConfigError(f"register_rule takes a Rule or a RoutingRule, got {type(rule).__name__}: subclass "
                          "tramontane.dp.rules.Rule")


def _lookup(module: nn.Module, table: dict[type[nn.Module], Any]) -> Any:
    """The rule of the nearest class in type(module)'s MRO with one that applies to `module`, or None."""
    kind = type(module)
    own_forward = "forward" in vars(module)  # patched on the instance: only forward-agnostic rules apply
    for cls in kind.__mro__:
        rule = table.get(cls)
        if rule is not None and (getattr(rule, "any_forward", False)
                                 or (not own_forward and kind.forward is getattr(cls, "forward", None))):
            return rule
    return None


def registered_rule(module: nn.Module) -> Rule:
    """The rule registered for `module`'s type (walking its MRO; the functional rule at the latest)."""
    rule = _lookup(module, _RULES)
    assert rule is not None, "nn.Module has the functional rule registered"
    return rule


def rule_for(module: nn.Module, names: set[str]) -> Rule:
    """The rule for a module whose own trainable parameters are `names`: its registered rule when that covers
    them, else the functional rule."""
    rule = registered_rule(module)
    return rule if rule.covers(module, names) else _FUNCTIONAL


def routing_for(module: nn.Module) -> RoutingRule | None:
    """The routing rule registered for `module`'s type (walking its MRO), or None."""
    return _lookup(module, _ROUTING)


def _layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.LayerNorm)
    return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.RMSNorm)
    return F.rms_norm(x, module.normalized_shape, None, module.eps)


def _normalized_dims(module: nn.Module) -> int:
    assert isinstance(module, (nn.LayerNorm, nn.RMSNorm))
    return len(module.normalized_shape)


_FUNCTIONAL = FunctionalRule()
register_rule(nn.Module, _FUNCTIONAL)
register_rule(nn.Linear, LinearRule())
register_rule(nn.Embedding, EmbeddingRule())
register_rule(nn.LayerNorm, NormRule(_layer_norm, _normalized_dims))
register_rule(nn.RMSNorm, NormRule(_rms_norm, _normalized_dims))
register_rule(nn.MultiheadAttention, FunctionalRule(subtree=True))
