"""Voxtral's network: a Whisper-style audio encoder and adapter in front of a Mistral decoder.

    log-mel chunks [N, 128, 3000] (see `preprocess`), each encoded on its own
    -> conv k3 + GELU, conv k3 stride 2 + GELU: [N, 1500, 1280], + fixed sinusoidal positions,
       32 pre-LayerNorm bidirectional blocks, final LayerNorm      `WhisperEncoder`
    -> 4 consecutive frames side by side, w_out(GELU(w_in(.))): 375 embeddings per 30 s   `AudioEmbedder`
    -> they replace the prompt's [AUDIO] tokens in order; the Mistral decoder runs as usual    `Voxtral`

Module names are those of the consolidated checkpoint (`mm_whisper_embeddings.whisper_encoder.conv_layers.0`,
`...transformer.layers.{i}.attention.wq`, the text model's at the top), so `consolidated.safetensors` loads
without renaming.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tramontane.errors import ConfigError, DataError, GenerationError
from tramontane.models.args import ModelArgs
from tramontane.models.cache import KVCache
from tramontane.models.multimodal import splice_embeddings
from tramontane.models.transformer import Transformer

logger = logging.getLogger(__name__)

AUDIO_TOKEN_ID = 24  # `[AUDIO]` in Voxtral's tekken.json; transformers' converter hard-codes it too


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


__all__ = [
    "AUDIO_TOKEN_ID", "AudioEmbedder", "AudioEncoderArgs", "EncoderAttention", "EncoderBlock",
    "EncoderFeedForward", "EncoderTransformer", "Voxtral", "WhisperEncoder", "sinusoidal_positions",
]
