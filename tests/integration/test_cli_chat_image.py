"""`tramontane chat --image` end to end on a tiny LLaVA/Pixtral checkpoint written by transformers, with the
multimodal v7 tokenizer mistral_common ships."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tramontane.cli import main
from tramontane.generation import SamplingParams
from tramontane.generation.multimodal import generate_with_images
from tramontane.models.vision import (
    encode_image_chat,
    encode_image_prompt,
    image_message,
    load_vision_language_model,
)
from tramontane.tokenizer import Tokenizer

from tests.equivalence.test_vision_hf import hf_model

TOKENIZER = "v7-mm"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA/Pixtral checkpoint saved by transformers, with the multimodal tokenizer beside it."""
    tokenizer = Tokenizer.builtin(TOKENIZER)
    hf = hf_model("llava", seed=4, patch_size=16, vocab_size=tokenizer.vocab_size, image_size=128)
    directory = tmp_path_factory.mktemp("pixtral")
    hf.save_pretrained(directory)
    shutil.copy(tokenizer.path, directory / tokenizer.path.name)
    return directory


def test_chat_with_an_image_replies_what_the_library_generates(checkpoint: Path, tmp_path: Path, monkeypatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = Tokenizer.builtin(TOKENIZER)
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(picture)

    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe it.\n\n"))
    assert main(["chat", "--model", str(checkpoint), "--image", str(picture), "--max-tokens", "5",
                 "--temperature", "0"]) == 0
    reply = capsys.readouterr().out.splitlines()[0]

    model = load_vision_language_model(checkpoint)
    tokens, images = encode_image_prompt(tokenizer, "Describe it.", [picture])
    [expected] = generate_with_images(model, [tokens], [images], SamplingParams(max_tokens=5),
                                      eos_id=tokenizer.eos_id)
    assert reply == tokenizer.decode(expected.tokens)
    assert tokens.count(10) > 0  # the prompt really carries [IMG] tokens


def test_second_turn_keeps_the_image_and_the_history(checkpoint: Path, tmp_path: Path, monkeypatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = Tokenizer.builtin(TOKENIZER)
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(picture)

    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe it.\nAnd the colours?\n\n"))
    assert main(["chat", "--model", str(checkpoint), "--image", str(picture), "--max-tokens", "5",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out

    model = load_vision_language_model(checkpoint)
    messages: list = []
    replies = []
    for turn, text in enumerate(["Describe it.", "And the colours?"]):
        messages.append(image_message(text, [picture]) if turn == 0 else {"role": "user", "content": text})
        tokens, images = encode_image_chat(tokenizer, messages)
        [completion] = generate_with_images(model, [tokens], [images], SamplingParams(max_tokens=5),
                                            eos_id=tokenizer.eos_id)
        replies.append(tokenizer.decode(completion.tokens))
        messages.append({"role": "assistant", "content": replies[-1]})
    assert out == "".join(reply + "\n" for reply in replies)
    assert len(images) == 1 and tokens.count(10) > 0  # the second prompt still carries the image


def test_chat_with_an_unreadable_image_is_a_clear_error(checkpoint: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert main(["chat", "--model", str(checkpoint), "--image", str(bad)]) == 2
    assert "error:" in capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _picture(path: Path) -> Path:
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    return path


def test_missing_image_is_refused_before_the_model_is_read(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # No model at --model: an error about the image proves it was read before anything was loaded.
    assert main(["chat", "--model", str(tmp_path / "absent"), "--image", str(tmp_path / "nowhere.png")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "nowhere.png" in line and "absent" not in line


def test_image_with_a_text_only_checkpoint_names_the_option_not_a_python_call(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tramontane.models.checkpoint import save_model

    from tests.conftest import random_model, tiny_args

    text_only = tmp_path / "text"
    save_model(random_model(tiny_args(), seed=1), text_only)
    assert main(["chat", "--model", str(text_only), "--image", str(_picture(tmp_path / "p.png"))]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--image" in line and "load_model" not in line, line


def test_image_with_a_text_tokenizer_names_the_model_folder_not_a_python_call(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = shutil.copytree(checkpoint, tmp_path / "pixtral")
    (directory / Tokenizer.builtin(TOKENIZER).path.name).unlink()
    text_tokenizer = Tokenizer.builtin("v3").path
    shutil.copy(text_tokenizer, directory / text_tokenizer.name)
    assert main(["chat", "--model", str(directory), "--image", str(_picture(tmp_path / "p.png"))]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--model" in line and "Tokenizer.builtin" not in line, line
