"""Voxtral: a Whisper-style audio encoder in front of a Mistral decoder.

The data path, with the released models' numbers:

    waveform, mono 16 kHz, zero-padded to whole 30-s chunks     (mistral_common pads it when tokenizing)
    -> log-mel [128, 100 frames/s], Whisper recipe               `log_mel_spectrogram`
    -> chunks [N, 128, 3000], each encoded on its own             `audio_features`
    -> conv k3 + GELU, conv k3 stride 2 + GELU: [N, 1500, 1280], + fixed sinusoidal positions,
       32 pre-LayerNorm bidirectional blocks, final LayerNorm      `WhisperEncoder`
    -> 4 consecutive frames side by side, w_out(GELU(w_in(.))): 375 embeddings per 30 s   `AudioEmbedder`
    -> they replace the prompt's [AUDIO] tokens in order; the Mistral decoder runs as usual    `Voxtral`

Module names are those of the consolidated checkpoint (`mm_whisper_embeddings.whisper_encoder.conv_layers.0`,
`...transformer.layers.{i}.attention.wq`, the text model's at the top), so `consolidated.safetensors` loads
without renaming; `load_voxtral` maps the Hugging Face names. Prompts (`[BEGIN_AUDIO][AUDIO]x375` per 30 s,
transcription's `lang:xx[TRANSCRIBE]`) are only ever built by mistral_common.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from mistral_common.audio import mel_filter_bank
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import AudioChunk
from mistral_common.protocol.transcription.request import TranscriptionRequest
from mistral_common.tokens.tokenizers.audio import Audio
from safetensors import safe_open
from torch import nn

from tramontane.errors import CheckpointError, ConfigError, DataError, GenerationError, TokenizerError
from tramontane.generation import Completion, SamplingParams
from tramontane.models.args import ModelArgs
from tramontane.models.cache import KVCache
from tramontane.models.checkpoint import (
    assign_weights,
    args_from_hf_config,
    detect_format,
    hf_names,
    read_json_object,
    resolve_dtype,
    scan_tensors,
    weight_files,
)
from tramontane.models.multimodal import generate_with_embeddings, splice_embeddings
from tramontane.models.transformer import Transformer

if TYPE_CHECKING:
    from tramontane.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

AUDIO_TOKEN_ID = 24  # `[AUDIO]` in Voxtral's tekken.json; transformers' converter hard-codes it too
_INSTALL_HINT = "pip install 'tramontane[multimodal]' (soundfile and soxr)"


# --------------------------------------------------------------------------------------------------- config


@dataclass
class AudioEncoderArgs:
    """The audio encoder and its adapter: params.json's `multimodal.whisper_model_args` (names as there)."""

    dim: int
    n_layers: int
    hidden_dim: int
    n_heads: int
    head_dim: int
    max_source_positions: int = 1500  # encoder frames per chunk, after the stride-2 convolution
    num_mel_bins: int = 128
    sampling_rate: int = 16_000
    hop_length: int = 160
    window_size: int = 400  # = n_fft
    downsample_factor: int = 4  # encoder frames per audio token
    norm_eps: float = 1e-5
    # When set, the log-mel floor is this - 8 instead of the audio's own maximum - 8 (as vLLM reads it).
    global_log_mel_max: float | None = None
    # Keys that do not change the network (e.g. Whisper's decoder `vocab_size`), written back by `to_params`.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "hidden_dim", "n_heads", "head_dim", "max_source_positions",
                     "num_mel_bins", "sampling_rate", "hop_length", "window_size", "downsample_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"audio encoder {name} must be a positive integer, got {value!r}")
        if self.dim % 2 or self.dim < 4:
            raise ConfigError(f"audio encoder dim must be even and >= 4 (sin/cos positions), got {self.dim}")
        if self.max_source_positions % self.downsample_factor:
            raise ConfigError(f"max_source_positions={self.max_source_positions} must be a multiple of "
                              f"downsample_factor={self.downsample_factor} (frames are grouped per chunk)")
        if not self.norm_eps > 0:
            raise ConfigError(f"audio encoder norm_eps must be > 0, got {self.norm_eps}")

    @property
    def chunk_frames(self) -> int:
        """Log-mel frames per chunk (3000: 30 s at 100 frames/s)."""
        return 2 * self.max_source_positions

    @property
    def chunk_samples(self) -> int:
        """Waveform samples per chunk (480 000: 30 s at 16 kHz)."""
        return self.chunk_frames * self.hop_length

    @property
    def tokens_per_chunk(self) -> int:
        """`[AUDIO]` tokens per chunk (375)."""
        return self.max_source_positions // self.downsample_factor

    @classmethod
    def from_params(cls, multimodal: dict[str, Any]) -> AudioEncoderArgs:
        """From params.json's `multimodal` section (`whisper_model_args.encoder_args` + `downsample_args`)."""
        whisper = multimodal.get("whisper_model_args") if isinstance(multimodal, dict) else None
        if not isinstance(whisper, dict) or not isinstance(whisper.get("encoder_args"), dict):
            raise ConfigError("params.json 'multimodal' has no 'whisper_model_args.encoder_args': "
                              "not an audio model")
        enc = dict(whisper["encoder_args"])
        encoding = dict(enc.pop("audio_encoding_args", None) or {})
        if enc.pop("causal", False):
            raise ConfigError("causal (streaming, Voxtral Realtime) audio encoders are not supported")
        if enc.get("pos_embed", "sinusoidal") != "sinusoidal":
            raise ConfigError(f"audio encoder pos_embed {enc['pos_embed']!r} is not supported "
                              "(only 'sinusoidal')")
        missing = [k for k in ("dim", "n_layers", "hidden_dim", "n_heads") if k not in enc]
        if missing:
            raise ConfigError(f"params.json multimodal.whisper_model_args.encoder_args is missing {missing}")
        kwargs: dict[str, Any] = {k: enc.pop(k) for k in ("dim", "n_layers", "hidden_dim", "n_heads")}
        kwargs["head_dim"] = enc.pop("head_dim", kwargs["dim"] // kwargs["n_heads"])
        kwargs |= {k: enc.pop(k) for k in ("max_source_positions", "norm_eps") if k in enc}
        kwargs |= {k: encoding.pop(k) for k in ("sampling_rate", "num_mel_bins", "hop_length", "window_size")
                   if k in encoding}
        if encoding.get("global_log_mel_norm") is not None:
            kwargs["global_log_mel_max"] = float(encoding.pop("global_log_mel_norm"))
        factor = (whisper.get("downsample_args") or {}).get("downsample_factor")
        if factor is not None:
            kwargs["downsample_factor"] = factor
        unused = sorted(set(enc) - {"vocab_size", "pos_embed"})
        unused += [f"audio_encoding_args.{k}" for k in encoding]
        if unused:
            logger.warning("params.json audio encoder keys not used: %s", unused)
        return cls(**kwargs, extra=enc)

    def to_params(self) -> dict[str, Any]:
        """The params.json `multimodal` section."""
        encoding: dict[str, Any] = {"sampling_rate": self.sampling_rate, "num_mel_bins": self.num_mel_bins,
                                    "hop_length": self.hop_length, "window_size": self.window_size}
        if self.global_log_mel_max is not None:
            encoding["global_log_mel_norm"] = self.global_log_mel_max
        encoder = {**self.extra, "dim": self.dim, "n_layers": self.n_layers, "hidden_dim": self.hidden_dim,
                   "n_heads": self.n_heads, "head_dim": self.head_dim, "norm_eps": self.norm_eps,
                   "max_source_positions": self.max_source_positions, "audio_encoding_args": encoding}
        return {"whisper_model_args": {"encoder_args": encoder,
                                       "downsample_args": {"downsample_factor": self.downsample_factor}}}


# ---------------------------------------------------------------------------------------------- audio input


def load_audio(path: str | os.PathLike[str], sampling_rate: int = 16_000) -> Audio:
    """Read an audio file soundfile decodes (WAV, FLAC, OGG, MP3) as mono float32 at `sampling_rate`.

    Several channels are averaged to mono; another sampling rate is resampled with mistral_common's own
    resampler (soxr "HQ"), which is logged. A missing or undecodable file raises `DataError`.
    """
    _require_audio_extras()
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an audio file; pass one WAV, FLAC, OGG or MP3 file")
    if not path.exists():
        raise DataError(f"audio file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a regular file; pass one WAV, FLAC, OGG or MP3 file")
    try:
        audio = Audio.from_file(str(path), strict=False)
    except (RuntimeError, ValueError, TypeError, AssertionError, OSError, EOFError) as exc:
        raise DataError(f"cannot decode {path} as audio ({type(exc).__name__}: {exc}); "
                        "pass a WAV, FLAC, OGG or MP3 file") from exc
    if audio.audio_array.size == 0:
        raise DataError(f"{path} holds no audio samples")
    return _resampled(audio, sampling_rate, str(path))


def audio_chunk(audio: Audio) -> AudioChunk:
    """A mistral_common `AudioChunk` for a chat message that keeps the samples exactly (float32 WAV);
    `AudioChunk.from_audio` writes 16-bit PCM, which rounds what the model hears."""
    return AudioChunk(input_audio=_wav_bytes(audio))


def _resampled(audio: Audio, sampling_rate: int, what: str) -> Audio:
    """`audio` at `sampling_rate`: itself, or a resampled copy (the caller's object is left alone)."""
    if audio.sampling_rate == sampling_rate:
        return audio
    logger.info("resampling %s from %d Hz to %d Hz (soxr, as mistral_common does)",
                what, audio.sampling_rate, sampling_rate)
    copy = Audio(audio.audio_array, audio.sampling_rate, audio.format)
    copy.resample(sampling_rate)  # mistral_common's own resampler, in place
    return copy


def _wav_bytes(audio: Audio) -> bytes:
    _require_audio_extras()
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(audio.audio_array, dtype=np.float32), audio.sampling_rate,
                    format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _require_audio_extras() -> None:
    try:
        import soundfile  # noqa: F401
        import soxr  # noqa: F401
    except ImportError as err:
        raise ImportError(f"reading and resampling audio needs soundfile and soxr: {_INSTALL_HINT}") from err


# ------------------------------------------------------------------------------------------- log-mel features


@lru_cache(maxsize=8)
def _mel_filters(n_fft: int, num_mel_bins: int, sampling_rate: int) -> torch.Tensor:
    # mistral_common's Slaney filter bank, the same matrix as transformers' WhisperFeatureExtractor's.
    bank = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_bins=num_mel_bins, min_frequency=0.0,
                           max_frequency=8000.0, sampling_rate=sampling_rate)
    return torch.from_numpy(np.asarray(bank, dtype=np.float32))  # frequencies x mels


