"""Voxtral checkpoints: consolidated (`params.json` with `multimodal.whisper_model_args`) and Hugging Face
(`VoxtralForConditionalGeneration`) names and configs, and loading either (`load_voxtral`)."""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tramontane.errors import CheckpointError, ConfigError
from tramontane.models.args import ModelArgs
from tramontane.models.audio.network import (
    AUDIO_TOKEN_ID,
    AudioEmbedder,
    AudioEncoderArgs,
    Voxtral,
    sinusoidal_positions,
)
from tramontane.models.checkpoint import (
    Format,
    args_from_hf_config,
    assign_weights,
    detect_format,
    hf_names,
    weight_files,
)
from tramontane.tensorfiles import read_json_object, resolve_dtype, scan_tensors

logger = logging.getLogger(__name__)

# Consolidated audio names -> Hugging Face names (as `save_pretrained` writes them). The text model's are
# checkpoint.hf_names under `language_model.`, with its q/k row permutation; the encoder has no RoPE.
_ENCODER = r"^mm_whisper_embeddings\.whisper_encoder\."
_LAYER = _ENCODER + r"transformer\.layers\.(\d+)\."
_AUDIO_TO_HF = [(re.compile(p), r) for p, r in [
    (_ENCODER + r"conv_layers\.0\.", "audio_tower.conv1."),
    (_ENCODER + r"conv_layers\.1\.", "audio_tower.conv2."),
    (_ENCODER + r"transformer\.norm\.", "audio_tower.layer_norm."),
    (_LAYER + r"attention\.w([qkv])\.", r"audio_tower.layers.\1.self_attn.\2_proj."),
    (_LAYER + r"attention\.wo\.", r"audio_tower.layers.\1.self_attn.out_proj."),
    (_LAYER + r"attention_norm\.", r"audio_tower.layers.\1.self_attn_layer_norm."),
    (_LAYER + r"ffn_norm\.", r"audio_tower.layers.\1.final_layer_norm."),
    (_LAYER + r"feed_forward\.w([12])\.", r"audio_tower.layers.\1.fc\2."),
    (r"^mm_whisper_embeddings\.audio_language_projection\.0\.", "multi_modal_projector.linear_1."),
    (r"^mm_whisper_embeddings\.audio_language_projection\.2\.", "multi_modal_projector.linear_2."),
]]
# transformers 5.x runtime names (a raw `state_dict()` dump) -> the names `save_pretrained` writes.
_HF_RUNTIME_TO_SAVED = [(re.compile(p), r) for p, r in [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.(audio_tower|multi_modal_projector)\.", r"\1."),
]]
_HF_POSITIONS = "audio_tower.embed_positions.weight"  # the sinusoids we compute; checked, not loaded
# transformers' converter also accepts the text embedding under the audio module's name.
_CONSOLIDATED_ALIASES = {"mm_whisper_embeddings.tok_embeddings.weight": "tok_embeddings.weight"}
_FLOAT_TAGS = {"F32", "BF16", "F16"}


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    return next((pattern.sub(repl, name) for pattern, repl in rules if pattern.match(name)), name)


def hf_voxtral_names(args: ModelArgs, audio_args: AudioEncoderArgs) -> dict[str, str]:
    """Consolidated name -> Hugging Face name (as `save_pretrained` writes it), every tensor of the model."""
    with torch.device("meta"):
        audio = AudioEmbedder(audio_args, args.dim)
    names = {k: f"language_model.{v}" for k, v in hf_names(args).items()}
    for key in audio.state_dict():
        name = f"mm_whisper_embeddings.{key}"
        names[name] = _rename(name, _AUDIO_TO_HF)
        assert names[name] != name, name
    return names


def load_voxtral(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
    format: Format | None = None,
) -> Voxtral:
    """Load a consolidated (`params.json` with `multimodal.whisper_model_args` + `consolidated*.safetensors`)
    or Hugging Face (`config.json` + `model*.safetensors`, as `save_pretrained` writes them or with
    transformers 5.x runtime names) Voxtral directory. Every tensor name and shape is checked before any data
    is read; `CheckpointError` lists all missing, unexpected and mis-shaped tensors. `dtype` None keeps the
    checkpoint's; `format` picks a layout where a folder holds both."""
    path = Path(path)
    fmt = detect_format(path, format)
    if fmt == "consolidated":
        params = read_json_object(path / "params.json")
        if not isinstance(params.get("multimodal"), dict):
            raise ConfigError(f"{path / 'params.json'} has no 'multimodal' section: not a Voxtral checkpoint "
                              "(load text models with tramontane.models.checkpoint.load_model)")
        audio_args = AudioEncoderArgs.from_params(params.pop("multimodal"))
        args, token_id = ModelArgs.from_params(params), AUDIO_TOKEN_ID
    else:
        args, audio_args, token_id = args_from_hf_voxtral_config(read_json_object(path / "config.json"))
    entries = scan_tensors(weight_files(path, fmt))  # headers only
    quantized = sorted(k for k, e in entries.items() if e.dtype not in _FLOAT_TAGS)
    if quantized:
        raise CheckpointError(f"{path} holds non-float tensors ({quantized[:5]}): quantized checkpoints are "
                              "not supported")
    if fmt == "hf":
        to_consolidated = {v: k for k, v in hf_voxtral_names(args, audio_args).items()}
        names = {k: to_consolidated.get(_rename(k, _HF_RUNTIME_TO_SAVED), k) for k in entries}
        positions = next((k for k in entries if _rename(k, _HF_RUNTIME_TO_SAVED) == _HF_POSITIONS), None)
        if positions is not None:
            _check_positions(entries[positions].file, positions, audio_args)
            del names[positions]
    else:
        names = {k: _CONSOLIDATED_ALIASES.get(k, k) for k in entries}
    if args.tied_embeddings:  # a stored copy of the head is ignored
        names = {k: v for k, v in names.items() if v != "output.weight"}
    twice = sorted(name for name, count in Counter(names.values()).items() if count > 1)
    if twice:
        raise CheckpointError(f"{path} stores {twice} twice, under different names")
    with torch.device("meta"):
        model = Voxtral(args, audio_args, token_id, max_seq_len)
    return assign_weights(model, entries, names,
                          rotary_heads=(lambda name: _text_rotary_heads(name, args)) if fmt == "hf" else None,
                          dtype=resolve_dtype(dtype), device=device, what=f"{path} (Voxtral)")


