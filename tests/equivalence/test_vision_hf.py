"""Pixtral vision against Hugging Face transformers on tiny random configs: the encoder alone
(`PixtralVisionModel`), whole models (`LlavaForConditionalGeneration`, `Mistral3ForConditionalGeneration`)
loaded from `save_pretrained` directories by our loader (so the key maps and the q/k permutation are
exercised), greedy generation, and prompts built by mistral_common end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tramontane.generation import SamplingParams
from tramontane.generation.multimodal import generate_with_images
from tramontane.models.vision import (
    VisionLanguageModel,
    consolidated_to_hf_vision,
    encode_image_prompt,
    load_vision_language_model,
)
from tramontane.tokenizer import Tokenizer

from tests.unit.test_vision import IMG, image_tokens, random_images

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def _vision_config(patch_size: int = 8, image_size: int = 64):
    # The released model's vision FFN is SiLU-gated; transformers' PixtralVisionConfig defaults to gelu.
    return transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=image_size,
                                            patch_size=patch_size, hidden_act="silu")


def _text_config(vocab_size: int = 97):
    return transformers.MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, rms_norm_eps=1e-5, sliding_window=None)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that a wrong permutation or a swapped tensor shows (norms away from one)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


def hf_model(kind: str, seed: int = 0, patch_size: int = 8, vocab_size: int = 97, image_size: int = 64):
    if kind == "llava":
        config = transformers.LlavaConfig(
            vision_config=_vision_config(patch_size, image_size), text_config=_text_config(vocab_size),
            image_token_index=IMG, vision_feature_layer=-1, vision_feature_select_strategy="full",
            projector_hidden_act="gelu", multimodal_projector_bias=True)
        model = transformers.LlavaForConditionalGeneration(config)
    else:  # HF's Mistral3Config ties the output head by default: the loader must follow that
        config = transformers.Mistral3Config(vision_config=_vision_config(patch_size, image_size),
                                             text_config=_text_config(vocab_size), image_token_index=IMG,
                                             spatial_merge_size=2)
        model = transformers.Mistral3ForConditionalGeneration(config)
    model.config._attn_implementation = "eager"
    return _randomize(model, seed)


def _pixel_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's input: images zero-padded to one [N, C, Hmax, Wmax] tensor, plus their real sizes."""
    h = max(i.shape[1] for i in images)
    w = max(i.shape[2] for i in images)
    batch = torch.zeros(len(images), 3, h, w)
    for k, image in enumerate(images):
        batch[k, :, : image.shape[1], : image.shape[2]] = image
    return batch, torch.tensor([list(i.shape[1:]) for i in images])


def _load_ours(hf, tmp_path: Path) -> VisionLanguageModel:
    hf.save_pretrained(tmp_path / "hf")
    return load_vision_language_model(tmp_path / "hf")


def test_vision_encoder_matches_pixtral_vision_model(tmp_path: Path) -> None:
    hf = hf_model("llava", seed=1)
    ours = _load_ours(hf, tmp_path)
    images = random_images((32, 48), (64, 16), seed=2)  # different sizes, one call
    pixels, sizes = _pixel_batch(images)
    with torch.no_grad():
        expected = hf.model.vision_tower(pixels, image_sizes=sizes).last_hidden_state[0]
        got = ours.vision_encoder(images)
    assert got.shape == (4 * 6 + 8 * 2, 32)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llava", "mistral3"])
def test_logits_match_hf_with_two_images(kind: str, tmp_path: Path) -> None:
    hf = hf_model(kind, seed=3)
    ours = _load_ours(hf, tmp_path)
    assert ours.args.tied_embeddings == (kind == "mistral3")
    images = random_images((32, 48), (16, 32), seed=4)  # multiples of patch 8 * merge 2
    merge = 2 if kind == "mistral3" else 1
    grids = [(h // 8 // merge, w // 8 // merge) for _, h, w in (i.shape for i in images)]
    prompt = [1, 5, *image_tokens(*grids[0]), 40, 41, *image_tokens(*grids[1]), 50, 60, 70]
    tokens = torch.tensor([prompt])
    pixels, sizes = _pixel_batch(images)
    with torch.no_grad():
        expected = hf(input_ids=tokens, pixel_values=pixels, image_sizes=sizes).logits
        got = ours(tokens, images)
        text_only = ours(torch.tensor([[t if t != IMG else 7 for t in prompt]]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    first_img = prompt.index(IMG)
    assert (got[0, first_img:] - text_only[0, first_img:]).abs().max() > 1e-2  # the images matter


@pytest.mark.parametrize("kind", ["llava", "mistral3"])
def test_hf_names_and_permutation_equal_save_pretrained(kind: str, tmp_path: Path) -> None:
    """Our consolidated -> HF map reproduces the file transformers writes, tensor for tensor."""
    hf = hf_model(kind, seed=5)
    ours = _load_ours(hf, tmp_path)
    written = load_file(tmp_path / "hf" / "model.safetensors")
    mapped = consolidated_to_hf_vision(ours.state_dict(), ours.args, ours.vision_args)
    assert mapped.keys() == written.keys()
    assert all(torch.equal(mapped[k], written[k]) for k in written)


def test_greedy_generation_with_an_image_matches_hf(tmp_path: Path) -> None:
    hf = hf_model("llava", seed=6)
    ours = _load_ours(hf, tmp_path)
    images = random_images((24, 40), seed=7)
    prompt = [1, 3, *image_tokens(3, 5), 30, 31, 4]
    pixels, sizes = _pixel_batch(images)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels, image_sizes=sizes,
                          max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    got = generate_with_images(ours, [prompt], [images], SamplingParams(max_tokens=8))[0].tokens
    assert got == expected
    assert len(set(expected)) > 1  # a degenerate model repeating one token would prove little


@pytest.mark.parametrize("kind", ["llava", "mistral3"])
def test_mistral_common_prompt_end_to_end(kind: str, tmp_path: Path) -> None:
    """Tokens and pixels from mistral_common (v7 multimodal tokenizer: [IMG]=10, patch 16) -> same logits as
    HF. For Mistral3 the tokenizer's image encoder cuts 8 px patches merged 2x2, as a Mistral3 tokenizer
    does."""
    from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder
    from PIL import Image

    tokenizer = Tokenizer.builtin("v7-mm")
    patch = 16 if kind == "llava" else 8
    if kind == "mistral3":
        encoder = tokenizer.mistral.instruct_tokenizer.image_encoder
        tokenizer.mistral.instruct_tokenizer.image_encoder = ImageEncoder(
            ImageConfig(image_patch_size=8, max_image_size=128, spatial_merge_size=2), encoder.special_ids)
    hf = hf_model(kind, seed=8, patch_size=patch, vocab_size=tokenizer.vocab_size, image_size=128)
    ours = _load_ours(hf, tmp_path)
    rng = np.random.default_rng(9)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                for h, w in ((40, 70), (33, 20))]
    tokens, images = encode_image_prompt(tokenizer, "Describe both.", pictures)
    assert tokens.count(IMG) == sum(ours.tokens_per_image(i) for i in images) > 0
    pixels, sizes = _pixel_batch(images)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
        got = ours(ids, images)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
