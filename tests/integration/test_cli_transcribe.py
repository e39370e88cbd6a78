"""`tramontane transcribe` end to end on a tiny consolidated Voxtral checkpoint with an audio tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import soundfile

from tramontane.cli import main
from tramontane.generation import SamplingParams
from tramontane.models.audio import load_audio, transcribe

from tests.unit.test_audio import SR, audio_tokenizer, tiny_voxtral, tone, write_consolidated  # noqa: F401


def test_transcribe_prints_what_the_library_transcribes(audio_tokenizer, tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_voxtral(vocab_size=audio_tokenizer.vocab_size, seed=3)
    checkpoint = write_consolidated(model, tmp_path / "voxtral")
    shutil.copy(audio_tokenizer.path, checkpoint / "tekken.json")
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, tone(3.0), SR, subtype="FLOAT")
    assert main(["transcribe", "--model", str(checkpoint), str(wav), "--language", "fr", "--max-tokens", "4"]) == 0
    expected = transcribe(model, audio_tokenizer, load_audio(wav), language="fr",
                          params=SamplingParams(max_tokens=4))
    assert capsys.readouterr().out == expected + "\n"


def test_transcribe_unreadable_audio_is_a_clear_error(audio_tokenizer, tmp_path: Path,  # noqa: F811
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_consolidated(tiny_voxtral(vocab_size=audio_tokenizer.vocab_size), tmp_path / "voxtral")
    shutil.copy(audio_tokenizer.path, checkpoint / "tekken.json")
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"not audio at all")
    assert main(["transcribe", "--model", str(checkpoint), str(bad)]) == 2
    assert "error:" in capsys.readouterr().err
