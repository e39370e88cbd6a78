"""Weight-only quantization of a Mistral decoder: int8 per output channel, int4 in groups of columns.

`quantize_model(model, "int8" | "int4")` replaces the decoder's linear layers (attention `wq wk wv wo`, the
feed-forward `w1 w2 w3`, every MoE expert's; never the MoE router `gate`) by `Int8Linear` / `Int4Linear`,
optionally the output head too, and the token embeddings by a `QuantizedEmbedding`. Activations stay in the
model's dtype; only the stored weights shrink, so decoding at batch 1, which reads every weight once per token,
reads 1 byte (int8) or ~0.56 byte (int4, groups of 64) per weight instead of 4 (float32) or 2 (bfloat16).

Quantization (round to nearest, computed in float32 from the float weights W [out, in]):
- int8, symmetric per output row o: scale[o] = max_i |W[o, i]| / 127 (rounded to bfloat16 first),
  q[o, i] = clamp(round(W[o, i] / scale[o]), -127, 127); W ~ q * scale.
- int4, asymmetric per row and group of `group_size` consecutive columns (g = i // group_size):
  scale[o, g] = (max - min) / 15 and zero[o, g] = min + 8 * scale (both rounded to bfloat16 first),
  q[o, i] = clamp(round((W[o, i] - zero) / scale + 8), 0, 15); W ~ (q - 8) * scale + zero.
  This is the convention of torch's int4 CPU kernel; `group_size` (default 64) must divide `in_features`.
  At 64, int4 stores 0.5 byte + 4 bytes per 64 weights = 0.5625 byte/weight, as llama.cpp's Q4_0 does.

Kernels: torch's own. torchao's int8 / int4 weight-only CPU layouts call these same two ops, so it would add a
dependency and no speed.
- int8: `aten._weight_int8pack_mm` (bfloat16 activations, plain [out, in] int8 weight, bf16 row scales).
- int4: `aten._weight_int4pack_mm_for_cpu`, on the weight repacked by `aten._convert_weight_to_int4pack_for_cpu`
  (needs out_features % 16 == 0 and group_size in 32/64/128/256). The layer then holds the weight in that
  packing only; its state dict unpacks it (checked exactly against the packing op at pack time).
Both are fast for a few rows (decoding) and slow for many, so a call over more than 16 (int8) / 64 (int4)
rows (prefill), a call in training mode or whose input needs a gradient (LoRA over a frozen quantized base),
a layer the int4 kernel cannot take, and any non-CPU device instead dequantize the weight to the activation
dtype and run a dense `F.linear`: exactly the float layer with the dequantized weight (when the input needs a
gradient, the backward dequantizes the weight again rather than keeping the forward's float copy). The kernels
round the activations to bfloat16 (their only fast input type), so a float32 model's decode steps differ from
its prefill by about bfloat16 precision.

W8A8 (`QuantConfig(activations="int8")`, `--quantize w8a8` on the command line): the same int8 weights, run on CPU
with the activations quantized to 8 bits on the fly, over a range this module picks, and multiplied in integers,
for every row count (prefill too). The package's own kernel (`models.native`, C compiled at first use) runs it
when it builds, else fbgemm's quantized linear (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`); the
two give bit-identical results, the native one with less overhead per call. Each row's range is fixed by its own
largest value (`_dynamic_int8_linear`), so results do not depend on the batch. It exists because torch's
weight-only int8 kernel has no AVX2 code: on an AVX2-only EPYC one decode row through it cost about what the
float32 matmul costs, and fbgemm's ran 2-4x faster at 1, 16 and 128 rows (the 32768-row head 2.6x at one row).
Activations lose precision too (7 bits, over a range up to 1.41x the row's largest value): on the random
checkpoints of the suite the top-1 agreement with float32 stays at the int8 gate, but checkpoints with outlier
activation channels (large LLMs, as LLM.int8() and SmoothQuant describe) can lose more than that; weight-only int8
is the default for that reason. Off CPU, in training, or when the input needs a gradient the layer runs
weight-only.

On-disk layout (`models.checkpoint.save_model` of a quantized model; consolidated format only):
params.json carries the model's usual keys plus
    "quantization": {"format": "tramontane-weight-only", "mode": "int8" | "int4",
                     "group_size": 64 (int4 only), "embeddings": false, "output": false,
                     "activations": "int8" (W8A8 only; absent means weight-only)}
and consolidated.safetensors holds, for every quantized layer `L` (e.g. `layers.0.attention.wq`), instead of
`L.weight`:
    int8: `L.qweight` int8 [out, in]; `L.scales` bfloat16 [out]
    int4: `L.qweight` uint8 [out, in / 2], column 2j in the low nibble and 2j + 1 in the high nibble of
          byte j; `L.scales`, `L.zeros` bfloat16 [out, in / group_size]
with the same names under `tok_embeddings` (rows = vocabulary) when embeddings are quantized. Every other
tensor (norms, unquantized embeddings or head) is stored as in a float checkpoint. The int4 kernel's own
packing depends on the CPU's vector width, so it is never written: loading repacks.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tramontane.errors import ConfigError
from tramontane.models.layers import Attention, FeedForward
from tramontane.models.moe import MoeLayer
from tramontane.models.native import W8A8Kernel, w8a8_kernel

logger = logging.getLogger(__name__)

QUANT_FORMAT = "tramontane-weight-only"
MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
SCALE_DTYPE = torch.bfloat16  # the kernels' scale dtype; stored so, so kernel and dequantization agree
# Rows per call up to which the fused kernel beats dequantize + dense bf16 matmul (measured on an AVX-512 EPYC:
# int8 breaks even between 16 and 32 rows, int4 between 64 and 128).
INT8_KERNEL_ROWS = 16
INT4_KERNEL_ROWS = 64
# rows quantized (and summed) per block at load: the float and int32 temporaries stay small next to the head
_QUANTIZE_BLOCK_ROWS = 1024

_M = TypeVar("_M", bound=nn.Module)
_HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
ACTIVATIONS = ("float", "int8")
# fbgemm's quantized linear with int8 activations, float32 output and the input's quantization given by the caller
# (`_dynamic_int8_linear`); its packed weight is made from a quantized tensor, an API torch 2.13 deprecates
HAS_DYNAMIC_INT8 = ("fbgemm" in torch.backends.quantized.supported_engines
                    and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
                    and hasattr(torch, "_make_per_channel_quantized_tensor"))
_HAS_INT4_KERNEL = (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
                    and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


@dataclass(frozen=True)
class QuantConfig:
    """What `quantize_model` quantizes and how: `mode` "int8" (per output channel) or "int4" (groups of
    `group_size` input columns, default 64); the decoder's linear layers always, the token embeddings and the
    output head when `embeddings` / `output` say so. `activations` "int8" (int8 weights only) runs the layers
    on CPU with dynamically quantized int8 activations (W8A8, see the module docstring); "float" (the default)
    keeps them weight-only. It is a choice of kernel: the stored weights are the same either way."""

    mode: str
    group_size: int | None = None  # int4 only
    embeddings: bool = False
    output: bool = False
    activations: str = "float"  # "int8": dynamic int8 activations (int8 weights only)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"quantization mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.mode == "int8":
            if self.group_size is not None:
                raise ConfigError("int8 quantization is per output channel and takes no group size; "
                                  "leave group_size unset (it applies to int4)")
        else:
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            size = self.group_size
            if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2:
                raise ConfigError(f"int4 group_size must be an even integer >= 2 (e.g. 32, 64, 128), got {size!r}")
        for name in ("embeddings", "output"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"quantization {name} must be true or false, got {getattr(self, name)!r}")
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"quantization activations must be one of {list(ACTIVATIONS)}, got "
                              f"{self.activations!r}")
        if self.activations == "int8":
            if self.mode != "int8":
                raise ConfigError("int8 activations (W8A8) need int8 weights: use mode 'int8'")
            if not HAS_DYNAMIC_INT8:
                raise ConfigError("int8 activations need torch's fbgemm quantized engine, which this torch "
                                  "build lacks: use activations='float' (weight-only int8)")

    def to_params(self) -> dict[str, Any]:
        """The `quantization` entry of params.json."""
        out: dict[str, Any] = {"format": QUANT_FORMAT, "mode": self.mode}
        if self.group_size is not None:
            out["group_size"] = self.group_size
        out |= {"embeddings": self.embeddings, "output": self.output}
        if self.activations != "float":  # written only when set: files without it read as weight-only
            out["activations"] = self.activations
        return out

    def same_weights(self, other: QuantConfig) -> bool:
        """Whether `other` stores the same quantized tensors (it may differ in `activations` only)."""
        return replace(self, activations=other.activations) == other

    @classmethod
    def from_params(cls, entry: Any, source: str = "params.json") -> QuantConfig:
        """Parse a params.json `quantization` entry written by `to_params`; any other quantization scheme
        raises ConfigError saying which ones load."""
        if not isinstance(entry, dict) or entry.get("format") != QUANT_FORMAT:
            raise ConfigError(
                f"{source} describes a quantized checkpoint ({entry!r}) in a format tramontane does not read; "
                f"it loads float checkpoints and its own weight-only int8/int4 layout (quantization format "
                f"{QUANT_FORMAT!r}). Load the float checkpoint and pass quantize='int8' or 'int4' instead")
        unknown = sorted(set(entry) - {"format", "mode", "group_size", "embeddings", "output", "activations"})
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown} in its quantization entry")
        return cls(mode=entry.get("mode"), group_size=entry.get("group_size"),  # type: ignore[arg-type]
                   embeddings=entry.get("embeddings", False), output=entry.get("output", False),
                   activations=entry.get("activations", "float"))


# ------------------------------------------------------------------------------------ quantize, dequantize


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q int8 [out, in], scales bfloat16 [out]) with W ~ q * scales[:, None]. Computed a block
    of rows at a time, so that the float temporaries stay small next to a large layer (the output head)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=SCALE_DTYPE, device=weight.device)
    for start in range(0, weight.shape[0], _QUANTIZE_BLOCK_ROWS):
        rows = slice(start, start + _QUANTIZE_BLOCK_ROWS)
        w = weight[rows].detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(SCALE_DTYPE).tiny).to(SCALE_DTYPE)
        q[rows] = torch.round(w / scale.float()[:, None]).clamp(-127, 127)
        scales[rows] = scale
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q uint8 [out, in] with values 0..15, scales, zeros bfloat16 [out, in / group_size])
    with W ~ (q - 8) * scale + zero per group of `group_size` columns."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=torch.finfo(SCALE_DTYPE).tiny).to(SCALE_DTYPE)
    zeros = (low + 8 * scales.float()).to(SCALE_DTYPE)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.uint8).reshape(out_f, in_f), scales, zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [rows, cols] -> bytes [rows, cols / 2]: column 2j low nibble, 2j + 1 high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8 [rows, cols], scales [rows] -> W [rows, cols] in `dtype` (computed in float32)."""
    if dtype == torch.bfloat16 and scales.dtype == torch.bfloat16:
        # The same numbers with no float32 temporaries: q is exact in bfloat16, and q * scale (8 x 8
        # significant bits) is exact in the float32 arithmetic torch uses before its one rounding to bf16.
        return q.to(dtype) * scales[:, None]
    return (q.float() * scales.float()[:, None]).to(dtype)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q values 0..15 [rows, cols] (unpacked), scales and zeros [rows, cols / group] -> W in `dtype`."""
    rows, cols = q.shape
    groups = scales.shape[1]
    w = (q.reshape(rows, groups, cols // groups).float() - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(rows, cols).to(dtype)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied when it is not contiguous or not 64-byte aligned: torch's int8 CPU kernel crashes on
    unaligned operands, such as tensors read straight out of a safetensors file."""
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.contiguous().clone()


