"""Pixtral vision without an oracle library: 2D RoPE layout, image isolation, patch merging, splicing,
pre-processing through mistral_common, checkpoint loading and the errors users see."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tramontane.errors import CheckpointError, ConfigError, DataError, GenerationError, TokenizerError
from tramontane.generation import SamplingParams
from tramontane.generation.multimodal import generate_with_images
from tramontane.models import ModelArgs
from tramontane.models.multimodal import splice_embeddings
from tramontane.models.vision import (
    PatchMerger,
    VisionEncoderArgs,
    VisionLanguageModel,
    check_tokenizer,
    consolidated_to_hf_vision,
    encode_image,
    encode_image_chat,
    encode_image_prompt,
    hf_to_consolidated_vision,
    image_message,
    load_image,
    load_vision_language_model,
    rotary_angles_2d,
)
from tramontane.tokenizer import Tokenizer

IMG, IMG_BREAK, IMG_END = 10, 12, 13  # tekken ids; the tiny vocabulary reuses them

# ------------------------------------------------------------------------------------- shared tiny models


def tiny_vision_args(patch_merge: bool = False, **overrides) -> VisionEncoderArgs:
    params = dict(hidden_size=32, num_channels=3, image_size=64, patch_size=8, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=2, rope_theta=10_000.0, image_token_id=IMG,
                  image_break_token_id=IMG_BREAK, image_end_token_id=IMG_END, adapter_bias=not patch_merge)
    if patch_merge:
        params |= dict(spatial_merge_size=2, add_pre_mm_projector_layer_norm=True,
                       mm_projector_id="patch_merge")
    params.update(overrides)
    return VisionEncoderArgs(**params)


def tiny_text_args(**overrides) -> ModelArgs:
    params = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                  vocab_size=97, rope_theta=10_000.0)
    params.update(overrides)
    return ModelArgs(**params)


def random_vlm(
    args: ModelArgs, vision_args: VisionEncoderArgs, seed: int = 0, **kwargs
) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = VisionLanguageModel(args, vision_args, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


def image_tokens(rows: int, cols: int) -> list[int]:
    """mistral_common's layout: ([IMG] * cols + [IMG_BREAK]) * rows, the last break an [IMG_END]."""
    tokens = ([IMG] * cols + [IMG_BREAK]) * rows
    tokens[-1] = IMG_END
    return tokens


