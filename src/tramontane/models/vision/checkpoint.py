"""Pixtral / Mistral Small 3.1 checkpoints: Hugging Face LLaVA / Mistral3 names <-> consolidated ones, configs,
and loading (consolidated `params.json` with a `vision_encoder` section, or `save_pretrained` directories)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tramontane.errors import CheckpointError, ConfigError
from tramontane.models.args import ModelArgs
from tramontane.models.checkpoint import (
    Format,
    args_from_hf_config,
    assign_weights,
    hf_names,
    permute_from_hf,
    permute_to_hf,
    weight_files,
)
from tramontane.models.vision.network import PATCH_MERGE, VisionEncoderArgs, VisionLanguageModel
from tramontane.tensorfiles import read_json_object, resolve_dtype, scan_tensors

logger = logging.getLogger(__name__)


def hf_vision_names(args: ModelArgs, vision_args: VisionEncoderArgs) -> dict[str, str]:
    """Consolidated name -> the name HF `save_pretrained` writes for LLaVA (Pixtral) / Mistral3."""
    names = {"vision_encoder.patch_conv.weight": "vision_tower.patch_conv.weight",
             "vision_encoder.ln_pre.weight": "vision_tower.ln_pre.weight"}
    for i in range(vision_args.num_hidden_layers):
        c, h = f"vision_encoder.transformer.layers.{i}.", f"vision_tower.transformer.layers.{i}."
        names |= {c + f"attention.w{x}.weight": h + f"attention.{x}_proj.weight" for x in "qkvo"}
        names |= {c + f"feed_forward.{w}.weight": h + f"feed_forward.{p}.weight"
                  for w, p in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))}
        names |= {c + f"{n}.weight": h + f"{n}.weight" for n in ("attention_norm", "ffn_norm")}
    params = ("weight", "bias") if vision_args.adapter_bias else ("weight",)
    for ours, theirs in (("w_in", "linear_1"), ("w_out", "linear_2")):
        names |= {f"vision_language_adapter.{ours}.{p}": f"multi_modal_projector.{theirs}.{p}"
                  for p in params}
    if vision_args.add_pre_mm_projector_layer_norm:
        names["pre_mm_projector_norm.weight"] = "multi_modal_projector.norm.weight"
    if vision_args.patch_merger:
        names["patch_merger.merging_layer.weight"] = "multi_modal_projector.patch_merger.merging_layer.weight"
    for ours, theirs in hf_names(args).items():  # MistralForCausalLM names, under language_model.
        names[ours] = "language_model." + theirs
    return names


# transformers 5.x runtime prefixes (a raw `state_dict()`) -> the on-disk ones `save_pretrained` writes
_HF_RUNTIME_PREFIXES = (("model.vision_tower.", "vision_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector."),
                        ("model.language_model.", "language_model.model."),
                        ("lm_head.", "language_model.lm_head."))


def _hf_disk_name(name: str) -> str:
    for runtime, disk in _HF_RUNTIME_PREFIXES:
        if name.startswith(runtime):
            return disk + name[len(runtime):]
    return name


def _rotary_heads(name: str, args: ModelArgs, vision_args: VisionEncoderArgs) -> int | None:
    """Heads whose rows the HF conversion permuted, for a consolidated name (None: not wq/wk)."""
    if name.startswith("vision_encoder.") and name.endswith(("attention.wq.weight", "attention.wk.weight")):
        return vision_args.num_attention_heads
    if name.startswith("layers.") and name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.startswith("layers.") and name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def _permutable(tensor: torch.Tensor, heads: int) -> bool:
    return tensor.ndim == 2 and tensor.shape[0] % (2 * heads) == 0


def _consolidated_names(
    hf_keys: Sequence[str], args: ModelArgs, vision_args: VisionEncoderArgs
) -> dict[str, str]:
    """HF key (on-disk or 5.x runtime spelling) -> consolidated name; `CheckpointError` for unknown keys."""
    ours = {disk: name for name, disk in hf_vision_names(args, vision_args).items()}
    out: dict[str, str] = {}
    unknown: list[str] = []
    seen: dict[str, str] = {}
    for key in hf_keys:
        name = ours.get(_hf_disk_name(key))
        if name is None:
            unknown.append(key)
        elif name in seen:
            raise CheckpointError(f"HF tensors {seen[name]!r} and {key!r} both hold {name!r}")
        else:
            out[key], seen[name] = name, key
    if unknown:
        raise CheckpointError(f"unexpected tensor(s) for this LLaVA/Mistral3 config: {sorted(unknown)[:10]}"
                              + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return out


def hf_to_consolidated_vision(
    state_dict: dict[str, torch.Tensor], args: ModelArgs, vision_args: VisionEncoderArgs
) -> dict[str, torch.Tensor]:
    """HF LLaVA / Mistral3 tensors (on-disk or transformers 5.x runtime names) -> consolidated names, with the
    rows of the vision and text wq/wk permuted back to adjacent rotary pairs."""
    out = {}
    for key, name in _consolidated_names(list(state_dict), args, vision_args).items():
        tensor, heads = state_dict[key], _rotary_heads(name, args, vision_args)
        out[name] = permute_from_hf(tensor, heads) if heads and _permutable(tensor, heads) else tensor
    return out


def consolidated_to_hf_vision(
    state_dict: dict[str, torch.Tensor], args: ModelArgs, vision_args: VisionEncoderArgs
) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_consolidated_vision`, writing the names `save_pretrained` uses (a tied output head
    is not written, as transformers does not)."""
    names = hf_vision_names(args, vision_args)
    if args.tied_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "output.weight"}
    unknown = sorted(set(state_dict) - set(names))
    if unknown:
        raise CheckpointError(f"tensor(s) with no HF LLaVA/Mistral3 name: {unknown[:10]}")
    out = {}
    for name, tensor in state_dict.items():
        heads = _rotary_heads(name, args, vision_args)
        out[names[name]] = permute_to_hf(tensor, heads) if heads and _permutable(tensor, heads) else tensor
    return out