INT4_KERNEL_BLOCKS = (64, 32)  # the rows of one block of torch's int4 CPU packing: AVX-512, AVX2


def _unpack_int4_cpu_kernel_layout(packed: torch.Tensor, rows: int, cols: int, block_rows: int) -> torch.Tensor:
    """Values 0..15 [rows, cols] from `_convert_weight_to_int4pack_for_cpu`'s packing: blocks of
    `block_rows` rows (64 where torch's kernel uses AVX-512, 32 with AVX2), column-major inside a block, byte
    d of column k holding rows d (low) and d + block_rows / 2 (high); a tail of fewer rows is one block whose
    byte d holds rows 2d (low) and 2d + 1 (high). The caller checks the result against the kernel's own
    packing."""
    full = rows // block_rows * block_rows
    parts = []
    if full:
        block = packed[:full].reshape(full // block_rows, cols, block_rows // 2)  # blocks, column, byte
        both = torch.cat([block & 15, block >> 4], dim=2)  # blocks, column, row in block
        parts.append(both.permute(0, 2, 1).reshape(full, cols))
    tail = rows - full
    if tail:
        block = packed[full:].reshape(cols, tail // 2)
        parts.append(torch.stack([block & 15, block >> 4], dim=-1).reshape(cols, tail).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# ------------------------------------------------------------------------------------------------- modules


class QuantizedLinear(nn.Module):
    """A frozen linear layer y = x W^T (no bias) whose weight is stored quantized; see the module docstring
    for when it runs a fused kernel and when it dequantizes. Holds buffers only: nothing in it trains."""

    mode = ""
    kernel_rows = 0
    scales: torch.Tensor

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    @property
    def device(self) -> torch.device:
        return self.scales.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its floating-point tensors (the scales)."""
        return self.scales.dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight W [out, in] this layer multiplies by, in `dtype`."""
        raise NotImplementedError

    def _kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [N, in] bfloat16 contiguous on CPU -> [N, out] through the fused kernel, or None (no kernel)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (x.device.type == "cpu" and rows <= self.kernel_rows and not self.training
                and not (x.requires_grad and torch.is_grad_enabled())):
            out = self._kernel(_aligned(x.reshape(rows, self.in_features).to(torch.bfloat16)))
            if out is not None:
                return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if x.requires_grad and torch.is_grad_enabled():
            return _DequantizedLinear.apply(x, self)
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class _DequantizedLinear(torch.autograd.Function):
    """x W^T with W dequantized for the forward and again for the backward (dx = dy W). F.linear would keep
    its float W for the backward, every layer's until the backward reaches it: a float copy of the whole base,
    which training adapters over a quantized base (QLoRA) is meant to avoid. Here autograd keeps the layer.
    Written in the `setup_context` form, so that torch.func (the DP engine's generic rule) can transform it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, QuantizedLinear], output: torch.Tensor) -> None:
        ctx.layer, ctx.dtype = inputs[1], inputs[0].dtype

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype) @ ctx.layer.dequantize(ctx.dtype), None


class Int8Linear(QuantizedLinear):
    """int8 weight per output channel: buffers `qweight` int8 [out, in], `scales` bfloat16 [out].

    With `dynamic_activations` (W8A8, `QuantConfig.activations="int8"`) the layer runs on CPU through the
    package's native kernel (`models.native`) over `qweight` when it builds, else through fbgemm's dynamic
    quantized linear over a packed copy of its weight, which then replaces `qweight` (the state dict unpacks
    it, checked exactly at pack time). Both give the same bits; see `_dynamic_int8_linear` for how the
    activations are quantized."""

    mode = "int8"
    kernel_rows = INT8_KERNEL_ROWS
    qweight: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None,
                 dynamic_activations: bool = False) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE, device=device))
        self.dynamic_activations = dynamic_activations
        self.fbgemm: Any = None  # fbgemm's packed weight (a torch ScriptObject), with dynamic_activations on CPU
        # with the native kernel instead: (the kernel, float32 row scales [out], int32 row sums of qweight [out])
        self.native: tuple[W8A8Kernel, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, dynamic_activations: bool = False) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, device=linear.weight.device,
                     dynamic_activations=dynamic_activations)
        if not linear.weight.is_meta:
            module.qweight, module.scales = quantize_int8(linear.weight)
            module.pack_for_dynamic()
        return module

    def values(self) -> torch.Tensor:
        """The int8 weight [out, in], from whichever layout the layer holds."""
        if self.qweight is not None:
            return self.qweight
        return torch.ops.quantized.linear_unpack(self.fbgemm)[0].int_repr()

    @property
    def w8a8_kernel(self) -> str | None:
        """Which kernel runs the layer's W8A8 calls: "native", "fbgemm", or None (it runs weight-only)."""
        return "native" if self.native is not None else "fbgemm" if self.fbgemm is not None else None

    def pack_for_dynamic(self) -> None:
        """Ready the weight for W8A8 (a no-op without `dynamic_activations`, off CPU, or when ready): the
        native kernel's row scales and row sums next to `qweight`, or, without that kernel, fbgemm's packing,
        which replaces `qweight` once it is checked to unpack to it and to its scales exactly."""
        weight = self.qweight
        if (not self.dynamic_activations or self.w8a8_kernel is not None or weight is None
                or weight.device.type != "cpu" or weight.is_meta):
            return
        kernel = w8a8_kernel()
        if kernel is not None:
            self.qweight = weight.contiguous()
            # row sums a block at a time: torch widens the whole tensor to int32 for the sum
            sums = torch.cat([block.sum(dim=1, dtype=torch.int32) for block in weight.split(_QUANTIZE_BLOCK_ROWS)])
            self.native = (kernel, self.scales.float().contiguous(), sums)
            return
        scales = self.scales.double()
        with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors, fbgemm's only way in
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
            weight_q = torch._make_per_channel_quantized_tensor(
                weight, scales, torch.zeros(self.out_features, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(weight_q, None)
        unpacked = torch.ops.quantized.linear_unpack(packed)[0]
        if torch.equal(unpacked.int_repr(), weight) and torch.equal(unpacked.q_per_channel_scales(), scales):
            self.fbgemm, self.qweight = packed, None
        else:  # never seen; the layer then runs weight-only
            logger.warning("fbgemm's packing of an int8 layer did not round-trip; it stays weight-only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step makes dozens of these calls per token: the W8A8 path's checks are kept to the cheap ones
        native = self.native
        if ((native is not None or self.fbgemm is not None) and not self.training and x.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled())):
            if native is None:
                return _dynamic_int8_linear(x, self.fbgemm, self.out_features)
            kernel, wscale, colsum = native
            rows = x.reshape(-1, self.in_features)
            if rows.dtype != torch.float32 or not rows.is_contiguous():
                rows = rows.to(torch.float32).contiguous()
            out = kernel.linear(rows, self.qweight, wscale, colsum)  # type: ignore[arg-type]  # set with native
            if x.dtype != torch.float32:
                out = out.to(x.dtype)
            return out.view(*x.shape[:-1], self.out_features)
        return super().forward(x)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.values(), self.scales, dtype)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        if not _HAS_INT8_KERNEL:
            return None
        return torch.ops.aten._weight_int8pack_mm(x, _aligned(self.values()),
                                                  _aligned(self.scales.to(torch.bfloat16)))

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        # fbgemm's packing is CPU-only: moving to another device goes back to `qweight` first
        if self.fbgemm is not None and fn(torch.empty(0, dtype=torch.int8)).device.type != "cpu":
            self.qweight, self.fbgemm = self.values(), None
        self.native = None  # made again from the moved buffers
        super()._apply(fn, recurse)
        self.pack_for_dynamic()
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:  # held in fbgemm's packing only
            destination[prefix + "qweight"] = self.values()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        if self.qweight is None:  # a None buffer is skipped by the default loader: give it a slot again
            self.qweight = torch.empty(self.out_features, self.in_features, dtype=torch.int8,
                                       device=self.scales.device)
        self.fbgemm = self.native = None
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.qweight is not None and not self.qweight.is_meta:  # `assign=True` may hand over unaligned buffers
            self.qweight, self.scales = _aligned(self.qweight), _aligned(self.scales)
            self.pack_for_dynamic()

    def extra_repr(self) -> str:
        return super().extra_repr() + (", activations=int8" if self.dynamic_activations else "")


_SQRT2_UP = 1.4142136573791504  # the least float32 >= sqrt(2): R grid values stay exact in float32
# R -> (scale, zero point) of `_input_qparams`; R takes few values (a grid of half powers of two)
_QPARAMS: dict[float, tuple[float, int]] = {}
# the smallest activation range used: rows whose largest |value| is below it share its step (2^-100 / 63.5),
# which keeps 1 / scale finite in float32
_MIN_BOUND = 2.0**-100


def _activation_bound(a: float) -> float:
    """The least value of the grid {2^k, 1.4142137 * 2^k} that is >= a (a >= 0): at most sqrt(2) a (for a > 0),
    exactly representable in float32."""
    mantissa, exponent = math.frexp(a)  # a = mantissa * 2^exponent, mantissa in [0.5, 1) (0 for a = 0)
    if mantissa == 0.5:  # a power of two
        return a
    low = math.ldexp(_SQRT2_UP, exponent - 1)
    return low if a <= low else math.ldexp(1.0, exponent)


def _input_qparams(bound: float) -> tuple[float, int]:
    """(scale, zero point) quantizing [-R, R] to 0..127 (R = `bound`), computed as aten's ChooseQuantizationParams
    computes them for a tensor whose minimum and maximum are -R and R: the scale 2R / 127 in double rounded to
    float32, the zero point R / scale rounded half to even (64). fbgemm's dynamic linear given the same range
    (e.g. by two extra rows holding R and -R) quantizes the same way, except that it floors the scale at 6.1e-5
    (R below about 0.0039), which this does not."""
    params = _QPARAMS.get(bound)
    if params is None:
        r = max(bound, _MIN_BOUND)
        scale = 2.0 * r / 127.0
        params = _QPARAMS[bound] = (float(torch.tensor(scale, dtype=torch.float32)), round(r / scale))
    return params


def _dynamic_int8_linear(x: torch.Tensor, packed: Any, out_features: int) -> torch.Tensor:
    """x [..., in] times fbgemm's packed int8 weight, the activations quantized on the fly (affine uint8 in
    fbgemm's reduced range 0..127, so that its AVX2 kernel's pairwise int16 sums cannot saturate), float32
    output. Each row's quantization depends on that row alone, so a row's result does not depend on the batch
    it is in (serving's batch invariance): a row whose largest |value| is a is quantized over [-R, R], R the
    least value >= a of a grid of half powers of two (`_activation_bound`), by fbgemm's linear that takes the
    input's scale and zero point (`_input_qparams`), one call for the rows of each R. The step, 2R / 127, is at
    most 2 sqrt(2) a / 127: for a row of roughly symmetric values about 1.4x what quantizing it over its own
    range would give."""
    rows = x.reshape(-1, x.shape[-1]).float()
    # a decode step makes dozens of these calls per token, so the bookkeeping is kept to few small ops
    bounds = [_activation_bound(a) for a in torch.linalg.vector_norm(rows, math.inf, dim=1).tolist()]
    distinct = set(bounds)
    linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    if len(distinct) == 1:  # decoding one sequence, or rows alike
        out = linear(rows, *_input_qparams(bounds[0]), packed)
    else:
        out = rows.new_empty(rows.shape[0], out_features)
        for bound in distinct:
            index = torch.tensor([i for i, b in enumerate(bounds) if b == bound])
            out.index_copy_(0, index, linear(rows.index_select(0, index), *_input_qparams(bound), packed))
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


class Int4Linear(QuantizedLinear):
    """int4 weight in groups of `group_size` input columns: buffers `scales`, `zeros` bfloat16
    [out, in / group_size] and the weight, either as `qweight` (the portable nibble layout of the module
    docstring) or, on CPU where torch's kernel takes the layer, only in the kernel's packing (`packed` and
    `scales_and_zeros` [in / group_size, out, 2]). The state dict always holds the portable layout."""

    mode = "int4"
    kernel_rows = INT4_KERNEL_ROWS
    zeros: torch.Tensor
    qweight: torch.Tensor | None
    packed: torch.Tensor | None
    scales_and_zeros: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, group_size: int = DEFAULT_GROUP_SIZE,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        if in_features % group_size:
            raise ConfigError(f"int4 group_size {group_size} does not divide in_features={in_features}; "
                              f"choose a divisor of it (e.g. {_divisors_hint(in_features)})")
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("scales_and_zeros", None, persistent=False)
        self.kernel_block_rows: int | None = None  # the packing's block rows, once it replaces `qweight`

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        module = cls(linear.in_features, linear.out_features, group_size, device=linear.weight.device)
        if not linear.weight.is_meta:
            q, module.scales, module.zeros = quantize_int4(linear.weight, group_size)
            module.qweight = pack_nibbles(q)
            module.pack_for_kernel()
        return module

    @property
    def kernel_eligible(self) -> bool:
        """Whether torch's CPU int4 kernel takes this layer's shape and group size."""
        return (_HAS_INT4_KERNEL and self.out_features % 16 == 0
                and self.group_size in INT4_KERNEL_GROUP_SIZES)

    def values(self) -> torch.Tensor:
        """The quantized values 0..15 [out, in] (uint8), from whichever layout the layer holds."""
        if self.qweight is not None:
            return unpack_nibbles(self.qweight)
        assert self.packed is not None and self.kernel_block_rows is not None
        return _unpack_int4_cpu_kernel_layout(self.packed, self.out_features, self.in_features,
                                              self.kernel_block_rows)

    def pack_for_kernel(self) -> None:
        """Repack the weight for torch's CPU kernel (no-op off CPU, when packed, or when not eligible). The
        portable copy is dropped when the kernel's packing is verified to unpack back to it exactly."""
        if self.packed is not None or not self.kernel_eligible or self.scales.device.type != "cpu":
            return
        q = self.values()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.scales_and_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous()
        for block_rows in INT4_KERNEL_BLOCKS:
            if torch.equal(_unpack_int4_cpu_kernel_layout(self.packed, self.out_features, self.in_features,
                                                          block_rows), q):
                self.qweight, self.kernel_block_rows = None, block_rows
                return
        logger.debug("int4 kernel packing not recognised; keeping the portable copy of the weight")

    def _apply(self, fn: Any, recurse: bool = True) -> Int4Linear:
        # The kernel packing is CPU-only: moving to another device goes back to the portable layout first.
        if self.packed is not None and fn(torch.empty(0, dtype=torch.uint8)).device.type != "cpu":
            if self.qweight is None:
                self.qweight = pack_nibbles(self.values())
            self.packed = self.scales_and_zeros = self.kernel_block_rows = None
        super()._apply(fn, recurse)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.values(), self.scales, self.zeros, dtype)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.packed is None:
            self.pack_for_kernel()
            if self.packed is None:
                return None
        assert self.scales_and_zeros is not None
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size,
                                                          self.scales_and_zeros.to(torch.bfloat16))

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:  # held in the kernel's packing only: write the portable layout
            destination[prefix + "qweight"] = pack_nibbles(self.values())

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        if self.qweight is None:  # a None buffer is skipped by the default loader: give it a slot again
            self.qweight = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8,
                                       device=self.scales.device)
        self.packed = self.scales_and_zeros = None
        super()._load_from_state_dict(state_dict, prefix, *args)
        if not self.scales.is_meta:
            self.pack_for_kernel()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """A token-embedding table stored quantized (`mode` "int8" per row, "int4" per row and group, layouts as
    `Int8Linear` / `Int4Linear`'s portable ones); looked-up rows are dequantized to the model's dtype."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    weight: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str, group_size: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.mode = num_embeddings, embedding_dim, mode
        self.group_size = group_size
        if mode == "int8":
            self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(num_embeddings, dtype=SCALE_DTYPE, device=device))
        else:
            assert group_size is not None
            if embedding_dim % group_size:
                raise ConfigError(f"int4 group_size {group_size} does not divide the embedding dim "
                                  f"{embedding_dim}; choose a divisor of it")
            groups = embedding_dim // group_size
            self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(num_embeddings, groups, dtype=SCALE_DTYPE, device=device))
            self.register_buffer("zeros", torch.empty(num_embeddings, groups, dtype=SCALE_DTYPE, device=device))
        # `Transformer.device` and `.dtype` read `tok_embeddings.weight`: this empty tensor answers them in the
        # dtype the looked-up rows come out in, and follows `.to()` like a real table would.
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, mode: str, group_size: int | None = None) -> QuantizedEmbedding:
        table = embedding.weight
        module = cls(embedding.num_embeddings, embedding.embedding_dim, mode, group_size, table.dtype, table.device)
        if not table.is_meta:
            if mode == "int8":
                module.qweight, module.scales = quantize_int8(table)
            else:
                assert group_size is not None
                q, module.scales, module.zeros = quantize_int4(table, group_size)
                module.qweight = pack_nibbles(q)
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table [num_embeddings, dim] in `dtype`."""
        return self._rows(torch.arange(self.num_embeddings, device=self.qweight.device), dtype)

    def _rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.mode == "int8":
            return dequantize_int8(self.qweight[ids], self.scales[ids], dtype)
        return dequantize_int4(unpack_nibbles(self.qweight[ids]), self.scales[ids], self.zeros[ids], dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        return self._rows(flat, self.weight.dtype).reshape(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode}{group}"


# ----------------------------------------------------------------------------------------------- the model


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers weight-only quantization replaces: attention, dense FFN and MoE
    expert projections of every decoder layer (not the router), in model order."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"quantization applies to a tramontane Transformer (its `layers`); got "
                          f"{type(model).__name__}")
    names = []
    for i, block in enumerate(layers):
        attention, ffn = getattr(block, "attention", None), getattr(block, "feed_forward", None)
        if isinstance(attention, Attention):
            names += [f"layers.{i}.attention.{n}" for n in ("wq", "wk", "wv", "wo")]
        if isinstance(ffn, MoeLayer):
            names += [f"layers.{i}.feed_forward.experts.{e}.{n}"
                      for e in range(len(ffn.experts)) for n in ("w1", "w2", "w3")]
        elif isinstance(ffn, FeedForward):
            names += [f"layers.{i}.feed_forward.{n}" for n in ("w1", "w2", "w3")]
    return names


def _quantize_linear(linear: nn.Module, name: str, config: QuantConfig) -> QuantizedLinear:
    if type(linear) is not nn.Linear or linear.bias is not None:
        raise ConfigError(f"{name} is a {type(linear).__name__}, not a plain bias-free nn.Linear: quantize the "
                          "model before adding LoRA adapters (or merge them first)")
    if config.mode == "int8":
        return Int8Linear.from_float(linear, dynamic_activations=config.activations == "int8")
    assert config.group_size is not None
    if linear.in_features % config.group_size:
        raise ConfigError(f"int4 group_size {config.group_size} does not divide the {linear.in_features} input "
                          f"features of {name}; choose a divisor (e.g. {_divisors_hint(linear.in_features)})")
    return Int4Linear.from_float(linear, config.group_size)


def quantize_model(model: _M, mode: str | QuantConfig, *, group_size: int | None = None,
                   include_embeddings: bool = False, include_output: bool = False) -> _M:
    """Replace `model`'s decoder linear layers (see `decoder_linear_names`) by quantized ones, in place, and
    record the scheme in `model.args.extra["quantization"]` (so `save_model` writes it). `mode` is "int8" or
    "int4" (then `group_size`, default 64), or a `QuantConfig` (the keyword arguments must then be left unset).
    Works on any Transformer-based model (Mixtral experts, the text decoder of Pixtral / Voxtral: their
    encoders are left alone) and on the meta device (shapes only). Raises ConfigError for a model that is
    already quantized, carries LoRA adapters, or whose layers the group size does not divide; nothing is
    changed then. Returns `model`."""
    if isinstance(mode, QuantConfig):
        if group_size is not None or include_embeddings or include_output:
            raise ConfigError("pass either a QuantConfig or mode= with keyword options, not both")
        config = mode
    else:
        config = QuantConfig(mode, group_size, include_embeddings, include_output)
    if quantization_config(model) is not None:
        raise ConfigError("the model is already quantized; load the float checkpoint to quantize it otherwise")
    names = decoder_linear_names(model)
    args = getattr(model, "args", None)
    if getattr(args, "tied_embeddings", False) and config.embeddings != config.output:
        raise ConfigError("this model ties its output head to its embeddings: quantize both "
                          "(include_embeddings=True, include_output=True) or neither")
    targets = names + (["output"] if config.output else [])
    for name in targets:  # check everything before changing anything
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear or linear.bias is not None:
            _quantize_linear(linear, name, config)  # raises the error that explains
        if config.mode == "int4" and linear.in_features % config.group_size:  # type: ignore[operator]
            _quantize_linear(linear, name, config)
    embedding = getattr(model, "tok_embeddings", None)
    if config.embeddings:
        if not isinstance(embedding, nn.Embedding):
            raise ConfigError(f"the model has no nn.Embedding `tok_embeddings` to quantize (found "
                              f"{type(embedding).__name__})")
        if config.mode == "int4" and embedding.embedding_dim % config.group_size:  # type: ignore[operator]
            raise ConfigError(f"int4 group_size {config.group_size} does not divide the embedding dim "
                              f"{embedding.embedding_dim}; choose a divisor of it")
    for name in targets:  # each new module keeps the train/eval mode of the one it replaces
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, leaf)
        setattr(owner, leaf, _quantize_linear(old, name, config).train(old.training))
    if isinstance(embedding, nn.Embedding) and config.embeddings:
        model.tok_embeddings = QuantizedEmbedding.from_float(embedding, config.mode, config.group_size).train(
            embedding.training)
    if args is not None and hasattr(args, "extra"):
        args.extra["quantization"] = config.to_params()
    return model


