"""Audio into Voxtral prompts: reading files, Whisper's log-mel features, and the transcription prompt.

    waveform, mono 16 kHz, zero-padded to whole 30-s chunks     (mistral_common pads it when tokenizing)
    -> log-mel [128, 100 frames/s], Whisper recipe               `log_mel_spectrogram`
    -> chunks [N, 128, 3000], each encoded on its own             `audio_features`

Prompts (`[BEGIN_AUDIO][AUDIO]x375` per 30 s, transcription's `lang:xx[TRANSCRIBE]`) are only ever built by
mistral_common.
"""

from __future__ import annotations

import io
import logging
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from mistral_common.audio import mel_filter_bank
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import AudioChunk
from mistral_common.protocol.transcription.request import TranscriptionRequest
from mistral_common.tokens.tokenizers.audio import Audio

from tramontane.errors import DataError, TokenizerError
from tramontane.models.audio.network import AudioEncoderArgs

if TYPE_CHECKING:
    from tramontane.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'tramontane[multimodal]' (soundfile and soxr)"


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


def decode_audio(data: bytes, what: str = "the audio", sampling_rate: int = 16_000) -> Audio:
    """`load_audio` for the bytes of an audio file (an upload, a base64 payload): mono float32 at
    `sampling_rate`; `DataError` naming `what` if they do not decode."""
    _require_audio_extras()
    try:
        audio = Audio.from_bytes(data, strict=False)
    except (RuntimeError, ValueError, TypeError, AssertionError, OSError, EOFError) as exc:
        raise DataError(f"cannot decode {what} as audio ({type(exc).__name__}: {exc}); "
                        "send a WAV, FLAC, OGG or MP3 file") from exc
    if audio.audio_array.size == 0:
        raise DataError(f"{what} holds no audio samples")
    return _resampled(audio, sampling_rate, what)


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


# ------------------------------------------------------------------------------- prompts (mistral_common)


def transcription_prompt(
    tokenizer: Tokenizer, audio: Audio, language: str | None = None
) -> tuple[list[int], Audio]:
    """`<s>[INST][BEGIN_AUDIO][AUDIO]xN[/INST]lang:xx[TRANSCRIBE]` from mistral_common's
    `encode_transcription`, and the audio as mistral_common prepared it (resampled, padded to whole chunks).

    `language` is an ISO 639-1 code ("en"), or None to let the model find it.
    """
    try:
        # model_validate: pydantic turns the plain string into its language-code type
        request = TranscriptionRequest.model_validate({"audio": _wav_bytes(audio), "language": language})
        tokenized = tokenizer.mistral.instruct_tokenizer.encode_transcription(request)
    except (MistralCommonException, ValueError, AssertionError, AttributeError) as exc:
        raise TokenizerError(
            f"cannot build a transcription prompt with {tokenizer!r} ({type(exc).__name__}: {exc}); it needs "
            "a tekken v7+ tokenizer with an audio section (Voxtral's tekken.json) and an ISO 639-1 language"
        ) from exc
    return list(tokenized.tokens), tokenized.audios[0]


__all__ = ["audio_chunk", "audio_features", "decode_audio", "load_audio", "log_mel_spectrogram", "transcription_prompt"]
