"""GGUF files for the tests, written with the `gguf` package as llama.cpp's `convert_hf_to_gguf.py` writes them.

Independent of `tramontane.models.gguf`: tensor names come from gguf's own `TensorNameMap` (llama.cpp's
HF -> GGUF table), the rows of q_proj / k_proj are permuted from transformers' rotate-half layout back to
adjacent pairs per head, Mixtral experts are stacked along a new first dimension (or written one tensor per
expert, as files converted before April 2024 are), norms and routers stay F32, every other matrix is in the
asked type (token embeddings and head included). `benchmarks/_llamacpp_worker.py`'s `convert`, checked against
llama.cpp itself, writes the dense case the same way (a test compares the two).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file

Q = gguf.GGMLQuantizationType
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def benchmark_convert() -> Callable[[Path, Path, str], None]:
    """`convert(hf_dir, out, "F16" | "Q8_0" | "Q4_0")` of benchmarks/_llamacpp_worker.py, loaded by path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_llamacpp_worker.py"
    spec = importlib.util.spec_from_file_location("_llamacpp_worker", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert


def _rope_theta(config: Mapping[str, Any]) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 1e4)


def llama_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `llama.*` keys convert_hf_to_gguf.py writes for a transformers Mistral / Mixtral config."""
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    meta: dict[str, Any] = {
        "llama.context_length": config.get("max_position_embeddings", 8192),
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": n_heads,
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.attention.key_length": head_dim,
        "llama.attention.value_length": head_dim,
        "llama.rope.dimension_count": head_dim,
        "llama.rope.freq_base": _rope_theta(config),
        "llama.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "llama.vocab_size": config["vocab_size"],
    }
    if config.get("num_local_experts"):
        meta["llama.expert_count"] = config["num_local_experts"]
        meta["llama.expert_used_count"] = config["num_experts_per_tok"]
    return meta


def _adjacent_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a rotate-half q/k projection, per head, in llama.cpp's adjacent-pair order."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(hf_dir: Path, per_expert: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The GGUF tensors (float32, numpy order) and metadata of a transformers `save_pretrained` folder."""
    config = json.loads((hf_dir / "config.json").read_text())
    hf = load_file(hf_dir / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, value in hf.items():
        data = value.astype(np.float32)
        match = _EXPERT.match(name)
        if match:
            layer, expert, w = match.groups()
            experts.setdefault((layer, w), {})[int(expert)] = data
            continue
        if name.endswith("q_proj.weight"):
            data = _adjacent_pairs(data, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            data = _adjacent_pairs(data, config["num_key_value_heads"])
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        assert gguf_name is not None, name
        out[gguf_name] = data
    for (layer, w), by_expert in experts.items():
        stacked = names.get_name(f"model.layers.{layer}.block_sparse_moe.experts.{w}")  # blk.N.ffn_gate_exps
        assert stacked is not None and stacked.endswith("_exps")
        if per_expert:
            for e, data in by_expert.items():
                out[f"{stacked.removesuffix('_exps')}.{e}.weight"] = data
        else:
            out[stacked + ".weight"] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return out, llama_metadata(config)


def stays_f32(name: str, data: np.ndarray) -> bool:
    """Norms and routers: kept in F32 by llama.cpp's converter whatever the file type."""
    return data.ndim == 1 or ".ffn_gate_inp." in name


def stored(data: np.ndarray, qtype: Q) -> np.ndarray:
    """`data` as the file stores it, in ggml's bytes (quantized) or numpy's float type."""
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def rounded(data: np.ndarray, qtype: Q) -> np.ndarray:
    """The float32 values a reader gets back from `stored(data, qtype)`."""
    return gguf.quants.dequantize(stored(data, qtype), qtype).astype(np.float32).reshape(data.shape)


def write_gguf(path: Path, tensors: Mapping[str, np.ndarray | tuple[np.ndarray, Q]], metadata: Mapping[str, Any],
               qtype: Q = Q.F16, arch: str = "llama") -> Path:
    """Write a GGUF file: float tensors stored in `qtype` (norms and routers in F32), or (raw data, type)
    pairs as they are; metadata ints as uint32, floats as float32, strings and lists as such."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        elif stays_f32(name, value):
            writer.add_tensor(name, value.astype(np.float32))
        elif qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, stored(value, qtype))
        else:
            writer.add_tensor(name, stored(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_state_as_stored(model: torch.nn.Module, qtype: Q) -> dict[str, torch.Tensor]:
    """A transformers model's state dict with each weight rounded as a `qtype` file stores it (norms and
    routers exact): the float network a correct GGUF loader must reproduce."""
    out = {}
    for name, value in model.state_dict().items():
        data = value.detach().float().numpy()
        keep = data.ndim == 1 or name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight"))
        out[name] = value if keep else torch.from_numpy(rounded(data, qtype))
    return out
