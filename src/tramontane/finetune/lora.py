"""LoRA adapters (Hu et al. 2021, "LoRA: Low-rank adaptation of large language models") on tramontane's
`Transformer`: W x becomes W x + (alpha / r) B A x with W frozen and only A [r, in] and B [out, r] trained.

Targets are our module names, matched as PEFT matches `target_modules`, by the module's own (last) name:

    wq wk wv wo        attention projections of every layer
    w1 w2 w3           the SwiGLU projections of every FFN: the dense FFN's AND every MoE expert's (PEFT's
                       suffix rule: `w1` alone hits both; a model is either dense or a mixture of experts)
    attention          = wq wk wv wo
    mlp                = w1 w2 w3 of the dense FFN (matches nothing in a mixture of experts)
    experts            = w1 w2 w3 inside every MoE expert (`layers.i.feed_forward.experts.e.w1`, ...)
    all                = attention + mlp + experts, whichever the model has

Two `LoraConfig`s adapting the same layers the same way compare equal, however their targets are spelled.
The MoE router (`gate`) is never adaptable: a change to it changes which experts each token is routed to.
Embeddings and the output head are not adaptable either (with tied embeddings they are one matrix).

`LoraLinear` keeps the frozen base `nn.Linear` as `base` and the adapter as two real `nn.Linear` children,
`lora_A` and `lora_B`, always called through their forward: the DP engine (`tramontane.dp`) hooks nn.Linear
modules with trainable parameters, so the adapters get exact per-example gradients with no LoRA-specific rule,
inside MoE experts too (the routing rule charges each expert row to its example). One limit there: with
`dropout > 0` on expert adapters no expert layer sees the routed rows unchanged, so the engine cannot check
the routing and refuses the model (UnsupportedModuleError); train expert adapters with dropout 0.

Adapters are kept in float32 (float64 over a float64 base) even when the base is cast to bfloat16/float16
(`add_lora(base_dtype=...)`): the adapter path runs in the adapter dtype and its output is cast to the base's.

The base may be quantized (`models.quant.quantize_model` before `add_lora`, QLoRA-style): a quantized layer
holds no parameters, and in training mode (or with an input that needs a gradient) it runs as the float layer
with its dequantized weight, so gradients flow through it to the adapters below. Such adapters cannot be merged
into the int8/int4 weight (`merge_lora` refuses): merge them into the float checkpoint instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from tramontane.errors import ConfigError
from tramontane.models.layers import Attention, FeedForward
from tramontane.models.moe import MoeLayer
from tramontane.models.quant import QuantizedLinear
from tramontane.tensorfiles import check_tensors, resolve_dtype

ATTENTION = ("wq", "wk", "wv", "wo")
FFN = ("w1", "w2", "w3")
GROUPS = ("attention", "mlp", "experts", "all")
TARGETS = (*ATTENTION, *FFN, *GROUPS)

_NAMES = {"attention": ATTENTION, "mlp": FFN, "experts": FFN, "all": (*ATTENTION, *FFN)}  # for equality
_M = TypeVar("_M", bound=nn.Module)
_Slot = tuple[str, str]  # (kind, leaf name): kind "attention", "mlp" (dense FFN) or "experts"


def _slots(target: str) -> set[_Slot]:
    """The (kind, leaf) slots one target name covers."""
    if target in ATTENTION:
        return {("attention", target)}
    if target in FFN:
        return {("mlp", target), ("experts", target)}
    if target == "attention":
        return {("attention", n) for n in ATTENTION}
    if target in ("mlp", "experts"):
        return {(target, n) for n in FFN}
    assert target == "all", target
    return {("attention", n) for n in ATTENTION} | {(k, n) for k in ("mlp", "experts") for n in FFN}


@dataclass(frozen=True)
class LoraConfig:
    """Which linear layers get a rank-`rank` adapter, and its scaling `alpha / rank` (`alpha / sqrt(rank)`
    with `use_rslora`, Kalajdzievski 2023). `dropout` applies to the adapter's input only (as in PEFT)."""

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ConfigError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r} (the scaling is "
                              "alpha / rank; 2 * rank is a common choice)")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0 <= self.dropout < 1):
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise ConfigError(f"LoRA targets are empty; name some of {list(TARGETS)}")
        for target in targets:
            if target == "gate":
                raise ConfigError(
                    "LoRA target 'gate' (the MoE router) is not adaptable: changing it changes which experts "
                    "each token is routed to. Adapt the experts instead (target 'experts' or w1 w2 w3)")
            if target not in TARGETS:
                raise ConfigError(f"unknown LoRA target {target!r}; choose among {list(TARGETS)} (module "
                                  "names wq wk wv wo w1 w2 w3, or the groups attention, mlp, experts, all)")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        object.__setattr__(self, "use_rslora", bool(self.use_rslora))

    def _key(self) -> tuple:
        names = frozenset(n for t in self.targets for n in _NAMES.get(t, (t,)))
        return self.rank, float(self.alpha), float(self.dropout), names, self.use_rslora

    def __eq__(self, other: object) -> bool:
        """Equal when both adapt the same layers the same way on every model both apply to: `attention` is
        wq wk wv wo; `mlp`, `experts` are w1 w2 w3 (they only also refuse the other kind of model); `all` is
        all seven. So a loaded adapter's config (module names) equals the config it was trained with."""
        return isinstance(other, LoraConfig) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoraLinear(nn.Module):
    """base(x) + scaling * lora_B(lora_A(dropout(x))), `base` a frozen nn.Linear or quantized linear layer.

    Initialised as PEFT does: A Kaiming-uniform (a = sqrt(5)), B zero, so the adapted layer starts equal to
    the base. The adapters live on the base's device, in `dtype` (default: float32, or float64 over a float64
    base)."""

    def __init__(self, base: nn.Linear | QuantizedLinear, rank: int, alpha: float, dropout: float = 0.0, *,
                 use_rslora: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        base_dtype, device = ((base.dtype, base.device) if isinstance(base, QuantizedLinear)
                              else (base.weight.dtype, base.weight.device))
        dtype = dtype or torch.promote_types(base_dtype, torch.float32)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # .to() returns x itself when the dtypes agree: then an expert's lora_A sees exactly the rows the
        # router sent it, which the DP engine's routing check compares.
        a = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return out + (self.lora_B(a) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A [out, in], in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _adaptable(model: nn.Module) -> dict[str, _Slot]:
    """Qualified name -> slot of every linear layer LoRA may wrap (adapted already or not), in model order."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"LoRA adapts a tramontane Transformer (its `layers`); got {type(model).__name__}")
    found: dict[str, _Slot] = {}
    for i, block in enumerate(layers):
        attention, ffn = getattr(block, "attention", None), getattr(block, "feed_forward", None)
        if isinstance(attention, Attention):
            found |= {f"layers.{i}.attention.{n}": ("attention", n) for n in ATTENTION}
        if isinstance(ffn, MoeLayer):
            found |= {f"layers.{i}.feed_forward.experts.{e}.{n}": ("experts", n)
                      for e in range(len(ffn.experts)) for n in FFN}
        elif isinstance(ffn, FeedForward):
            found |= {f"layers.{i}.feed_forward.{n}": ("mlp", n) for n in FFN}
    return found


def lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The qualified names of the linear layers `config` adapts in `model`, in model order.

    Raises ConfigError when a target matches no layer of this model, e.g. `mlp` on a mixture of experts."""
    adaptable = _adaptable(model)
    kinds = {kind for kind, _ in adaptable.values()}
    for target in config.targets:
        if target != "all" and not any(kind in kinds for kind, _ in _slots(target)):
            hint = {"mlp": " (it is a mixture of experts: target 'experts')",
                    "experts": " (it has no mixture of experts: target 'mlp')"}.get(target, "")
            raise ConfigError(f"LoRA target {target!r} matches no layer of this model{hint}")
    wanted = set().union(*(_slots(t) for t in config.targets))
    return [name for name, slot in adaptable.items() if slot in wanted]


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Qualified name -> adapter wrapper of every adapted layer (empty: no adapters)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_lora(model: _M, config: LoraConfig, *,
             base_dtype: torch.dtype | str | None = None) -> _M:
    """Wrap the layers `config` targets in `LoraLinear` (in place) and freeze everything but the adapters.

    `base_dtype` (e.g. torch.bfloat16), when given, first casts the whole base model (embeddings and norms
    included) to it; the adapters are float32 (float64 over a float64 base). Refuses (ConfigError) a model
    that already has adapters (merge them with `merge_lora` first) and targets that match no layer; nothing
    is changed then. New adapters follow the model's train/eval mode. Returns `model`.
    """
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters; merge them first (merge_lora) or start from "
                          "a freshly loaded base model")
    names = lora_targets(model, config)
    dtype = resolve_dtype(base_dtype)
    if dtype is not None:
        model.to(dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        assert isinstance(base, (nn.Linear, QuantizedLinear)), name
        lora = LoraLinear(base, config.rank, config.alpha, config.dropout, use_rslora=config.use_rslora)
        lora.train(model.training)
        _replace(model, name, lora)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under our names, e.g. `layers.0.attention.wq.lora_A.weight` (detached, not
    copied)."""
    state = {}
    for name, lora in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = lora.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = lora.lora_B.weight.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter weights named as `lora_state_dict` names them into `model`'s adapters (cast to their
    dtype); every adapter weight must be given, with its shape, and nothing else (CheckpointError)."""
    own = lora_state_dict(model)
    if not own:
        raise ConfigError("the model has no LoRA adapters to load weights into; call add_lora first")
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in own.items()},
                  "the adapter weights do not fit the model's adapters")
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(state[key])