def log_mel_spectrogram(waveform: torch.Tensor, args: AudioEncoderArgs) -> torch.Tensor:
    """Whisper's log-mel of a waveform [S] at `args.sampling_rate`: [num_mel_bins, S // hop_length], float32.

    Hann-windowed STFT (n_fft = window), centred with reflect padding, power spectrum, last frame dropped,
    Slaney mel filters 0-8 kHz, log10 clamped at 1e-10, floored 8 below the maximum, then (x + 4) / 4.
    The maximum is the whole waveform's, so the chunks of one audio share it.
    """
    x = waveform.float()
    if x.dim() != 1 or x.shape[0] <= args.window_size // 2:
        raise DataError(f"need a 1-D waveform of more than {args.window_size // 2} samples, "
                        f"got {list(x.shape)}")
    window = torch.hann_window(args.window_size, device=x.device)
    stft = torch.stft(x, args.window_size, args.hop_length, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # F frames; a strided view makes the matmul slow
    filters = _mel_filters(args.window_size, args.num_mel_bins, args.sampling_rate).to(x.device)
    log_spec = (filters.T @ power).clamp(min=1e-10).log10()
    if args.global_log_mel_max is None:
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    else:
        log_spec = log_spec.clamp(min=args.global_log_mel_max - 8.0)
    return (log_spec + 4.0) / 4.0


def audio_features(audio: Audio | np.ndarray | torch.Tensor, args: AudioEncoderArgs) -> torch.Tensor:
    """Log-mel chunks [N, num_mel_bins, chunk_frames] of one mono audio, N = ceil(duration / 30 s).

    An `Audio` at another rate is resampled (logged); a bare array must be at `args.sampling_rate`. The
    waveform is zero-padded to whole chunks first, as mistral_common pads it when tokenizing (nothing to do
    for the audio `transcription_prompt` returns), so the prompt's [AUDIO] count matches.
    """
    if isinstance(audio, Audio):
        audio = _resampled(audio, args.sampling_rate, "the audio").audio_array
    waveform = (audio if isinstance(audio, torch.Tensor) else torch.from_numpy(np.asarray(audio))).float()
    if waveform.dim() != 1 or waveform.shape[0] == 0:
        raise DataError(f"audio must be a non-empty mono waveform [samples], "
                        f"got shape {list(waveform.shape)}")
    n_chunks = math.ceil(waveform.shape[0] / args.chunk_samples)
    waveform = F.pad(waveform, (0, n_chunks * args.chunk_samples - waveform.shape[0]))
    mel = log_mel_spectrogram(waveform, args)  # M, N * chunk_frames
    return mel.view(args.num_mel_bins, n_chunks, args.chunk_frames).transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------- the encoder


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Whisper's fixed positions [length, dim], float32: sin in the first half, cos in the second,
    timescales 1 .. 10^4 (transformers' `sinusoids`). Released checkpoints do not store them."""
    half = dim // 2
    inv_timescales = torch.exp(-math.log(10_000) / (half - 1) * torch.arange(half, device=device))
    scaled = torch.arange(length, device=device)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class EncoderAttention(nn.Module):
    """Bidirectional multi-head self-attention; q, v and o have biases, k has none (as in Whisper)."""

    def __init__(self, args: AudioEncoderArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        inner = args.n_heads * args.head_dim
        self.wq = nn.Linear(args.dim, inner, bias=True)
        self.wk = nn.Linear(args.dim, inner, bias=False)
        self.wv = nn.Linear(args.dim, inner, bias=True)
        self.wo = nn.Linear(inner, args.dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; every frame of a chunk sees every other."""
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))  # B H T D
        out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class EncoderFeedForward(nn.Module):
    """w2(GELU(w1 x)), with biases (not gated)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=True)
        self.w2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class EncoderBlock(nn.Module):
    """h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)); LayerNorms with bias."""

    def __init__(self, args: AudioEncoderArgs) -> None:
        super().__init__()
        self.attention = EncoderAttention(args)
        self.feed_forward = EncoderFeedForward(args.dim, args.hidden_dim)
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class EncoderTransformer(nn.Module):
    def __init__(self, args: AudioEncoderArgs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderBlock(args) for _ in range(args.n_layers))
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class WhisperEncoder(nn.Module):
    """Log-mel chunks [N, mel, 2P] -> encoder frames [N, P, dim] (P = max_source_positions)."""

    def __init__(self, args: AudioEncoderArgs) -> None:
        super().__init__()
        self.args = args
        self.conv_layers = nn.ModuleList([
            nn.Conv1d(args.num_mel_bins, args.dim, kernel_size=3, padding=1),
            nn.Conv1d(args.dim, args.dim, kernel_size=3, stride=2, padding=1),
        ])
        self.transformer = EncoderTransformer(args)
        self._positions: torch.Tensor | None = None

    def positions(self, device: torch.device) -> torch.Tensor:
        # Computed on use, not a buffer: a meta-device build needs no re-init, and checkpoints omit it.
        if self._positions is None or self._positions.device != device:
            self._positions = sinusoidal_positions(self.args.max_source_positions, self.args.dim, device)
        return self._positions

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        expected = (self.args.num_mel_bins, self.args.chunk_frames)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise DataError(f"audio features must be log-mel chunks [N, {expected[0]}, {expected[1]}] (see "
                            f"audio_features()), got {list(features.shape)}")
        x = F.gelu(self.conv_layers[0](features))
        x = F.gelu(self.conv_layers[1](x)).transpose(1, 2)  # N P dim
        x = (x + self.positions(x.device)).to(x.dtype)  # positions restart in every chunk
        return self.transformer(x)


class AudioEmbedder(nn.Module):
    """Encoder + downsampling adapter: log-mel chunks [N, mel, 2P] -> embeddings [N * P / k, text dim]."""

    def __init__(self, args: AudioEncoderArgs, text_dim: int) -> None:
        super().__init__()
        self.downsample_factor = args.downsample_factor
        self.whisper_encoder = WhisperEncoder(args)
        # Indices 0 and 2 as in the checkpoint (w_in, GELU, w_out), no biases.
        self.audio_language_projection = nn.Sequential(
            nn.Linear(args.downsample_factor * args.dim, text_dim, bias=False),
            nn.GELU(),
            nn.Linear(text_dim, text_dim, bias=False),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.whisper_encoder(features)  # N P dim
        n, p, d = x.shape
        # k consecutive frames side by side; P % k == 0, so no group straddles two chunks.
        x = x.reshape(n * p // self.downsample_factor, self.downsample_factor * d)
        return self.audio_language_projection(x)


# -------------------------------------------------------------------------------------------------- Voxtral


class Voxtral(Transformer):
    """A Mistral decoder whose `[AUDIO]` token embeddings are replaced by encoded audio (Voxtral Mini/Small).

    The text model's parameters keep their top-level names; the audio ones live under
    `mm_whisper_embeddings`. `max_seq_len` (default: params.json `max_seq_len` or HF
    `max_position_embeddings`, if known) bounds the prompt plus generated tokens.
    """

    def __init__(self, args: ModelArgs, audio_args: AudioEncoderArgs, audio_token_id: int = AUDIO_TOKEN_ID,
                 max_seq_len: int | None = None) -> None:
        super().__init__(args)
        if not 0 <= audio_token_id < args.vocab_size:
            raise ConfigError(f"audio_token_id {audio_token_id} is outside the vocabulary "
                              f"[0, {args.vocab_size})")
        self.audio_args = audio_args
        self.audio_token_id = audio_token_id
        self.max_seq_len: int | None = (max_seq_len or args.extra.get("max_seq_len")
                                        or args.extra.get("max_position_embeddings"))
        self.mm_whisper_embeddings = AudioEmbedder(audio_args, args.dim)

    def embed_audio(self, audio_features: torch.Tensor) -> torch.Tensor:
        """Log-mel chunks [N, mel, frames] -> audio embeddings [N * tokens_per_chunk, dim] (model dtype)."""
        return self.mm_whisper_embeddings(audio_features.to(self.device, self.dtype))

    def embed(self, tokens: torch.Tensor, audio_features: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings [B, T, dim]: the `[AUDIO]` positions, row by row, take the embeddings of
        `audio_features` (all chunks of all audios of the batch, in prompt order)."""
        text = self.tok_embeddings(tokens)
        if audio_features is None:
            features = text.new_zeros(0, self.args.dim)
        else:
            features = self.embed_audio(audio_features)
        return splice_embeddings(text, tokens, self.audio_token_id, features)

    def forward(  # type: ignore[override]
        self,
        tokens: torch.Tensor,
        audio_features: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] (with `[AUDIO]` placeholders) and the log-mel chunks they stand for -> logits."""
        self.check_context(tokens.shape[1], int((tokens == self.audio_token_id).sum(-1).max()))
        embeddings = self.embed(tokens, audio_features)
        return self.output(self.hidden_states(tokens, positions, cache, embeddings=embeddings))

    def check_context(self, n_tokens: int, n_audio_tokens: int = 0) -> None:
        """`GenerationError` if a sequence of `n_tokens` does not fit in the model's context."""
        if self.max_seq_len is not None and n_tokens > self.max_seq_len:
            audio = self.audio_args
            per_chunk, seconds = audio.tokens_per_chunk, audio.chunk_samples / audio.sampling_rate
            raise GenerationError(
                f"the sequence needs {n_tokens} positions ({n_audio_tokens} of them audio tokens) but the "
                f"model's context is {self.max_seq_len}; every {seconds:g} s of audio takes {per_chunk} "
                "tokens: split the audio into shorter pieces, or generate fewer tokens"
            )


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
    audio_id, vocab = model.audio_token_id, model.args.vocab_size
    embeddings = []
    for row, (prompt, features) in enumerate(zip(prompts, audio_features)):
        if any(not 0 <= t < vocab for t in prompt):
            raise GenerationError(f"prompt {row} holds token ids outside the vocabulary [0, {vocab})")
        model.check_context(len(prompt) + params.max_tokens, sum(1 for t in prompt if t == audio_id))
        tokens = torch.as_tensor(list(prompt), dtype=torch.long, device=model.device)[None]
        embeddings.append(model.embed(tokens, features)[0])
    return generate_with_embeddings(model, prompts, embeddings, params, eos_id, chunk_size)


# ------------------------------------------------------------------------------- prompts (mistral_common)


def transcription_prompt(
    tokenizer: Tokenizer, audio: Audio, language: str | None = None
) -> tuple[list[int], Audio]:
    """`<s>[INST][BEGIN_AUDIO][AUDIO]xN[/INST]lang:xx[TRANSCRIBE]` from mistral_common's
    `encode_transcription`, and the audio as mistral_common prepared it (resampled, padded to whole chunks).

    `language` is an ISO 639-1 code ("en"), or None to let the model find it.
    """
    try:
        request = TranscriptionRequest(audio=_wav_bytes(audio), language=language)
        tokenized = tokenizer.mistral.instruct_tokenizer.encode_transcription(request)
    except (MistralCommonException, ValueError, AssertionError, AttributeError) as exc:
        raise TokenizerError(
            f"cannot build a transcription prompt with {tokenizer!r} ({type(exc).__name__}: {exc}); it needs "
            "a tekken v7+ tokenizer with an audio section (Voxtral's tekken.json) and an ISO 639-1 language"
        ) from exc
    return list(tokenized.tokens), tokenized.audios[0]


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


# ------------------------------------------------------------------------------------------------ checkpoints

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
) -> Voxtral:
    """Load a consolidated (`params.json` with `multimodal.whisper_model_args` + `consolidated*.safetensors`)
    or Hugging Face (`config.json` + `model*.safetensors`, as `save_pretrained` writes them or with
    transformers 5.x runtime names) Voxtral directory. Every tensor name and shape is checked before any data
    is read; `CheckpointError` lists all missing, unexpected and mis-shaped tensors. `dtype` None keeps the
    checkpoint's."""
    path = Path(path)
    fmt = detect_format(path)
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


__all__ = [
    "AUDIO_TOKEN_ID", "AudioEmbedder", "AudioEncoderArgs", "Voxtral", "WhisperEncoder",
    "args_from_hf_voxtral_config", "audio_chunk", "audio_features", "generate_with_audio", "hf_voxtral_names",
    "load_audio", "load_voxtral", "log_mel_spectrogram", "sinusoidal_positions", "transcribe",
    "transcription_prompt",
]
