"""Voxtral's audio path without transformers: prompts from mistral_common, audio input, configs, splicing,
context limits and checkpoint errors."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import mistral_common
import numpy as np
import pytest
import soundfile
import soxr
import torch
from mistral_common.protocol.instruct.chunk import AudioChunk, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.transcription.request import TranscriptionRequest
from mistral_common.tokens.tokenizers.audio import Audio
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from safetensors.torch import save_file

from tramontane.errors import CheckpointError, ConfigError, DataError, GenerationError
from tramontane.generation import SamplingParams
from tramontane.generation.multimodal import generate_with_audio, transcribe
from tramontane.models import ModelArgs
from tramontane.models.audio import (
    AudioEncoderArgs,
    Voxtral,
    audio_chunk,
    audio_features,
    load_audio,
    load_voxtral,
    transcription_prompt,
)
from tramontane.models.multimodal import splice_embeddings
from tramontane.tokenizer import Tokenizer

SR = 16_000
AUDIO, BEGIN_AUDIO, TRANSCRIBE = 24, 25, 34
TINY_AUDIO = AudioEncoderArgs(dim=16, n_layers=1, hidden_dim=64, n_heads=2, head_dim=8)


def tiny_voxtral(vocab_size: int = 97, max_seq_len: int | None = None, seed: int = 0) -> Voxtral:
    extra = {"max_seq_len": max_seq_len} if max_seq_len else {}
    args = ModelArgs(dim=16, n_layers=1, head_dim=8, hidden_dim=32, n_heads=2, n_kv_heads=1, norm_eps=1e-5,
                     vocab_size=vocab_size, rope_theta=1e6, extra=extra)
    torch.manual_seed(seed)
    model = Voxtral(args, TINY_AUDIO)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model.eval()


def tone(seconds: float, rate: int = SR, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def audio_tokenizer(tmp_path_factory) -> Tokenizer:
    """mistral_common ships no audio tokenizer: a shipped tekken file made v7, with Voxtral's audio section
    and audio special tokens ([AUDIO]=24, [BEGIN_AUDIO]=25, [TRANSCRIBE]=34)."""
    data = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240911.json").read_text())
    special = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    names = {AUDIO: "[AUDIO]", BEGIN_AUDIO: "[BEGIN_AUDIO]", TRANSCRIBE: "[TRANSCRIBE]"}
    special += [{"rank": i, "token_str": names.get(i, f"<SPECIAL_{i}>"), "is_control": True}
                for i in range(len(special), 35)]
    data["special_tokens"] = special
    data["config"]["version"] = "v7"
    data.pop("image", None)
    data["audio"] = {"sampling_rate": SR, "frame_rate": 12.5, "chunk_length_s": 30.0,
                     "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}}
    path = tmp_path_factory.mktemp("tok") / "tekken.json"
    path.write_text(json.dumps(data))
    return Tokenizer.from_file(path)


# -- prompts: ours equal mistral_common's ----------------------------------------------------------------


def test_transcription_prompt_equals_mistral_common(audio_tokenizer, tmp_path):
    samples = tone(31.0)
    soundfile.write(tmp_path / "a.wav", samples, SR, subtype="FLOAT")
    audio = load_audio(tmp_path / "a.wav")
    tokens, prepared = transcription_prompt(audio_tokenizer, audio, language="en")

    b64 = base64.b64encode((tmp_path / "a.wav").read_bytes()).decode()
    alone = audio_tokenizer.mistral.instruct_tokenizer.encode_transcription(
        TranscriptionRequest(audio=b64, language="en"))
    assert tokens == alone.tokens
    lang = audio_tokenizer.encode("lang:en", bos=False)
    assert tokens == [1, 3, BEGIN_AUDIO] + [AUDIO] * 750 + [4] + lang + [TRANSCRIBE]
    # The audio comes back padded to whole 30-s chunks, samples untouched (float WAV, no 16-bit rounding).
    assert prepared.sampling_rate == SR and prepared.audio_array.shape == (2 * 480_000,)
    np.testing.assert_array_equal(prepared.audio_array[: len(samples)], samples)
    assert not prepared.audio_array[len(samples):].any()
    features = audio_features(prepared, TINY_AUDIO)
    assert features.shape[0] * TINY_AUDIO.tokens_per_chunk == tokens.count(AUDIO)


def test_chat_with_audio_equals_mistral_common(audio_tokenizer):
    audio = Audio(tone(2.5), SR, "wav")
    ours = audio_tokenizer.encode_chat_full(
        [UserMessage(content=[audio_chunk(audio), TextChunk(text="What is this?")])])
    alone = audio_tokenizer.mistral.encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content=[AudioChunk.from_audio(audio), TextChunk(text="What is this?")])]))
    assert ours.tokens == alone.tokens
    assert ours.tokens[:3] == [1, 3, BEGIN_AUDIO] and ours.tokens.count(AUDIO) == 375  # 2.5 s padded to 30 s
    assert ours.tokens[-1] == 4
    # mistral_common's own chunk stores 16-bit PCM; ours keeps the float samples.
    np.testing.assert_array_equal(ours.audios[0].audio_array[:40_000], audio.audio_array)
    assert np.abs(alone.audios[0].audio_array[:40_000] - audio.audio_array).max() > 0


def test_transcribe_runs_the_whole_path(audio_tokenizer):
    model = tiny_voxtral(vocab_size=audio_tokenizer.vocab_size)
    audio = Audio(tone(3.0), SR, "wav")
    params = SamplingParams(max_tokens=3)
    text = transcribe(model, audio_tokenizer, audio, language="fr", params=params)
    tokens, prepared = transcription_prompt(audio_tokenizer, Audio(tone(3.0), SR, "wav"), language="fr")
    [expected] = generate_with_audio(model, [tokens], [audio_features(prepared, model.audio_args)], params,
                                     eos_id=audio_tokenizer.eos_id)
    assert text == audio_tokenizer.decode(expected.tokens)


# -- audio input ------------------------------------------------------------------------------------------


def test_unreadable_audio_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_audio(tmp_path / "absent.wav")
    (tmp_path / "noise.wav").write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    with pytest.raises(DataError, match="cannot decode"):
        load_audio(tmp_path / "noise.wav")


def test_other_sampling_rates_are_resampled_like_by_hand(tmp_path, caplog):
    samples = tone(3.0, rate=22_050)
    soundfile.write(tmp_path / "a.wav", samples, 22_050, subtype="FLOAT")
    with caplog.at_level(logging.INFO, logger="tramontane.models.audio"):
        audio = load_audio(tmp_path / "a.wav")
    assert "22050 Hz to 16000 Hz" in caplog.text
    assert audio.sampling_rate == SR
    by_hand = soxr.resample(samples, 22_050, SR, quality="HQ")
    torch.testing.assert_close(audio_features(audio, TINY_AUDIO), audio_features(by_hand, TINY_AUDIO),
                               atol=0, rtol=0)
    # Not resampling would be visibly different.
    assert (audio_features(samples, TINY_AUDIO) - audio_features(by_hand, TINY_AUDIO)).abs().max() > 0.1
    # An in-memory Audio at another rate is resampled the same way, and left as it was.
    in_memory = Audio(samples, 22_050, "wav")
    torch.testing.assert_close(audio_features(in_memory, TINY_AUDIO), audio_features(by_hand, TINY_AUDIO),
                               atol=0, rtol=0)
    assert in_memory.sampling_rate == 22_050 and in_memory.audio_array is samples


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(1.0, freq=300.0), tone(1.0, freq=900.0)
    soundfile.write(tmp_path / "s.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav").audio_array, (left + right) / 2, atol=1e-7)


def test_features_are_whole_chunks():
    assert audio_features(tone(0.5), TINY_AUDIO).shape == (1, 128, 3000)
    assert audio_features(tone(30.0), TINY_AUDIO).shape == (1, 128, 3000)
    assert audio_features(tone(30.01), TINY_AUDIO).shape == (2, 128, 3000)
    with pytest.raises(DataError):
        audio_features(np.zeros(0, dtype=np.float32), TINY_AUDIO)
    with pytest.raises(DataError):
        audio_features(np.zeros((2, 100), dtype=np.float32), TINY_AUDIO)


# -- the model: splicing, bad inputs, context --------------------------------------------------------------


def test_splice_replaces_placeholders_in_row_major_order():
    embeds = torch.zeros(2, 4, 3)
    ids = torch.tensor([[7, 24, 24, 7], [24, 7, 7, 7]])
    features = torch.arange(9.0).view(3, 3)
    out = splice_embeddings(embeds, ids, 24, features)
    assert torch.equal(out[0, 1], features[0]) and torch.equal(out[0, 2], features[1])
    assert torch.equal(out[1, 0], features[2])
    assert not out[ids != 24].any() and not embeds.any()  # the input is left alone
    with pytest.raises(GenerationError, match="3 placeholder"):
        splice_embeddings(embeds, ids, 24, features[:2])


def test_bad_audio_inputs_are_clear_errors():
    model = tiny_voxtral()
    one_chunk = audio_features(tone(1.0), TINY_AUDIO)
    prompt = torch.tensor([[1, 3, BEGIN_AUDIO] + [AUDIO] * 375 + [4]])
    with torch.no_grad():
        assert model(prompt, one_chunk).shape == (1, 379, 97)
        # Two chunks of features for one chunk's tokens.
        with pytest.raises(GenerationError, match="375 placeholder.*750"):
            model(prompt, torch.cat([one_chunk, one_chunk]))
        with pytest.raises(DataError, match="log-mel chunks"):
            model(prompt, one_chunk[:, :, :1000])
    with pytest.raises(GenerationError, match="375 placeholder.*but 0"):
        generate_with_audio(model, [prompt[0].tolist()], [None])
    with pytest.raises(GenerationError, match="one per prompt"):
        generate_with_audio(model, [prompt[0].tolist()], [])


def test_audio_too_long_for_the_context(audio_tokenizer):
    model = tiny_voxtral(vocab_size=audio_tokenizer.vocab_size, max_seq_len=500)
    with pytest.raises(GenerationError, match="750 of them audio.*context is 500.*30 s of audio takes 375"):
        transcribe(model, audio_tokenizer, Audio(tone(31.0), SR, "wav"))
    prompt = torch.tensor([[1, 3, BEGIN_AUDIO] + [AUDIO] * 750 + [4]])
    with pytest.raises(GenerationError, match="context is 500"):
        model(prompt, audio_features(tone(31.0), TINY_AUDIO))
    # 30 s fits: 379 prompt tokens + 8 new.
    short = [1, 3, BEGIN_AUDIO] + [AUDIO] * 375 + [4]
    [done] = generate_with_audio(model, [short], [audio_features(tone(30.0), TINY_AUDIO)],
                                 SamplingParams(max_tokens=8))
    assert len(done.tokens) == 8


# -- configuration -------------------------------------------------------------------------------------------


def released_multimodal() -> dict:
    """params.json's multimodal section of the released Voxtral Mini (encoder numbers as in the HF config)."""
    return {"whisper_model_args": {
        "encoder_args": {"dim": 1280, "n_layers": 32, "hidden_dim": 5120, "n_heads": 20, "head_dim": 64,
                         "vocab_size": 51866, "max_source_positions": 1500,
                         "audio_encoding_args": {"sampling_rate": 16000, "num_mel_bins": 128,
                                                 "hop_length": 160, "window_size": 400}},
        "downsample_args": {"downsample_factor": 4}}}


