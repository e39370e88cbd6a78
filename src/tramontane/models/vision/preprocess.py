"""Images into Pixtral prompts, by mistral_common only: reading files, the tokenizer's image settings, and
chats whose messages carry images (`[IMG]`/`[IMG_BREAK]`/`[IMG_END]` tokens and resized, normalised pixels)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tramontane.errors import ConfigError, DataError, TokenizerError
from tramontane.models.vision.network import VisionEncoderArgs

if TYPE_CHECKING:
    from PIL.Image import Image

    from tramontane.tokenizer import Tokenizer


def load_image(source: Image | str | os.PathLike[str]) -> Image:
    """A PIL image, as given or read from a file path (`DataError` if it cannot be read)."""
    try:
        from PIL import Image as PILImage
        from PIL import UnidentifiedImageError
    except ImportError:  # pragma: no cover - pillow comes with mistral_common[image]
        raise ImportError("images need pillow and opencv: pip install 'tramontane[multimodal]'") from None
    if isinstance(source, PILImage.Image):
        return source
    path = Path(source)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        image = PILImage.open(path)
        image.load()  # decode now, so that a truncated file fails here and not in the tokenizer
    except (UnidentifiedImageError, OSError, ValueError, PILImage.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}); give a PNG, JPEG, WebP or "
                        "other file that PIL can open") from None
    return image


def _image_encoder(tokenizer: Tokenizer) -> Any:
    encoder = tokenizer.mistral.instruct_tokenizer.image_encoder
    if encoder is None:
        raise TokenizerError(f"{tokenizer!r} cannot encode images (no image config); use a multimodal "
                             "tokenizer, e.g. Tokenizer.builtin('v3-tekken-mm') or a Pixtral tekken.json")
    return encoder


def check_tokenizer(tokenizer: Tokenizer, vision_args: VisionEncoderArgs) -> None:
    """`ConfigError` unless the tokenizer cuts images as the model expects (patch, merge, special ids)."""
    encoder = _image_encoder(tokenizer)
    config, ids = encoder.image_config, encoder.special_ids
    ours = {"patch size": vision_args.patch_size, "spatial merge size": vision_args.spatial_merge_size,
            "[IMG] id": vision_args.image_token_id, "[IMG_BREAK] id": vision_args.image_break_token_id,
            "[IMG_END] id": vision_args.image_end_token_id}
    theirs = {"patch size": config.image_patch_size, "spatial merge size": config.spatial_merge_size,
              "[IMG] id": ids.img, "[IMG_BREAK] id": ids.img_break, "[IMG_END] id": ids.img_end}
    wrong = [f"{k}: tokenizer {theirs[k]}, model {v}"
             for k, v in ours.items() if v is not None and theirs[k] != v]
    if wrong:
        raise ConfigError(f"the tokenizer's image settings do not match the model ({'; '.join(wrong)}); "
                          "use the tokenizer file shipped with the checkpoint")


def encode_image(
    tokenizer: Tokenizer, image: Image | str | os.PathLike[str]
) -> tuple[list[int], torch.Tensor]:
    """One image through mistral_common's `ImageEncoder`: its `[IMG]`/`[IMG_BREAK]`/`[IMG_END]` tokens and
    the resized, normalised pixels [C, H, W] (float32)."""
    from mistral_common.protocol.instruct.chunk import ImageChunk

    encoding = _image_encoder(tokenizer)(ImageChunk(image=load_image(image)))
    return list(encoding.tokens), torch.from_numpy(np.ascontiguousarray(encoding.image))


def image_message(text: str, images: Sequence[Image | str | os.PathLike[str]]) -> Any:
    """A mistral_common user message: the images (read with `load_image`), then `text`."""
    from mistral_common.protocol.instruct.chunk import ContentChunk, ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage

    content: list[ContentChunk] = [ImageChunk(image=load_image(image)) for image in images]
    return UserMessage(content=content + [TextChunk(text=text)])


def encode_image_chat(
    tokenizer: Tokenizer, messages: Sequence[Any], vision_args: VisionEncoderArgs | None = None
) -> tuple[list[int], list[torch.Tensor]]:
    """A chat (role/content dicts or mistral_common messages, e.g. `image_message`s) through the tokenizer's
    chat template: prompt ids and the image tensors [C, H, W] of all messages, in prompt order. With
    `vision_args`, the tokenizer is checked against them."""
    _image_encoder(tokenizer)
    if vision_args is not None:
        check_tokenizer(tokenizer, vision_args)
    tokenized = tokenizer.encode_chat_full(messages)
    return list(tokenized.tokens), [torch.from_numpy(np.ascontiguousarray(a)) for a in tokenized.images]


def encode_image_prompt(
    tokenizer: Tokenizer,
    text: str,
    images: Sequence[Image | str | os.PathLike[str]],
    vision_args: VisionEncoderArgs | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """A one-turn user chat (the images, then `text`) through the tokenizer's chat template: prompt ids and
    the image tensors [C, H, W] in prompt order. With `vision_args`, the tokenizer is checked against them."""
    _image_encoder(tokenizer)  # the tokenizer first, then the images, as with a chat
    if vision_args is not None:
        check_tokenizer(tokenizer, vision_args)
    return encode_image_chat(tokenizer, [image_message(text, images)])


__all__ = ["check_tokenizer", "encode_image", "encode_image_chat", "encode_image_prompt", "image_message",
           "load_image"]
