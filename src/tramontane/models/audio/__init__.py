"""Voxtral: a Whisper-style audio encoder in front of a Mistral decoder.

The data path, with the released models' numbers:

    waveform, mono 16 kHz, zero-padded to whole 30-s chunks     (mistral_common pads it when tokenizing)
    -> log-mel [128, 100 frames/s], Whisper recipe               `preprocess.log_mel_spectrogram`
    -> chunks [N, 128, 3000], each encoded on its own             `preprocess.audio_features`
    -> conv k3 + GELU, conv k3 stride 2 + GELU: [N, 1500, 1280], + fixed sinusoidal positions,
       32 pre-LayerNorm bidirectional blocks, final LayerNorm      `network.WhisperEncoder`
    -> 4 consecutive frames side by side, w_out(GELU(w_in(.))): 375 embeddings per 30 s   `network.AudioEmbedder`
    -> they replace the prompt's [AUDIO] tokens in order; the Mistral decoder runs as usual    `network.Voxtral`

`checkpoint.load_voxtral` reads consolidated and Hugging Face checkpoints. Generation and transcription are
`tramontane.generation.multimodal`'s.
"""

from tramontane.models.audio.checkpoint import args_from_hf_voxtral_config, hf_voxtral_names, load_voxtral
from tramontane.models.audio.network import (
    AUDIO_TOKEN_ID,
    AudioEmbedder,
    AudioEncoderArgs,
    Voxtral,
    WhisperEncoder,
    sinusoidal_positions,
)
from tramontane.models.audio.preprocess import (
    audio_chunk,
    audio_features,
    decode_audio,
    load_audio,
    log_mel_spectrogram,
    transcription_prompt,
)

__all__ = [
    "AUDIO_TOKEN_ID", "AudioEmbedder", "AudioEncoderArgs", "Voxtral", "WhisperEncoder",
    "args_from_hf_voxtral_config", "audio_chunk", "audio_features", "decode_audio", "hf_voxtral_names",
    "load_audio",
    "load_voxtral", "log_mel_spectrogram", "sinusoidal_positions", "transcription_prompt",
]