def test_audio_args_from_params():
    args = AudioEncoderArgs.from_params(released_multimodal())
    assert (args.dim, args.n_layers, args.hidden_dim, args.n_heads, args.head_dim) == (1280, 32, 5120, 20, 64)
    assert (args.chunk_frames, args.chunk_samples, args.tokens_per_chunk) == (3000, 480_000, 375)
    assert AudioEncoderArgs.from_params(args.to_params()) == args
    assert args.to_params()["whisper_model_args"]["encoder_args"]["vocab_size"] == 51866


@pytest.mark.parametrize("change, message", [
    (lambda m: m["whisper_model_args"]["encoder_args"].update(causal=True), "causal"),
    (lambda m: m["whisper_model_args"]["encoder_args"].pop("n_heads"), "missing"),
    (lambda m: m["whisper_model_args"]["downsample_args"].update(downsample_factor=7), "multiple"),
    (lambda m: m.pop("whisper_model_args"), "not an audio model"),
])
def test_bad_audio_params_are_config_errors(change, message):
    multimodal = released_multimodal()
    change(multimodal)
    with pytest.raises(ConfigError, match=message):
        AudioEncoderArgs.from_params(multimodal)


# -- checkpoints -------------------------------------------------------------------------------------------


def write_consolidated(model: Voxtral, path: Path, state: dict | None = None) -> Path:
    path.mkdir(exist_ok=True)
    state = state if state is not None else {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "consolidated.safetensors"))
    params = {**model.args.to_params(), "multimodal": model.audio_args.to_params()}
    (path / "params.json").write_text(json.dumps(params))
    return path


