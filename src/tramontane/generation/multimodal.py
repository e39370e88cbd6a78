"""Generation from multimodal prompts: encoder outputs take the places of placeholder tokens in the prefill.

Pixtral's `[IMG]` and Voxtral's `[AUDIO]` work the same way (see `tramontane.models.multimodal`): the model
embeds the prompt with its media spliced in, and `generation.text.generate` decodes from those embeddings, so
sampling, stopping and batching are the text model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tramontane.errors import GenerationError, TokenizerError
from tramontane.generation.text import Completion, SamplingParams, generate
from tramontane.models.audio import Voxtral, audio_features, transcription_prompt
from tramontane.models.transformer import Transformer
from tramontane.models.vision import VisionLanguageModel

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.audio import Audio

    from tramontane.tokenizer import Tokenizer


def generate_with_embeddings(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    embeddings: Sequence[torch.Tensor],
    params: SamplingParams | None = None,
    eos_id: int | None = None,
    chunk_size: int | None = None,
) -> list[Completion]:
    """`generation.generate` for prompts whose input embeddings are given: `embeddings[i]` [T_i, D] are those
    of `prompts[i]` (T_i ids, e.g. after `splice_embeddings`)."""
    return generate(model, prompts, params, eos_id, chunk_size, prompt_embeddings=embeddings)


def _checked_embeddings(model: VisionLanguageModel | Voxtral, prompts: Sequence[Sequence[int]],
                        media: Sequence[Any], media_token_id: int, max_tokens: int) -> list[torch.Tensor]:
    """The spliced input embeddings [T_i, dim] of each prompt with its media (images, or audio features),
    after checking its token ids against the vocabulary and its length (with `max_tokens` to come and one
    encoder output per media token) against the model's context."""
    vocab = model.args.vocab_size
    embeddings = []
    for row, (prompt, item) in enumerate(zip(prompts, media)):
        if any(not 0 <= t < vocab for t in prompt):
            raise GenerationError(f"prompt {row} holds token ids outside the vocabulary [0, {vocab})")
        model.check_context(len(prompt) + max_tokens, sum(1 for t in prompt if t == media_token_id))
        tokens = torch.as_tensor(list(prompt), dtype=torch.long, device=model.device)[None]
        embeddings.append(model.embed(tokens, item)[0])
    return embeddings


@torch.no_grad()
def prompt_embeddings(model: VisionLanguageModel | Voxtral, prompt: Sequence[int], media: Any,
                      max_tokens: int) -> torch.Tensor:
    """The input embeddings [T, dim] of one prompt with its media spliced in: its images (a list of [C, H, W]
    tensors) for a `VisionLanguageModel`, its audio features (log-mel chunks [N, mel, frames], or None) for a
    `Voxtral`. Checks as `generate_with_images` / `generate_with_audio` do, for `max_tokens` to come; for
    callers that run the decoder themselves (e.g. the serving engine)."""
    token_id = model.vision_args.image_token_id if isinstance(model, VisionLanguageModel) else model.audio_token_id
    return _checked_embeddings(model, [prompt], [media], token_id, max_tokens)[0]


@torch.no_grad()
def generate_with_images(
    model: VisionLanguageModel,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[torch.Tensor]],
    params: SamplingParams | None = None,
    eos_id: int | None = None,
    chunk_size: int | None = None,
) -> list[Completion]:
    """Generate a continuation of each prompt; `images[i]` are the images of `prompts[i]`, in order.

    The prefill reads the spliced embeddings; decoding is `generation.generate`'s.
    """
    params = params or SamplingParams()
    if len(images) != len(prompts):
        raise GenerationError(f"got {len(prompts)} prompt(s) but {len(images)} image list(s); pass one "
                              "(possibly empty) list of images per prompt")
    embeddings = _checked_embeddings(model, prompts, images, model.vision_args.image_token_id, params.max_tokens)
    return generate_with_embeddings(model, prompts, embeddings, params, eos_id, chunk_size)


@torch.no_grad()
def generate_with_audio(
    model: Voxtral,
    prompts: Sequence[Sequence[int]],
    audio_features: Sequence[torch.Tensor | None],
    params: SamplingParams | None = None,
    eos_id: int | None = None,
    chunk_size: int | None = None,
) -> list[Completion]:
    """Generate a continuation of each prompt; `audio_features[i]` are the log-mel chunks of the audio(s) of
    `prompts[i]` (None for a prompt without audio). The prefill reads the spliced embeddings; decoding,
    sampling, stopping and batching are `generation.generate`'s."""
    params = params or SamplingParams()
    if len(audio_features) != len(prompts):
        raise GenerationError(f"got {len(prompts)} prompt(s) but {len(audio_features)} audio feature "
                              "entries; pass one per prompt (None for a prompt without audio)")
    embeddings = _checked_embeddings(model, prompts, audio_features, model.audio_token_id, params.max_tokens)
    return generate_with_embeddings(model, prompts, embeddings, params, eos_id, chunk_size)


def transcribe(
    model: Voxtral,
    tokenizer: Tokenizer,
    audio: Audio,
    language: str | None = None,
    params: SamplingParams | None = None,
) -> str:
    """Transcribe `audio` (greedy unless `params` say otherwise) and return the text."""
    encoder = getattr(tokenizer.mistral.instruct_tokenizer, "audio_encoder", None)
    if encoder is not None and encoder.special_ids.audio != model.audio_token_id:
        raise TokenizerError(f"the tokenizer's [AUDIO] id {encoder.special_ids.audio} is not the model's "
                             f"audio_token_id {model.audio_token_id}; use the model's own tokenizer")
    tokens, prepared = transcription_prompt(tokenizer, audio, language)
    features = audio_features(prepared, model.audio_args)
    [completion] = generate_with_audio(model, [tokens], [features], params, eos_id=tokenizer.eos_id)
    return tokenizer.decode(completion.tokens)


__all__ = ["generate_with_audio", "generate_with_embeddings", "generate_with_images", "prompt_embeddings",
           "transcribe"]