# --------------------------------------------------------------------------------------------------- loading


_HF_PIXTRAL_DEFAULTS: dict[str, Any] = {  # transformers' PixtralVisionConfig defaults, for absent keys
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 1024, "patch_size": 16, "hidden_act": "gelu", "rope_theta": 10_000.0,
}
_HF_VLM_TYPES = {"llava": "LlavaForConditionalGeneration", "mistral3": "Mistral3ForConditionalGeneration"}
_FLOAT_TAGS = ("F32", "BF16", "F16", "F64")


def args_from_hf_vision_config(config: dict[str, Any]) -> tuple[ModelArgs, VisionEncoderArgs]:
    """Text and vision args from a LLaVA (Pixtral) or Mistral3 `config.json`. Whether the output head is tied
    to the embeddings is left to the loader, which also looks at the tensors (as transformers does)."""
    model_type = config.get("model_type")
    if model_type not in _HF_VLM_TYPES:
        raise ConfigError(f"config.json model_type {model_type!r} is not a supported vision-language model "
                          f"(supported: {sorted(_HF_VLM_TYPES.values())})")
    vision = dict(config.get("vision_config") or {})
    if vision.get("model_type", "pixtral") != "pixtral":
        raise ConfigError(f"vision_config model_type {vision.get('model_type')!r} is not supported "
                          "(only pixtral)")
    if config.get("vision_feature_layer", -1) != -1:
        raise ConfigError(f"vision_feature_layer {config['vision_feature_layer']!r} is not supported (only "
                          "-1, the last layer, as Pixtral and Mistral Small 3.1 use)")
    if model_type == "llava" and config.get("vision_feature_select_strategy", "default") != "full":
        raise ConfigError("a Pixtral LLaVA config needs vision_feature_select_strategy 'full' (it has no "
                          f"class token to drop), got "
                          f"{config.get('vision_feature_select_strategy', 'default')!r}")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"projector_hidden_act {config['projector_hidden_act']!r} is not supported "
                          "(only gelu)")

    def get(key: str) -> Any:
        if key in vision:
            return vision[key]
        logger.warning("config.json vision_config has no %r; using transformers' default %r",
                       key, _HF_PIXTRAL_DEFAULTS[key])
        return _HF_PIXTRAL_DEFAULTS[key]

    if get("hidden_act") != "silu":
        logger.warning("config.json vision_config.hidden_act is %r, but Pixtral's vision FFN is SiLU-gated "
                       "(mistral-inference); tramontane uses SiLU, so outputs differ from transformers' with "
                       "this config", get("hidden_act"))
    rope = vision.get("rope_parameters") or {}
    theta = rope.get("rope_theta", vision.get("rope_theta", _HF_PIXTRAL_DEFAULTS["rope_theta"]))
    patch_merge = model_type == "mistral3"
    vision_args = VisionEncoderArgs(
        hidden_size=get("hidden_size"), num_channels=get("num_channels"), image_size=_side(get("image_size")),
        patch_size=_side(get("patch_size")), intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"), num_attention_heads=get("num_attention_heads"),
        rope_theta=float(theta),
        image_token_id=config.get("image_token_index", config.get("image_token_id", 10)),
        adapter_bias=bool(config.get("multimodal_projector_bias", not patch_merge)),
        spatial_merge_size=config.get("spatial_merge_size", 2) if patch_merge else 1,
        add_pre_mm_projector_layer_norm=patch_merge, mm_projector_id=PATCH_MERGE if patch_merge else "",
    )
    if vision.get("head_dim") not in (None, vision_args.head_dim):
        raise ConfigError(f"vision_config head_dim {vision['head_dim']} != hidden_size / num_attention_heads")
    text = dict(config.get("text_config") or {})
    text.setdefault("model_type", "mistral")
    if "num_attention_heads" not in text:  # older LLaVA configs only list what differs from MistralConfig
        logger.warning("config.json text_config has no 'num_attention_heads'; using transformers' default 32")
        text["num_attention_heads"] = 32
    return args_from_hf_config(text), vision_args