def test_consolidated_round_trip(tmp_path):
    model = tiny_voxtral()
    loaded = load_voxtral(write_consolidated(model, tmp_path / "ok"))
    assert not any(t.is_meta for t in loaded.state_dict().values())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert load_voxtral(tmp_path / "ok", dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16


def test_checkpoint_mismatches_are_named(tmp_path):
    model = tiny_voxtral()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    key = "mm_whisper_embeddings.whisper_encoder.transformer.layers.0.attention.wk.weight"
    broken = {k: v for k, v in state.items() if k != key}
    broken["mm_whisper_embeddings.whisper_encoder.transformer.layers.0.attention.wk.bias"] = torch.zeros(16)
    broken["mm_whisper_embeddings.audio_language_projection.0.weight"] = torch.zeros(16, 63)
    with pytest.raises(CheckpointError) as err:
        load_voxtral(write_consolidated(model, tmp_path / "bad", broken))
    text = str(err.value)
    assert f"missing tensor(s) {key}" in text
    assert f"unexpected tensor(s) {key.replace('weight', 'bias')}" in text
    assert "audio_language_projection.0.weight expected shape [16, 64], found [16, 63]" in text


def test_a_tensor_stored_under_both_names_is_refused(tmp_path):
    model = tiny_voxtral()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["mm_whisper_embeddings.tok_embeddings.weight"] = state["tok_embeddings.weight"].clone()
    with pytest.raises(CheckpointError, match="tok_embeddings.weight.*twice"):
        load_voxtral(write_consolidated(model, tmp_path / "twice", state))


def test_text_only_params_are_refused(tmp_path):
    model = tiny_voxtral()
    path = write_consolidated(model, tmp_path / "text")
    (path / "params.json").write_text(json.dumps(model.args.to_params()))
    with pytest.raises(ConfigError, match="multimodal"):
        load_voxtral(path)
