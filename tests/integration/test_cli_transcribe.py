"""`tramontane transcribe` end to end on a tiny consolidated Voxtral checkpoint with an audio tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import soundfile

from tramontane.cli import main
from tramontane.generation import SamplingParams
from tramontane.generation.multimodal import transcribe
from tramontane.models.audio import load_audio

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


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _speech(path: Path) -> Path:
    soundfile.write(path, tone(1.0), SR, subtype="FLOAT")
    return path


@pytest.mark.parametrize("option, value", [("--temperature", "-1"), ("--temperature", "nan"),
                                           ("--top-p", "2"), ("--max-tokens", "-1"), ("--language", "xx")])
def test_bad_option_is_refused_before_the_model_is_read(option: str, value: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # No model at --model: an error about the option proves it was checked before anything was loaded.
    argv = ["transcribe", "--model", str(tmp_path / "absent"), str(_speech(tmp_path / "a.wav")), option, value]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert option in line and "absent" not in line


def test_missing_audio_is_refused_before_the_model_is_read(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["transcribe", "--model", str(tmp_path / "absent"), str(tmp_path / "nowhere.wav")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "not found" in line and "nowhere.wav" in line and "absent" not in line


def test_audio_folder_is_called_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "recordings"
    folder.mkdir()
    assert main(["transcribe", "--model", str(tmp_path / "absent"), str(folder)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "is a folder" in line and "not found" not in line


def test_text_checkpoint_names_the_commands_not_a_python_call(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tramontane.models.checkpoint import save_model

    from tests.conftest import random_model, tiny_args

    save_model(random_model(tiny_args(), seed=1), tmp_path / "text")
    assert main(["transcribe", "--model", str(tmp_path / "text"), str(_speech(tmp_path / "a.wav"))]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "tramontane generate" in line and "load_model" not in line, line