def random_images(*sizes: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


# ------------------------------------------------------------------------------------------------ config


def test_args_from_released_params() -> None:
    """Mistral Small 3.1's params.json section (mistral-inference / vLLM field names)."""
    section = {"hidden_size": 1024, "num_channels": 3, "max_image_size": 1540, "patch_size": 14,
               "rope_theta": 10000.0, "intermediate_size": 4096, "num_hidden_layers": 24,
               "num_attention_heads": 16, "mm_projector_id": "patch_merge", "spatial_merge_size": 2,
               "add_pre_mm_projector_layer_norm": True, "adapter_bias": False, "image_token_id": 10,
               "image_break_token_id": 12, "image_end_token_id": 13, "image_size": 1540}
    args = VisionEncoderArgs.from_params(section)
    assert args.patch_merger and args.head_dim == 64 and not args.adapter_bias
    assert VisionEncoderArgs.from_params(args.to_params()) == args
    with pytest.raises(ConfigError, match="missing required key"):
        VisionEncoderArgs.from_params({k: v for k, v in section.items() if k != "patch_size"})


@pytest.mark.parametrize("bad, match", [
    (dict(num_attention_heads=3), "multiple of"),
    (dict(hidden_size=24, num_attention_heads=4), "multiple of 4"),
    (dict(mm_projector_id="mlp"), "not supported"),
    (dict(spatial_merge_size=2), "needs mm_projector_id"),
    (dict(patch_size=0), "positive integer"),
])
def test_bad_vision_args(bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_vision_args(**bad)


# -------------------------------------------------------------------------------------------------- encoder


def test_2d_rope_layout_matches_mistral_inference() -> None:
    """precompute_freqs_cis_2d: angle[r, c] = [r * f[0::2], c * f[1::2]], f = theta^(-2i/D)."""
    d, theta, h, w = 16, 10_000.0, 5, 7
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    freqs_h = torch.outer(torch.arange(h).float(), freqs[::2])
    freqs_w = torch.outer(torch.arange(w).float(), freqs[1::2])
    table = torch.cat([freqs_h[:, None, :].repeat(1, w, 1), freqs_w[None, :, :].repeat(h, 1, 1)], dim=-1)
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    cos, sin = rotary_angles_2d(rows, cols, d, theta)
    expected = table.reshape(h * w, d // 2)
    torch.testing.assert_close(cos[0, :, 0], expected.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0, :, 0], expected.sin(), atol=1e-6, rtol=0)
    assert not torch.equal(cos[0, :, 0, : d // 4], cos[0, :, 0, d // 4:])  # rows and columns really differ


def test_images_never_attend_to_each_other() -> None:
    model = random_vlm(tiny_text_args(), tiny_vision_args(), seed=1)
    first, second = random_images((16, 24), (32, 8), seed=2)
    changed = second + torch.randn_like(second)
    n_first = 2 * 3
    with torch.no_grad():
        both = model.vision_encoder([first, second])
        both_changed = model.vision_encoder([first, changed])
        alone = model.vision_encoder([first])
    torch.testing.assert_close(both_changed[:n_first], both[:n_first], atol=1e-6, rtol=0)
    torch.testing.assert_close(alone, both[:n_first], atol=1e-6, rtol=0)
    assert (both_changed[n_first:] - both[n_first:]).abs().max() > 1e-2


def test_patch_merger_uses_unfold_order() -> None:
    """The reference is HF's / mistral-inference's: F.unfold over the [D, h, w] grid of each image."""
    torch.manual_seed(3)
    merger = PatchMerger(dim=6, spatial_merge_size=2)
    grids = [(4, 6), (2, 2)]
    features = torch.randn(sum(h * w for h, w in grids), 6)
    expected = []
    for image, (h, w) in zip(features.split([h * w for h, w in grids]), grids):
        grid = image.view(h, w, 6).permute(2, 0, 1)[None]
        expected.append(F.unfold(grid, kernel_size=2, stride=2).view(6 * 4, -1).T)
    torch.testing.assert_close(merger(features, grids), merger.merging_layer(torch.cat(expected)))
    with pytest.raises(DataError, match="cannot be merged"):
        merger(torch.randn(3 * 2, 6), [(3, 2)])


# ------------------------------------------------------------------------------------------------ splicing


def test_splice_replaces_only_placeholders_in_order() -> None:
    tokens = torch.tensor([[1, IMG, IMG, IMG_BREAK, IMG, IMG_END, 5], [IMG, 3, 4, 5, 6, 7, 8]])
    text = torch.randn(2, 7, 4)
    features = torch.arange(16, dtype=torch.float32).view(4, 4)
    out = splice_embeddings(text, tokens, IMG, features)
    is_img = tokens == IMG
    torch.testing.assert_close(out[~is_img], text[~is_img])
    torch.testing.assert_close(out[is_img], features)  # row-major: sequence 0 first
    with pytest.raises(GenerationError, match="4 placeholder"):
        splice_embeddings(text, tokens, IMG, features[:3])


def test_prompt_and_images_must_agree() -> None:
    model = random_vlm(tiny_text_args(), tiny_vision_args())
    image = random_images((16, 24))
    prompt = torch.tensor([[1, *image_tokens(2, 3)[:-2], IMG_END, 5]])  # one [IMG] short
    with pytest.raises(GenerationError, match="placeholder"):
        model(prompt, image)
    with pytest.raises(GenerationError, match="placeholder"):
        model(torch.tensor([[1, *image_tokens(2, 3)]]), [])


def test_bad_images_are_refused() -> None:
    model = random_vlm(tiny_text_args(), tiny_vision_args())
    prompt = torch.tensor([[1, *image_tokens(2, 3)]])
    with pytest.raises(DataError, match="multiple of the patch size"):
        model(prompt, [torch.randn(3, 16, 20)])
    with pytest.raises(DataError, match="exceeds the encoder's image_size"):
        model(prompt, [torch.randn(3, 16, 72)])
    with pytest.raises(DataError, match=r"\[C=3, H, W\]"):
        model(prompt, [torch.randn(1, 16, 24)])


def test_too_many_image_tokens_for_the_context() -> None:
    model = random_vlm(tiny_text_args(), tiny_vision_args(), max_seq_len=40)
    images = random_images((64, 48))  # 8 x 6 patches: 48 [IMG] tokens
    prompt = [1, *image_tokens(8, 6), 5]
    with pytest.raises(GenerationError, match="48 of them image tokens.*context is 40"):
        model(torch.tensor([prompt]), images)
    small = random_images((16, 16))
    short = [1, *image_tokens(2, 2), 5]  # 10 tokens: fits alone, not with 40 new ones
    with pytest.raises(GenerationError, match="context is 40"):
        generate_with_images(model, [short], [small], SamplingParams(max_tokens=40))
    assert len(generate_with_images(model, [short], [small], SamplingParams(max_tokens=3))[0].tokens) <= 3


def test_cached_generation_with_images_equals_full_recompute() -> None:
    """Greedy decode through the cache (prefill in chunks of 4) reproduces argmax of a full forward over
    prompt + completion, for a left-padded batch of two prompts with different images and one without."""
    model = random_vlm(tiny_text_args(), tiny_vision_args(patch_merge=True), seed=4)
    images = [random_images((32, 16), seed=5), [], random_images((16, 16), (32, 32), seed=6)]
    prompts = [[1, *image_tokens(2, 1), 7, 8], [1, 20, 21],
               [1, 5, *image_tokens(1, 1), *image_tokens(2, 2), 9]]
    done = generate_with_images(model, prompts, images, SamplingParams(max_tokens=5), chunk_size=4)
    for prompt, imgs, completion in zip(prompts, images, done):
        full = torch.tensor([prompt + completion.tokens])
        with torch.no_grad():
            logits = model(full, imgs)
        expected = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert completion.tokens == expected


# -------------------------------------------------------------------------------------------- key maps


@pytest.mark.parametrize("patch_merge", [False, True], ids=["pixtral", "mistral3"])
def test_hf_key_map_round_trip(patch_merge: bool) -> None:
    args, vargs = tiny_text_args(), tiny_vision_args(patch_merge)
    state = random_vlm(args, vargs).state_dict()
    hf = consolidated_to_hf_vision(state, args, vargs)
    assert "vision_tower.transformer.layers.1.attention.q_proj.weight" in hf
    assert "language_model.lm_head.weight" in hf
    assert not torch.equal(hf["vision_tower.transformer.layers.0.attention.k_proj.weight"],
                           state["vision_encoder.transformer.layers.0.attention.wk.weight"])  # permuted
    back = hf_to_consolidated_vision(hf, args, vargs)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    runtime = {k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.",
               "lm_head.").replace("vision_tower.", "model.vision_tower.").replace(
               "multi_modal_projector.", "model.multi_modal_projector."): v for k, v in hf.items()}
    back = hf_to_consolidated_vision(runtime, args, vargs)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="unexpected"):
        hf_to_consolidated_vision({**hf, "vision_tower.extra.weight": torch.zeros(1)}, args, vargs)


# ------------------------------------------------------------------------------------------------ loading


def _save_consolidated(model: VisionLanguageModel, path: Path) -> Path:
    path.mkdir()
    params = {**model.args.to_params(), "vision_encoder": model.vision_args.to_params()}
    (path / "params.json").write_text(json.dumps(params))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "consolidated.safetensors"))
    return path


