"""Voxtral against Hugging Face transformers on a tiny random config: log-mel features, audio embeddings,
logits and greedy generation for audio longer than one 30-s chunk, with the weights read back from
`save_pretrained`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tramontane.errors import CheckpointError
from tramontane.generation import SamplingParams
from tramontane.generation.multimodal import generate_with_audio
from tramontane.models.audio import (
    AUDIO_TOKEN_ID,
    AudioEncoderArgs,
    audio_features,
    load_voxtral,
)

transformers = pytest.importorskip("transformers")
from transformers import VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor  # noqa: E402
from transformers.models.whisper.modeling_whisper import sinusoids  # noqa: E402

SR = 16_000
BEGIN_AUDIO = 25
TINY_AUDIO_ARGS = AudioEncoderArgs(dim=32, n_layers=2, hidden_dim=128, n_heads=2, head_dim=16)


def tiny_hf_config() -> VoxtralConfig:
    return VoxtralConfig(
        # transformers' adapter needs intermediate_size = 4 * hidden_size (it reshapes to intermediate_size).
        audio_config=dict(model_type="voxtral_encoder", hidden_size=32, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=2, num_mel_bins=128,
                          max_source_positions=1500),
        text_config=dict(model_type="llama", vocab_size=211, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=False),
        audio_token_id=AUDIO_TOKEN_ID,
    )


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirp plus noise (energy in every mel bin, so a wrong filter or frame shows), growing louder so that
    the loudest frame lies in the last chunk: the log-mel floor must come from the whole audio."""
    t = np.arange(int(seconds * SR)) / SR
    chirp = 0.3 * np.sin(2 * np.pi * (100 * t + 60 * t**2))
    noise = 0.05 * np.random.default_rng(seed).standard_normal(t.shape)
    return ((0.05 + t / seconds) * (chirp + noise)).astype(np.float32)


def hf_features(audio: np.ndarray) -> torch.Tensor:
    """transformers' features as VoxtralProcessor computes them: pad to 30-s multiples, then split."""
    extractor = WhisperFeatureExtractor(feature_size=128)
    out = extractor(audio, sampling_rate=SR, padding=True, truncation=False, pad_to_multiple_of=480_000,
                    return_tensors="pt")["input_features"]  # 1 M F
    return out.reshape(128, -1, 3000).transpose(0, 1)


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    torch.manual_seed(0)
    hf = VoxtralForConditionalGeneration(tiny_hf_config()).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # ones would hide a swapped norm
            elif "embed_positions" not in name:
                param.normal_(0.0, 0.08)
        # The released checkpoints carry Whisper's sinusoids here; a fresh HF model holds random numbers.
        hf.model.audio_tower.embed_positions.weight.copy_(sinusoids(1500, 32))
    path = tmp_path_factory.mktemp("voxtral_hf")
    hf.save_pretrained(path)
    return hf, load_voxtral(path), path


@pytest.fixture(scope="module")
def long_audio() -> np.ndarray:
    return synthetic_audio(37.5)  # two 30-s chunks, the second mostly padding


@pytest.fixture(scope="module")
def features(long_audio) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformers' log-mel chunks, ours) of `long_audio`."""
    return hf_features(long_audio), audio_features(long_audio, TINY_AUDIO_ARGS)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    """[BOS, INST, BEGIN_AUDIO, AUDIO x 750, text..., /INST] with arbitrary text ids."""
    text = torch.randint(40, 211, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    return torch.tensor([[1, 3, BEGIN_AUDIO] + [AUDIO_TOKEN_ID] * 750 + text + [4]])


def test_log_mel_equals_whisper_feature_extractor(features):
    theirs, ours = features
    assert ours.shape == theirs.shape == (2, 128, 3000)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_audio_embeddings_equal_hf(hf_and_ours, features):
    hf, ours, _ = hf_and_ours
    with torch.no_grad():
        theirs = hf.get_audio_features(features[0]).pooler_output
        mine = ours.embed_audio(features[0])
    assert mine.shape == theirs.shape == (750, 64)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_logits_equal_hf(hf_and_ours, features, prompt):
    """Waveform to logits: each side computes its own features."""
    hf, ours, _ = hf_and_ours
    with torch.no_grad():
        theirs = hf(input_ids=prompt, input_features=features[0]).logits
        mine = ours(prompt, features[1])
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    # The audio must matter: other audio gives other logits after the [AUDIO] block.
    with torch.no_grad():
        other = ours(prompt, audio_features(synthetic_audio(37.5, seed=5), ours.audio_args))
    assert (other[0, -8:] - mine[0, -8:]).abs().max() > 1e-3


def test_greedy_generation_equals_hf(hf_and_ours, features, prompt):
    hf, ours, _ = hf_and_ours
    with torch.no_grad():
        out = hf.generate(input_ids=prompt, input_features=features[0], max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    theirs = out[0, prompt.shape[1]:].tolist()
    [completion] = generate_with_audio(ours, [prompt[0].tolist()], [features[1]],
                                       SamplingParams(max_tokens=8))
    assert completion.tokens == theirs and len(theirs) == 8


def test_batched_generation_with_and_without_audio(hf_and_ours, features, prompt):
    """Left padding and a text-only row do not change what each prompt generates alone."""
    _, ours, _ = hf_and_ours
    features = features[1]
    text_only = [1, 3, 50, 60, 70, 4]
    params = SamplingParams(max_tokens=5)
    alone = [generate_with_audio(ours, [prompt[0].tolist()], [features], params)[0].tokens,
             generate_with_audio(ours, [text_only], [None], params)[0].tokens]
    batched = generate_with_audio(ours, [prompt[0].tolist(), text_only], [features, None], params,
                                  chunk_size=100)
    assert [c.tokens for c in batched] == alone


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_consolidated_checkpoint_loads_to_the_same_model(hf_and_ours, tmp_path):
    """HF -> consolidated names (our model's state dict) -> load: the same tensors. The text embedding may
    also be stored under the audio module's name, as transformers' converter allows."""
    _, ours, _ = hf_and_ours
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    state["mm_whisper_embeddings.tok_embeddings.weight"] = state.pop("tok_embeddings.weight")
    save_file(state, str(tmp_path / "consolidated.safetensors"))
    params = {**ours.args.to_params(), "multimodal": ours.audio_args.to_params()}
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert_same_weights(load_voxtral(tmp_path), ours)


def test_hf_runtime_names_load_too(hf_and_ours, tmp_path):
    """transformers 5.x's own state_dict() names (`model.` prefixes, top-level lm_head) are accepted."""
    hf, ours, saved = hf_and_ours
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    assert_same_weights(load_voxtral(tmp_path), ours)


def test_non_sinusoidal_positions_are_refused(hf_and_ours, tmp_path):
    hf, _, saved = hf_and_ours
    from safetensors.torch import load_file

    state = load_file(str(saved / "model.safetensors"))
    state["audio_tower.embed_positions.weight"] = torch.randn(1500, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(CheckpointError, match="sinusoidal"):
        load_voxtral(tmp_path)
