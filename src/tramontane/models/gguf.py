"""Read llama.cpp's GGUF files of Mistral-architecture models (Mistral 7B, Mistral Nemo, Codestral, Mixtral).

A GGUF file is one file: metadata (`general.architecture`, `llama.embedding_length`, ...) and tensors in ggml's
types, float (F32, F16, BF16) or one of llama.cpp's block quantizations (Q8_0, Q4_0, Q4_K, Q6_K, IQ4_XS, ...).
It is read with the `gguf` package, llama.cpp's own reader (`pip install 'tramontane[gguf]'`), and mapped onto
`Transformer` here; `checkpoint.load_model(path_to.gguf)` is the entry point.

- Architecture: "llama" only, the one llama.cpp's `convert_hf_to_gguf.py` writes for Mistral and Mixtral.
  Anything else (`mistral3`, `qwen2`, ...), RoPE scaling, partial rotary dimensions, shared experts or a
  non-softmax router is refused with `CheckpointError`.
- Names: `token_embd` -> `tok_embeddings`, `blk.N.attn_q` -> `layers.N.attention.wq`, ... (`_LAYER`, `_FFN`).
  The reader gives numpy's dimension order ([out_features, in_features], as `nn.Linear` stores weights; GGUF
  lists them innermost first).
- Rotary layout: llama.cpp rotates adjacent feature pairs (2i, 2i+1), as consolidated checkpoints and
  `rope.py` do; its converter permutes the rows of Hugging Face's rotate-half q/k back to that layout. So
  `attn_q` / `attn_k` load as they are, without the permutation the HF loader undoes.
- Mixtral: `llama.expert_count` experts, the router `blk.N.ffn_gate_inp` [E, dim] and the experts stacked in
  `blk.N.ffn_{gate,up,down}_exps` ([E, hidden, dim], [E, hidden, dim], [E, dim, hidden]; gate is w1, up w3,
  down w2), or one tensor per expert (`blk.N.ffn_gate.E.weight`) in files converted before April 2024.
  llama.cpp routes the llama architecture's experts as `MoeLayer` does (softmax over the top-k logits).
- Tied embeddings: a file without `output.weight` uses the token embeddings as the output head.
- Sliding window: none unless the file states `llama.attention.sliding_window`. llama.cpp's llama architecture
  has no window, so Mistral 7B v0.1's files (trained with a 4096-token window) run with full causal attention,
  as llama.cpp runs them: outputs differ from the windowed model only on sequences longer than 4096 tokens.
- Quantization: every tensor is dequantized at load with `gguf.quants.dequantize` (llama.cpp's dequantized
  values, exactly, in float32), then cast to the model's dtype. The block formats are not run natively: a
  Q4_K file takes the memory of a float model of that dtype. tramontane's own int8 / int4 weight-only scheme
  (`models.quant`, `load_model(quantize=...)`) can be applied after loading, as to any float checkpoint.
  `dtype` None: float16 or bfloat16 where every matrix is stored in that type (llama.cpp keeps norms and
  routers in F32 in such files), float32 otherwise (a quantized or all-F32 file).
- Tokenizer: the file's vocabulary (`tokenizer.ggml.*`) is not used; tramontane tokenizes with mistral_common,
  from a tekken.json / tokenizer.model.v* file beside the .gguf (`Tokenizer.from_model_dir` on a file looks in
  its folder).

Names, shapes and ggml types are checked before any tensor data is dequantized.

Parsing a file reads its whole metadata, the vocabulary included (seconds for a 131k-token tekken vocabulary).
`open_gguf` keeps the last file it parsed while that file is unchanged, so `load_args` then `load_model` on one
file (a fine-tuning run, a trial of a search) parse it once; `load_model` lets the parse go.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tramontane.errors import CheckpointError, ConfigError
from tramontane.models.args import DEFAULT_ROPE_THETA, ModelArgs, MoeArgs
from tramontane.tensorfiles import check_tensors, resolve_dtype

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
ARCHITECTURE = "llama"
_INSTALL_HINT = "reading GGUF files needs the gguf package: pip install 'tramontane[gguf]' (or pip install gguf)"
_RECONVERT = "re-convert the original checkpoint with llama.cpp's convert_hf_to_gguf.py"

# GGUF name (without "blk.N." and ".weight") -> consolidated name (without "layers.N." and ".weight")
_LAYER = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
          "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm"}
_FFN = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
_PER_EXPERT = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")  # pre-April-2024 Mixtral files


def is_gguf(path: str | Path) -> bool:
    """True for a file that starts with GGUF's magic bytes (whatever its name)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _package() -> ModuleType:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(_INSTALL_HINT) from None
    return gguf