def quantization_config(model: nn.Module) -> QuantConfig | None:
    """The scheme `model` is quantized with, read from its modules (None: not quantized)."""
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    embedding = getattr(model, "tok_embeddings", None)
    if not linears and not isinstance(embedding, QuantizedEmbedding):
        return None
    first = linears[0] if linears else None
    mode = first.mode if first is not None else embedding.mode  # type: ignore[union-attr]
    group = getattr(first, "group_size", None) if first is not None else embedding.group_size  # type: ignore
    return QuantConfig(mode, group if mode == "int4" else None, isinstance(embedding, QuantizedEmbedding),
                       isinstance(getattr(model, "output", None), QuantizedLinear),
                       "int8" if getattr(first, "dynamic_activations", False) else "float")


def _divisors_hint(n: int) -> str:
    found = [d for d in (32, 64, 128, 256, 16, 8) if n % d == 0]
    return ", ".join(map(str, found[:3])) or "an even divisor"


__all__ = [
    "ACTIVATIONS", "DEFAULT_GROUP_SIZE", "HAS_DYNAMIC_INT8", "MODES", "QUANT_FORMAT", "Int4Linear", "Int8Linear",
    "QuantConfig", "QuantizedEmbedding", "QuantizedLinear", "decoder_linear_names", "dequantize_int4",
    "dequantize_int8", "pack_nibbles", "quantization_config", "quantize_int4", "quantize_int8", "quantize_model",
    "unpack_nibbles",
]