def args_from_hf_voxtral_config(config: dict[str, Any]) -> tuple[ModelArgs, AudioEncoderArgs, int]:
    """(text args, audio args, `[AUDIO]` id) from a transformers `VoxtralConfig` `config.json`."""
    if config.get("model_type") != "voxtral":
        raise ConfigError(f"config.json model_type {config.get('model_type')!r} is not 'voxtral' "
                          "(load text models with tramontane.models.checkpoint.load_model)")
    text, audio = config.get("text_config"), config.get("audio_config")
    if not isinstance(text, dict) or not isinstance(audio, dict):
        raise ConfigError("a Voxtral config.json needs 'text_config' and 'audio_config' objects")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"projector_hidden_act {config['projector_hidden_act']!r} is not supported "
                          "(only 'gelu')")
    if text.get("model_type", "llama") not in ("llama", "mistral") or text.get("attention_bias") \
            or text.get("mlp_bias"):
        raise ConfigError("Voxtral's text_config must describe a bias-free llama/mistral decoder")
    # Llama without biases is Mistral without a sliding window (unless the config sets one).
    args = args_from_hf_config({**text, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
                                "sliding_window": text.get("sliding_window")})

    def get(*keys: str, default: Any = None) -> Any:
        value = next((audio[k] for k in keys if audio.get(k) is not None), default)
        if value is None:
            raise ConfigError(f"config.json audio_config is missing {keys[0]!r}")
        return value

    if get("activation_function", default="gelu") != "gelu" or audio.get("scale_embedding"):
        raise ConfigError("Voxtral's audio_config must use GELU and no embedding scale (as Whisper)")
    dim, hidden = get("hidden_size", "d_model"), get("intermediate_size", "encoder_ffn_dim")
    heads = get("num_attention_heads", "encoder_attention_heads")
    if hidden % dim:
        raise ConfigError(f"audio intermediate_size {hidden} must be a multiple of hidden_size {dim}: "
                          "transformers' adapter concatenates intermediate_size / hidden_size frames")
    audio_args = AudioEncoderArgs(
        dim=dim, n_layers=get("num_hidden_layers", "encoder_layers"), hidden_dim=hidden, n_heads=heads,
        head_dim=dim // heads, max_source_positions=get("max_source_positions", default=1500),
        num_mel_bins=get("num_mel_bins", default=128), downsample_factor=hidden // dim,
        extra={"vocab_size": audio["vocab_size"]} if "vocab_size" in audio else {},
    )
    token_id = config.get("audio_token_id")
    if token_id is None:
        logger.warning("config.json has no audio_token_id; using %d ([AUDIO] of Voxtral's tekken.json)",
                       AUDIO_TOKEN_ID)
    return args, audio_args, AUDIO_TOKEN_ID if token_id is None else int(token_id)


def _text_rotary_heads(name: str, args: ModelArgs) -> int | None:
    if not name.startswith("layers."):
        return None
    return {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}.get(
        name.split(".", 2)[2])


def _check_positions(file: Path, key: str, args: AudioEncoderArgs) -> None:
    """transformers stores the sinusoids we compute; a checkpoint with another table is refused."""
    with safe_open(file, framework="pt") as st:
        table = st.get_tensor(key).float()
    expected = sinusoidal_positions(args.max_source_positions, args.dim)
    # Loose bound: converters computed the table on GPU, whose sin of ~1500 rad differs in the last bits.
    gap = float((table - expected).abs().max()) if table.shape == expected.shape else math.inf
    if gap > 1e-3:
        raise CheckpointError(
            f"{key} in {file} is not Whisper's sinusoidal table [{args.max_source_positions}, {args.dim}] "
            f"(shape {list(table.shape)}, max |difference| {gap:.3g}); Voxtral computes these positions, so "
            "other (learned or randomly initialised) ones are not supported"
        )


__all__ = ["args_from_hf_voxtral_config", "hf_voxtral_names", "load_voxtral"]
