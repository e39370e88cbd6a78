"""What `tramontane serve` serves: one checkpoint directory of any kind (text, Mixtral, Pixtral / Mistral 3,
Voxtral), loaded once with its tokenizer, an optional LoRA adapter and the privacy record of a DP fine-tune."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tramontane.errors import CheckpointError, ConfigError, TokenizerError
from tramontane.finetune.run import read_privacy
from tramontane.models.checkpoint import Format, Kind, detect_kind, load_model
from tramontane.models.cpu_linear import prepack_for_inference
from tramontane.models.quant import QuantConfig, quantize_model
from tramontane.models.transformer import Transformer
from tramontane.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded model with what serving it needs."""

    kind: Kind  # "text" (Mistral, Mixtral), "vision" (Pixtral, Mistral 3), "audio" (Voxtral)
    model: Transformer  # the whole network: a Transformer, VisionLanguageModel or Voxtral
    text_model: Transformer  # the decoder the engine runs (multimodal models are Transformers themselves)
    tokenizer: Tokenizer
    name: str  # the model id clients name in requests
    privacy: dict[str, Any] | None = None  # `finetune.run.read_privacy`'s record of a DP fine-tune, or None
    max_seq_len: int | None = None  # the checkpoint's own context length, when its config states one
    created: int = field(default_factory=lambda: int(time.time()))  # Unix time of loading


def _context_length(model: Transformer) -> int | None:
    length = getattr(model, "max_seq_len", None) or model.args.extra.get("max_seq_len") \
        or model.args.extra.get("max_position_embeddings")
    return int(length) if isinstance(length, int) and length > 0 else None


def _privacy(adapter: str | os.PathLike[str] | None, model_dir: Path) -> dict[str, Any] | None:
    """The privacy record of the weights served: the adapter's when it has one (its ledger covers the data it
    was trained on, earlier adapters included), else the model folder's (a merged or fully fine-tuned model).
    A record of a non-private run states no guarantee and counts as none."""
    record = read_privacy(Path(adapter)) if adapter is not None else None
    if record is None:
        record = read_privacy(model_dir)
    if record is None or not record.get("private") or record.get("delta") is None:
        return None
    return record


def load_served_model(model_dir: str | os.PathLike[str], adapter: str | os.PathLike[str] | None = None,
                      dtype: torch.dtype | str | None = None, name: str | None = None,
                      format: Format | None = None, quantize: QuantConfig | str | None = None) -> ServedModel:
    """Load `model_dir` (its kind detected by `models.checkpoint.detect_kind`) and its tokenizer file, with the
    LoRA adapter in `adapter` (text models only) on top. `name` (default: the folder's name) is the model id
    clients send; `format` ("consolidated" or "hf") picks a layout where the folder holds both, as Mistral's
    repositories do; `quantize` ("int8", "int4" or a `QuantConfig`) makes the decoder's linear layers
    weight-only quantized (`models.quant`). Raises `CheckpointError`, `ConfigError` or `TokenizerError` saying what to fix."""
    model_dir = Path(model_dir)
    kind = detect_kind(model_dir, format)
    if adapter is not None and kind != "text":
        raise ConfigError(f"{model_dir} is a {kind} checkpoint; LoRA adapters apply to text models only")
    model: Transformer
    if kind == "vision":
        from tramontane.models.vision import check_tokenizer, load_vision_language_model

        vision = load_vision_language_model(model_dir, dtype=dtype, format=format)
        if quantize is not None:
            quantize_model(vision, quantize)
        tokenizer = Tokenizer.from_model_dir(model_dir)
        check_tokenizer(tokenizer, vision.vision_args)
        model = vision
    elif kind == "audio":
        from tramontane.models.audio import load_voxtral

        voxtral = load_voxtral(model_dir, dtype=dtype, format=format)
        if quantize is not None:
            quantize_model(voxtral, quantize)
        tokenizer = Tokenizer.from_model_dir(model_dir)
        encoder = getattr(tokenizer.mistral.instruct_tokenizer, "audio_encoder", None)
        if encoder is None:
            raise TokenizerError(f"the tokenizer of {model_dir} has no audio section; a Voxtral checkpoint needs "
                                 "its own tekken.json")
        if encoder.special_ids.audio != voxtral.audio_token_id:
            raise TokenizerError(f"the tokenizer's [AUDIO] id {encoder.special_ids.audio} is not the model's "
                                 f"audio_token_id {voxtral.audio_token_id}; use the checkpoint's own tokenizer")
        model = voxtral
    elif adapter is None:
        model, _ = load_model(model_dir, dtype=dtype, format=format, quantize=quantize)
        tokenizer = Tokenizer.from_model_dir(model_dir)
    else:
        from tramontane.finetune.adapter import load_model_with_adapter

        model, _ = load_model_with_adapter(model_dir, Path(adapter), dtype=dtype, format=format,
                                           quantize=quantize)
        tokenizer = Tokenizer.from_model_dir(model_dir)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise CheckpointError(f"the tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.args.vocab_size}: the folder mixes files of different models")
    prepack_for_inference(model)  # eval mode; linear layers through oneDNN where it is faster (CPU only)
    served = ServedModel(kind=kind, model=model, text_model=model, tokenizer=tokenizer,
                         name=name or model_dir.resolve().name, privacy=_privacy(adapter, model_dir),
                         max_seq_len=_context_length(model))
    logger.info("serving %s (%s, %.1fM parameters, %s tokenizer%s%s)", served.name, kind,
                model.args.num_parameters() / 1e6, tokenizer.version,
                f", LoRA adapter {adapter}" if adapter else "", ", DP ledger" if served.privacy else "")
    return served


__all__ = ["ServedModel", "load_served_model"]