def test_consolidated_round_trip(tmp_path: Path) -> None:
    model = random_vlm(tiny_text_args(), tiny_vision_args(patch_merge=True), seed=7)
    loaded = load_vision_language_model(_save_consolidated(model, tmp_path / "ckpt"))
    assert loaded.vision_args == model.vision_args and loaded.patch_merger is not None
    images = random_images((32, 16), seed=8)
    prompt = torch.tensor([[1, *image_tokens(2, 1), 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt, images), model(prompt, images), atol=0, rtol=0)


@pytest.mark.parametrize("corrupt, match", [
    ("drop", "missing tensor.*vision_encoder.ln_pre.weight"),
    ("extra", "unexpected tensor.*vision_encoder.cls_token"),
    ("shape", "wrong shape.*vision_language_adapter.w_in.weight"),
])
def test_checkpoint_mismatch_is_a_clear_error(tmp_path: Path, corrupt: str, match: str) -> None:
    model = random_vlm(tiny_text_args(), tiny_vision_args())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if corrupt == "drop":
        del state["vision_encoder.ln_pre.weight"]
    elif corrupt == "extra":
        state["vision_encoder.cls_token"] = torch.zeros(32)
    else:
        state["vision_language_adapter.w_in.weight"] = torch.zeros(64, 16)
    path = _save_consolidated(model, tmp_path / "ckpt")
    save_file(state, str(path / "consolidated.safetensors"))
    with pytest.raises(CheckpointError, match=match):
        load_vision_language_model(path)


def test_text_only_params_is_refused(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text(json.dumps(tiny_text_args().to_params()))
    with pytest.raises(CheckpointError, match="no 'vision_encoder'"):
        load_vision_language_model(tmp_path)


# ------------------------------------------------------------------------------------ pre-processing


@pytest.fixture(scope="module")
def mm_tokenizer() -> Tokenizer:
    return Tokenizer.builtin("v7-mm")  # spm v7 + image config (patch 16), fast to load


def _png(path: Path, size: tuple[int, int], seed: int) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("version", ["v7-mm", "v3-tekken-mm"])
def test_prompt_tokens_and_pixels_equal_mistral_common(tmp_path: Path, version: str) -> None:
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from PIL import Image

    tokenizer = Tokenizer.builtin(version)
    first = _png(tmp_path / "a.png", (70, 40), seed=0)
    second = Image.open(_png(tmp_path / "b.png", (20, 33), seed=1))
    tokens, pixels = encode_image_prompt(tokenizer, "Compare these.", [first, second])
    request = ChatCompletionRequest(messages=[UserMessage(content=[
        ImageChunk(image=Image.open(first)), ImageChunk(image=second), TextChunk(text="Compare these.")])])
    expected = tokenizer.mistral.encode_chat_completion(request)
    assert tokens == expected.tokens
    assert len(pixels) == 2
    assert all(torch.equal(p, torch.from_numpy(e)) for p, e in zip(pixels, expected.images))
    assert [tuple(p.shape) for p in pixels] == [(3, 48, 80), (3, 48, 32)]
    img_tokens, img = encode_image(tokenizer, first)
    assert torch.equal(img, pixels[0]) and img_tokens.count(10) == 15


def test_multi_turn_chat_equals_mistral_common(mm_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """What `tramontane chat --image` encodes on a later turn: the first message's images, then the history."""
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from PIL import Image

    picture = _png(tmp_path / "a.png", (70, 40), seed=0)
    messages = [image_message("Describe it.", [picture]), {"role": "assistant", "content": "Noise."},
                {"role": "user", "content": "Which colour?"}]
    tokens, pixels = encode_image_chat(mm_tokenizer, messages)
    expected = mm_tokenizer.mistral.encode_chat_completion(ChatCompletionRequest(messages=[
        UserMessage(content=[ImageChunk(image=Image.open(picture)), TextChunk(text="Describe it.")]),
        AssistantMessage(content="Noise."), UserMessage(content="Which colour?")]))
    assert tokens == expected.tokens and tokens.count(10) == 15
    assert len(pixels) == 1 and torch.equal(pixels[0], torch.from_numpy(expected.images[0]))
    # one turn: the same as encode_image_prompt
    first_tokens, first_pixels = encode_image_chat(mm_tokenizer, messages[:1])
    prompt_tokens, prompt_pixels = encode_image_prompt(mm_tokenizer, "Describe it.", [picture])
    assert first_tokens == prompt_tokens and torch.equal(first_pixels[0], prompt_pixels[0])
    with pytest.raises(ConfigError, match="patch size: tokenizer 16, model 8"):
        encode_image_chat(mm_tokenizer, messages, tiny_vision_args())
    with pytest.raises(TokenizerError, match="cannot encode images"):
        encode_image_chat(Tokenizer.builtin("v7"), messages)


def test_model_accepts_what_the_tokenizer_makes(mm_tokenizer: Tokenizer, tmp_path: Path) -> None:
    vargs = tiny_vision_args(patch_size=16, image_break_token_id=14, image_end_token_id=15)
    model = random_vlm(tiny_text_args(vocab_size=mm_tokenizer.vocab_size), vargs)
    tokens, images = encode_image_prompt(mm_tokenizer, "Hi", [_png(tmp_path / "a.png", (40, 24), 0)], vargs)
    assert sum(model.tokens_per_image(i) for i in images) == tokens.count(vargs.image_token_id) == 6
    with torch.no_grad():
        assert model(torch.tensor([tokens]), images).shape == (1, len(tokens), mm_tokenizer.vocab_size)
    with pytest.raises(ConfigError, match="patch size: tokenizer 16, model 8"):
        check_tokenizer(mm_tokenizer, tiny_vision_args())


def test_unreadable_image_file(tmp_path: Path, mm_tokenizer: Tokenizer) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_image(broken)
    with pytest.raises(DataError, match="cannot read image"):
        encode_image_prompt(mm_tokenizer, "What is this?", [broken])
    with pytest.raises(DataError, match="not found"):
        encode_image(mm_tokenizer, tmp_path / "missing.jpg")


def test_text_only_tokenizer_cannot_encode_images(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="cannot encode images"):
        encode_image(Tokenizer.builtin("v7"), _png(tmp_path / "a.png", (16, 16), 0))
