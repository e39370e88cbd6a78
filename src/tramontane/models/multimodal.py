"""What every multimodal Mistral model shares: encoder outputs take the places of placeholder tokens.

Pixtral's `[IMG]` and Voxtral's `[AUDIO]` work the same way: the tokenizer (mistral_common) writes one
placeholder token per encoder embedding, the placeholders are embedded like any token, and the encoder's
embeddings then replace them, in order, row by row (as transformers' `masked_scatter` does). Generating from
such prompts is `tramontane.generation.multimodal`'s.
"""

from __future__ import annotations

import torch

from tramontane.errors import GenerationError


def splice_embeddings(
    text_embeds: torch.Tensor, token_ids: torch.Tensor, placeholder_id: int, features: torch.Tensor
) -> torch.Tensor:
    """Replace the embeddings of the `placeholder_id` tokens by `features`, in row-major order.

    text_embeds [B, T, D], token_ids [B, T], features [N, D] with N = number of placeholders in `token_ids`.
    Returns a new tensor [B, T, D] in the dtype of `text_embeds`; the inputs are not modified.
    """
    if token_ids.shape != text_embeds.shape[:2]:
        raise GenerationError(
            f"token ids {list(token_ids.shape)} do not match the embeddings {list(text_embeds.shape)}"
        )
    if features.dim() != 2 or features.shape[1] != text_embeds.shape[2]:
        raise GenerationError(f"features must be [N, {text_embeds.shape[2]}] (one row per placeholder), "
                              f"got {list(features.shape)}")
    mask = token_ids == placeholder_id  # B T
    n_placeholders = int(mask.sum())
    if n_placeholders != features.shape[0]:
        raise GenerationError(
            f"the prompt holds {n_placeholders} placeholder token(s) (id {placeholder_id}) but "
            f"{features.shape[0]} encoder embedding(s) were given; tokenize the prompt and preprocess "
            "the media from the same request (one placeholder per embedding)"
        )
    out = text_embeds.clone()
    out[mask] = features.to(device=out.device, dtype=out.dtype)
    return out