@dataclass(frozen=True)
class _Slot:
    """One tensor in the file: its shape (numpy order) and the model tensors it fills, each the whole tensor
    (index None) or one slice along its first dimension (an expert of a stacked tensor)."""

    shape: tuple[int, ...]
    targets: tuple[tuple[str, int | None], ...]


class GGUFFile:
    """One GGUF file, its metadata parsed and its tensors memory-mapped (read when `state_dict` asks).

    Parsing reads every metadata entry, the file's vocabulary included (seconds for a 131k-token tekken
    vocabulary), so open a file once and ask it both `args()` and `state_dict()` (`open_gguf` does that
    across calls).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        gguf = _package()
        try:
            self._reader: GGUFReader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, TypeError, OSError) as err:
            raise CheckpointError(f"cannot read {self.path} as a GGUF file ({err}); it may be truncated or "
                                  "corrupt (re-download it)") from None
        if self._reader.byte_order != "I":
            raise CheckpointError(f"{self.path} is a GGUF file of the other byte order (big-endian); convert it "
                                  "on a little-endian machine")
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self._reader.tensors}
        parts = self._value("split.count")
        if isinstance(parts, int) and parts > 1:
            raise CheckpointError(f"{self.path} is one part of a GGUF split into {parts} files; merge them with "
                                  "llama.cpp's `llama-gguf-split --merge FIRST_PART.gguf MERGED.gguf` and load "
                                  "the merged file")
        arch = self._value("general.architecture")
        if arch != ARCHITECTURE:
            raise CheckpointError(
                f"{self.path} holds a {arch!r} model (general.architecture); tramontane loads GGUF files of the "
                f"{ARCHITECTURE!r} architecture, which llama.cpp's convert_hf_to_gguf.py writes for Mistral and "
                "Mixtral models. Load this model from its consolidated or Hugging Face folder instead"
            )

    # -------------------------------------------------------------------------------------------- metadata

    def args(self) -> ModelArgs:
        """The `ModelArgs` the file's `llama.*` metadata and its token embedding table describe."""
        dim = self._int("embedding_length")
        n_heads = self._int("attention.head_count")
        n_kv_heads = self._int("attention.head_count_kv", n_heads)
        head_dim = self._int("attention.key_length", dim // n_heads if n_heads else 0)
        for key, value in (("attention.value_length", self._int("attention.value_length", head_dim)),
                           ("rope.dimension_count", self._int("rope.dimension_count", head_dim))):
            if value != head_dim:
                raise CheckpointError(f"{self.path}: llama.{key} is {value} but the head size (attention."
                                      f"key_length) is {head_dim}; only models whose keys, values and rotary "
                                      "dimensions all span the whole head are supported")
        self._check_plain_rope()
        moe = self._moe()
        hidden = self._int("feed_forward_length")
        if moe is not None:
            hidden = self._int("expert_feed_forward_length", hidden)
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise CheckpointError(f"{self.path} has no token_embd.weight tensor; the file is incomplete "
                                  f"({_RECONVERT})")
        vocab = int(embed.shape[-1])  # ggml order: [dim, vocab]
        stated = self._int("vocab_size", vocab)
        if stated != vocab:
            raise CheckpointError(f"{self.path}: llama.vocab_size is {stated} but token_embd.weight has {vocab} "
                                  f"rows; the file is inconsistent ({_RECONVERT})")
        window = self._int("attention.sliding_window", 0)  # 0 or absent: full causal attention, as llama.cpp
        context = self._int("context_length", 0)
        extra: dict[str, Any] = {"max_position_embeddings": context} if context > 0 else {}
        try:
            return ModelArgs(
                dim=dim, n_layers=self._int("block_count"), head_dim=head_dim, hidden_dim=hidden,
                n_heads=n_heads, n_kv_heads=n_kv_heads, norm_eps=self._float("attention.layer_norm_rms_epsilon"),
                vocab_size=vocab, rope_theta=self._float("rope.freq_base", DEFAULT_ROPE_THETA),
                sliding_window=window or None, moe=moe,
                tied_embeddings="output.weight" not in self.tensors, extra=extra,
            )
        except ConfigError as err:
            raise CheckpointError(f"{self.path} has invalid llama.* metadata: {err}") from None

    def _moe(self) -> MoeArgs | None:
        experts = self._int("expert_count", 0)
        if experts == 0:
            return None
        shared = self._int("expert_shared_count", 0)
        gating = self._value(f"{ARCHITECTURE}.expert_gating_func")
        if shared or gating not in (None, 1):  # 1: ExpertGatingFuncType.SOFTMAX
            raise CheckpointError(f"{self.path} has shared experts or a non-softmax router (llama.expert_shared_"
                                  f"count {shared}, llama.expert_gating_func {gating}); tramontane's MoE layer "
                                  "is Mixtral's: top-k of a softmax router, no shared experts")
        try:
            return MoeArgs(num_experts=experts, num_experts_per_tok=self._int("expert_used_count"))
        except ConfigError as err:
            raise CheckpointError(f"{self.path} has invalid llama.expert_* metadata: {err}") from None

    def _check_plain_rope(self) -> None:
        scaling = self._value(f"{ARCHITECTURE}.rope.scaling.type")
        factor = self._value(f"{ARCHITECTURE}.rope.scaling.factor")
        linear = self._value(f"{ARCHITECTURE}.rope.scale_linear")  # the key of older files
        plain = (scaling in (None, "none") or (scaling == "linear" and factor in (None, 1.0))) \
            and linear in (None, 1.0)
        if not plain:
            raise CheckpointError(f"{self.path} uses RoPE scaling (llama.rope.scaling.type {scaling!r}, factor "
                                  f"{factor}); tramontane implements plain RoPE only")

    def _value(self, key: str) -> Any:
        """A metadata value as a Python str / int / float / bool, a list for an array, None where absent."""
        field = self._reader.fields.get(key)
        if field is None:
            return None
        gguf = _package()
        kinds = field.types
        if kinds[0] == gguf.GGUFValueType.ARRAY:
            return [self._scalar(field.parts[i], kinds[-1]) for i in field.data]
        return self._scalar(field.parts[field.data[0]], kinds[0])

    @staticmethod
    def _scalar(part: np.ndarray, kind: Any) -> Any:
        gguf = _package()
        if kind == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        if kind == gguf.GGUFValueType.FLOAT32:  # the shortest decimal of the float32: 1e-05, not 9.99999e-06
            return float(str(part[0]))
        return part[0].item()

    def _int(self, name: str, default: int | None = None) -> int:
        value = self._value(f"{ARCHITECTURE}.{name}")
        if value is None and default is not None:
            return default
        return self._checked(name, value, int)

    def _float(self, name: str, default: float | None = None) -> float:
        value = self._value(f"{ARCHITECTURE}.{name}")
        if value is None and default is not None:
            logger.warning("%s has no %s.%s; using llama.cpp's default %g", self.path, ARCHITECTURE, name, default)
            return default
        return float(self._checked(name, value, (int, float)))

    def _checked(self, name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        key = f"{ARCHITECTURE}.{name}"
        if value is None:
            raise CheckpointError(f"{self.path} has no {key} metadata; the file is incomplete ({_RECONVERT})")
        if isinstance(value, list):
            raise CheckpointError(f"{self.path}: {key} differs between layers ({value}); models whose layers "
                                  "have different sizes are not supported")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CheckpointError(f"{self.path}: {key} is {value!r}, not a number; the file is corrupt "
                                  f"({_RECONVERT})")
        return value

    # --------------------------------------------------------------------------------------------- tensors

    def float_dtype(self) -> torch.dtype:
        """The dtype `state_dict(dtype=None)` gives: F16 or BF16 where every matrix is stored in that type or
        F32, float32 otherwise (any quantized matrix, or an all-F32 file)."""
        gguf = _package()
        halves = {t.tensor_type for t in self.tensors.values() if len(t.shape) > 1} - {gguf.GGMLQuantizationType.F32}
        if halves == {gguf.GGMLQuantizationType.F16}:
            return torch.float16
        if halves == {gguf.GGMLQuantizationType.BF16}:
            return torch.bfloat16
        return torch.float32

    def state_dict(self, args: ModelArgs, *, dtype: torch.dtype | str | None = None,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The file's tensors under `Transformer(args)`'s names, dequantized and cast to `dtype` (None: see
        `float_dtype`) on `device`. With tied embeddings `output.weight` is `tok_embeddings.weight`."""
        plan = _plan(args, self.tensors)
        found = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self.tensors.items()}
        try:
            check_tensors(found, {k: s.shape for k, s in plan.items()},
                          f"{self.path} does not hold the tensors its metadata describes ({_describe(args)})")
        except CheckpointError as err:
            raise CheckpointError(f"{err}. The file is damaged or a variant tramontane does not load; "
                                  f"{_RECONVERT}") from None
        self._check_types()
        target = resolve_dtype(dtype) or self.float_dtype()
        device = torch.device(device)
        logger.info("dequantizing %s (%s) to %s", self.path, _types(self.tensors.values()), target)
        state: dict[str, torch.Tensor] = {}
        for name, slot in plan.items():
            tensor = self.tensors[name]
            for model_name, index in slot.targets:
                data = tensor.data if index is None else tensor.data[index]
                shape = slot.shape if index is None else slot.shape[1:]
                state[model_name] = _dequantized(data, tensor.tensor_type, shape).to(device=device, dtype=target)
        if args.tied_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        return state

    def _check_types(self) -> None:
        """Dequantize each tensor's first row: an unsupported type fails here, before the long reads."""
        gguf = _package()
        for name, tensor in self.tensors.items():
            try:
                gguf.quants.dequantize(tensor.data.reshape(-1, tensor.data.shape[-1])[:1], tensor.tensor_type)
            except NotImplementedError:
                raise CheckpointError(
                    f"tensor {name!r} of {self.path} is stored as {tensor.tensor_type.name}, which the installed "
                    f"gguf package ({_version(gguf)}) cannot dequantize; upgrade it (pip install -U gguf) or "
                    "requantize the file with llama.cpp to a common type such as Q8_0 or Q4_K_M"
                ) from None


_OPENED: dict[tuple[str, int, int, int, int], GGUFFile] = {}  # at most one: the last file open_gguf parsed


def open_gguf(path: str | Path, *, keep: bool = True) -> GGUFFile:
    """`GGUFFile(path)`, parsed once while the file is unchanged (same resolved path, device, inode, size and
    modification time). With `keep` the parse is kept for the next call (one file at most: opening another
    lets the previous one go); `keep=False` returns it and lets it go, as `load_model` does, so that a loaded
    model does not hold the file's memory map and metadata (tens of MB for a large vocabulary) as well.
    Nothing read from a `GGUFFile` is modified (`state_dict` copies what it returns): sharing one is safe."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return GGUFFile(path)  # raises the reader's error for the missing file
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    opened = _OPENED.pop(key, None)
    _OPENED.clear()  # any other file's parse is let go before this one is read
    if opened is None:
        opened = GGUFFile(path)
    if keep:
        _OPENED[key] = opened
    return opened


def _plan(args: ModelArgs, in_file: Mapping[str, object]) -> dict[str, _Slot]:
    """GGUF name -> `_Slot`, with the shapes llama.cpp's llama architecture gives each tensor for `args`."""
    dim, vocab, hidden = args.dim, args.vocab_size, args.hidden_dim
    q_rows, kv_rows = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    plan = {"token_embd.weight": _Slot((vocab, dim), (("tok_embeddings.weight", None),)),
            "output_norm.weight": _Slot((dim,), (("norm.weight", None),))}
    if not args.tied_embeddings:
        plan["output.weight"] = _Slot((vocab, dim), (("output.weight", None),))
    shapes = {"attn_norm": (dim,), "ffn_norm": (dim,), "attn_q": (q_rows, dim), "attn_k": (kv_rows, dim),
              "attn_v": (kv_rows, dim), "attn_output": (dim, q_rows)}
    ffn_shapes = {"ffn_gate": (hidden, dim), "ffn_up": (hidden, dim), "ffn_down": (dim, hidden)}
    per_expert = any(_PER_EXPERT.match(name) for name in in_file)
    for i in range(args.n_layers):
        blk, ours = f"blk.{i}.", f"layers.{i}."
        for name, shape in shapes.items():
            plan[f"{blk}{name}.weight"] = _Slot(shape, ((f"{ours}{_LAYER[name]}.weight", None),))
        if args.moe is None:
            for name, shape in ffn_shapes.items():
                plan[f"{blk}{name}.weight"] = _Slot(shape, ((f"{ours}feed_forward.{_FFN[name]}.weight", None),))
            continue
        n_exp = args.moe.num_experts
        plan[f"{blk}ffn_gate_inp.weight"] = _Slot((n_exp, dim), ((f"{ours}feed_forward.gate.weight", None),))
        for name, shape in ffn_shapes.items():
            expert = [f"{ours}feed_forward.experts.{e}.{_FFN[name]}.weight" for e in range(n_exp)]
            if per_expert:
                plan |= {f"{blk}{name}.{e}.weight": _Slot(shape, ((expert[e], None),)) for e in range(n_exp)}
            else:
                plan[f"{blk}{name}_exps.weight"] = _Slot((n_exp, *shape), tuple((expert[e], e) for e in range(n_exp)))
    return plan


def _dequantized(data: np.ndarray, tensor_type: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor's (or one expert's) data as a float32 torch tensor of `shape`."""
    array = _package().quants.dequantize(data, tensor_type)
    if not array.flags.writeable:  # F32 data comes back as the read-only mapped file itself
        array = array.copy()
    return torch.from_numpy(array.reshape(shape))


def _describe(args: ModelArgs) -> str:
    moe = f", expert_count {args.moe.num_experts}" if args.moe is not None else ""
    return (f"embedding_length {args.dim}, block_count {args.n_layers}, head_count {args.n_heads}, "
            f"head_count_kv {args.n_kv_heads}, key_length {args.head_dim}, feed_forward_length "
            f"{args.hidden_dim}, {args.vocab_size} tokens{moe}")


def _types(tensors: Any) -> str:
    counts: dict[str, int] = {}
    for tensor in tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))


def _version(package: ModuleType) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.__name__)
    except PackageNotFoundError:
        return "unknown version"


__all__ = ["ARCHITECTURE", "MAGIC", "GGUFFile", "is_gguf", "open_gguf"]
