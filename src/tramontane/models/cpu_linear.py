"""Inference-time linear layers on CPU through the faster of torch's two float kernels, picked per shape.

torch's float32 `linear` on CPU goes to MKL, which takes its generic (non-AVX-512) path on non-Intel
processors; its bfloat16 `linear` goes to oneDNN but reorders the weight on every call. A weight reordered
once into oneDNN's layout (`torch.ops.mkldnn._reorder_linear_weight`) and run by
`torch.ops.mkldnn._linear_pointwise` (the pair torch.compile's CPU freezing pass emits; dense input and
output, so no `to_mkldnn` round trip) was, on a 2-core AMD EPYC (AVX-512 bf16), against `F.linear` at 1 / 16
rows: float32 768x2560 1.7x / 1.9x faster, 2560x768 1.2x / 1.7x, the 768x32000 head 1.3x / 5x, but 768x768
and 768x256 1.5-2x slower at 1 row (call overhead) and faster at 16; bfloat16 1.3-2x faster for every shape
at 1 and 16 rows. Which wins depends on the processor, the shape and the thread count, so `pack_linear` times
both on the layer's own weight, once per (in, out, dtype, bias, rows) and process, and packs only where that
wins by `MARGIN`.

A `PackedLinear` holds only the packed weight (the float parameter is dropped, so memory does not double;
packing briefly needs about two copies of the layer being packed). It is for inference: it refuses to run in
train mode or on inputs that require grad (`UnsupportedModuleError`). `state_dict` still writes a dense
`weight` (an unpacked copy), so a packed model saves as it loaded, and `load_state_dict` packs the loaded
weight again. Results equal `F.linear`'s to float rounding (the kernels sum in another order).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tramontane.errors import UnsupportedModuleError

logger = logging.getLogger(__name__)
_M = TypeVar("_M", bound=nn.Module)

DTYPES = (torch.float32, torch.bfloat16)
ROWS = (1, 16)  # decode at batch 1 and a serving step of 16 sequences; the timed cost is their sum
MARGIN = 0.1  # the packed kernel must be this much (relative) faster to be used
_REPEATS = 3
# (in, out, dtype, bias, rows) -> the packing batch hint that won (None also a valid hint), or False: F.linear
_CHOICES: dict[tuple[Any, ...], int | None | bool] = {}


def _available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward over a oneDNN-packed copy of its weight (inference only: see the module
    docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, hint: int | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.hint = hint
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), hint)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.train(False)

    @property
    def weight(self) -> torch.Tensor:
        """An unpacked copy of the weight [out, in] (a new tensor on every read)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (x.requires_grad and torch.is_grad_enabled()):
            raise UnsupportedModuleError(
                "this linear layer was packed for inference (models.cpu_linear.prepack_for_inference): it "
                "has no trainable weight; load the model again without prepacking to train or fine-tune it")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict.pop(key)  # load_state_dict works on a copy of the caller's dict
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(weight.shape)}, the packed layer is "
                                  f"{(self.out_features, self.in_features)}")
            else:
                weight = weight.detach().to(self.dtype)
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.hint)
        else:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.dtype}, hint={self.hint}")


def _seconds(fn: Any, inputs: list[torch.Tensor]) -> float:
    """Summed over the row counts, the best of `_REPEATS` timed calls after one warm-up call."""
    total = 0.0
    for x in inputs:
        fn(x)
        best = float("inf")
        for _ in range(_REPEATS):
            start = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - start)
        total += best
    return total


def _packable(linear: nn.Module) -> bool:
    return (type(linear) is nn.Linear and linear.weight.device.type == "cpu" and linear.weight.dtype in DTYPES
            and (linear.bias is None or linear.bias.dtype == linear.weight.dtype) and _available()
            and (linear.weight.dtype != torch.bfloat16 or _bf16_supported()))


def _bf16_supported() -> bool:
    """Whether oneDNN packs bfloat16 weights on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an
    AVX2-only CPU refuses): bfloat16 layers stay plain `nn.Linear` where it does not."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


@torch.no_grad()
def pack_linear(linear: nn.Module, rows: Sequence[int] = ROWS, always: bool = False) -> nn.Module:
    """A `PackedLinear` copy of `linear` when the packed kernel is faster for its shape at `rows` rows (or,
    with `always`, whenever it can be packed), else `linear` itself (also for anything but a plain CPU
    float32/bfloat16 `nn.Linear`). The choice is timed once per shape and process; `linear` is not changed."""
    if not _packable(linear):
        return linear
    assert isinstance(linear, nn.Linear)
    weight, bias = linear.weight, linear.bias
    if always:
        return PackedLinear(weight, bias, None)
    key = (linear.in_features, linear.out_features, weight.dtype, bias is not None, tuple(rows))
    if key in _CHOICES:
        choice = _CHOICES[key]
        return linear if choice is False else PackedLinear(weight, bias, choice)
    inputs = [torch.randn(r, linear.in_features, dtype=weight.dtype) for r in rows]
    base = _seconds(lambda x: F.linear(x, weight, bias), inputs)
    timed = {}
    for hint in (None, 1):  # the packing's batch-size hint; one packed copy alive at a time
        timed[hint] = _seconds(PackedLinear(weight, bias, hint), inputs)
    hint = min(timed, key=lambda h: timed[h])
    _CHOICES[key] = hint if timed[hint] < (1 - MARGIN) * base else False
    logger.debug("linear %s: F.linear %.3f ms, packed %s; chose %s", key, base * 1e3,
                 {h: round(t * 1e3, 3) for h, t in timed.items()}, _CHOICES[key])
    return pack_linear(linear, rows)


def prepack_for_inference(model: _M, rows: Sequence[int] = ROWS, always: bool = False) -> _M:
    """Freeze `model` (eval mode, no parameter requiring grad) and replace, in place, each plain CPU
    float32/bfloat16 `nn.Linear` whose shape runs faster packed (see `pack_linear`) by a `PackedLinear`,
    dropping its float weight. For models that only run inference (generation, serving): the packed layers
    refuse to train. Layers whose weight another module shares (a head tied to the embeddings) are left
    alone: packing them would keep two copies. `always` packs every eligible layer without timing (tests).
    Returns `model`."""
    model.eval().requires_grad_(False)  # frozen: plain inference needs no torch.no_grad()
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    swapped = 0
    # names, not modules: a list of the modules would keep every replaced float weight alive until the end
    for name in [name for name, module in model.named_modules() if _packable(module)]:
        module = model.get_submodule(name)
        if uses.get(id(module.weight), 0) > 1:
            continue
        packed = pack_linear(module, rows, always)
        if packed is module:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, packed)
        swapped += 1
    logger.info("packed %d linear layers for oneDNN", swapped)
    return model


__all__ = ["PackedLinear", "pack_linear", "prepack_for_inference"]