def _side(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"non-square vision size {value} is not supported")
        value = value[0]
    return value


def _hf_tied(config: dict[str, Any]) -> bool:
    """What transformers decides from the config alone (top level wins; LLaVA falls back to the text
    config)."""
    if config.get("tie_word_embeddings") is not None:
        return bool(config["tie_word_embeddings"])
    if config["model_type"] == "mistral3":
        return True
    return bool((config.get("text_config") or {}).get("tie_word_embeddings", False))


def load_vision_language_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
    format: Format | None = None,
) -> VisionLanguageModel:
    """Load a consolidated (`params.json` with `vision_encoder` + `consolidated*.safetensors`) or HF LLaVA /
    Mistral3 (`config.json` + `model*.safetensors`) directory; `format` picks one where a folder holds both
    (default: the consolidated one). Every tensor name and shape is checked before any data is read;
    `CheckpointError` lists all missing, unexpected and mis-shaped tensors."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    target_dtype = resolve_dtype(dtype)
    fmt: Format
    if format not in (None, "consolidated", "hf"):
        raise ConfigError(f"format must be 'consolidated' or 'hf', got {format!r}")
    if (path / "params.json").is_file() and format != "hf":
        fmt = "consolidated"
        params = read_json_object(path / "params.json")
        if "vision_encoder" not in params:
            raise CheckpointError(f"{path / 'params.json'} has no 'vision_encoder' section: a text-only "
                                  "checkpoint, load it with tramontane.models.checkpoint.load_model")
        vision_args = VisionEncoderArgs.from_params(params["vision_encoder"])
        args = ModelArgs.from_params({k: v for k, v in params.items() if k != "vision_encoder"})
    elif (path / "config.json").is_file():
        fmt = "hf"
        config = read_json_object(path / "config.json")
        args, vision_args = args_from_hf_vision_config(config)
    else:
        raise CheckpointError(f"{path} has neither params.json (consolidated) nor config.json (Hugging Face)")
    entries = scan_tensors(weight_files(path, fmt))  # headers only
    quantized = sorted(k for k, e in entries.items() if e.dtype not in _FLOAT_TAGS)
    if quantized:
        raise CheckpointError(f"{path} holds non-float tensors ({quantized[:5]}...): quantized checkpoints "
                              "are not supported")
    if fmt == "hf":
        names = _consolidated_names(list(entries), args, vision_args)
        tied = _hf_tied(config) and "output.weight" not in names.values()
        args = replace(args, tied_embeddings=tied)
    else:
        names = {k: k for k in entries}
    with torch.device("meta"):
        model = VisionLanguageModel(args, vision_args, max_seq_len)
    def rotary_heads(name: str) -> int | None:
        return _rotary_heads(name, args, vision_args)

    return assign_weights(model, entries, names, rotary_heads=rotary_heads if fmt == "hf" else None,
                          dtype=target_dtype, device=device, what=str(path))


__all__ = [
    "args_from_hf_vision_config", "consolidated_to_hf_vision", "hf_to_consolidated_vision", "hf_vision_names",
    "load_vision_language_model",
]