def merge_lora(model: _M) -> _M:
    """Fold every adapter into its base layer (W <- W + scaling B A, computed in the adapter dtype and rounded
    once to the base's) and put the plain nn.Linear back in place of the wrapper. Returns `model`."""
    adapters = lora_modules(model)
    if not adapters:
        raise ConfigError("the model has no LoRA adapters to merge")
    if any(isinstance(lora.base, QuantizedLinear) for lora in adapters.values()):
        raise ConfigError("the adapters sit on a quantized base, which cannot absorb them without rounding them "
                          "away; save the adapter, load it over the float checkpoint and merge there (then "
                          "quantize the merged model)")
    with torch.no_grad():
        for name, lora in adapters.items():
            assert isinstance(lora.base, nn.Linear), name
            weight = lora.base.weight
            merged = weight.to(lora.lora_A.weight.dtype) + lora.delta_weight()
            weight.copy_(merged.to(weight.dtype))
            _replace(model, name, lora.base)
    return model


def check_adapters(model: nn.Module, config: LoraConfig) -> dict[str, LoraLinear]:
    """The model's adapters, checked to be exactly those `config` describes (layers, rank, scaling,
    dropout); ConfigError otherwise."""
    adapters = lora_modules(model)
    if not adapters:
        raise ConfigError("the model has no LoRA adapters (call add_lora or load_adapter first)")
    expected = lora_targets(model, config)
    if set(adapters) != set(expected):
        missing = [n for n in expected if n not in adapters]
        extra = [n for n in adapters if n not in expected]
        raise ConfigError(f"the model's adapters do not match LoRA targets {list(config.targets)}: "
                          f"not adapted {missing[:5]}, adapted but not targeted {extra[:5]}")
    for name, lora in adapters.items():
        dropout = lora.lora_dropout.p if isinstance(lora.lora_dropout, nn.Dropout) else 0.0
        if (lora.rank != config.rank or not math.isclose(lora.scaling, config.scaling, rel_tol=1e-12)
                or dropout != config.dropout):
            raise ConfigError(f"adapter {name} has rank {lora.rank}, scaling {lora.scaling:g} and dropout "
                              f"{dropout:g}, but the LoRA config says rank {config.rank}, scaling "
                              f"{config.scaling:g} and dropout {config.dropout:g}")
    return adapters


__all__ = [
    "ATTENTION", "FFN", "GROUPS", "TARGETS", "LoraConfig", "LoraLinear", "add_lora",
    "check_adapters", "load_lora_state_dict", "lora_modules", "lora_state_dict", "lora_targets", "merge_lora",
]
