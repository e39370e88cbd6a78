"""`tramontane generate --model FILE.gguf` end to end: a tiny llama.cpp-layout file with the mistral_common
tokenizer file beside it, and the error when there is none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tramontane.cli import main
from tramontane.generation import SamplingParams, generate
from tramontane.models.checkpoint import load_model, save_model
from tramontane.tokenizer import Tokenizer

from tests.conftest import random_model, tiny_args
from tests.gguf_files import Q, gguf_tensors, write_gguf

PROMPT = "The wind from the north"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer model as a Q8_0 GGUF file, with the v3 tokenizer shipped by mistral_common beside it."""
    mistral = MistralTokenizer.v3()
    vocab = mistral.instruct_tokenizer.tokenizer.n_words
    model = random_model(tiny_args(vocab_size=vocab, dim=32, head_dim=8, sliding_window=None), seed=21)
    tensors, meta = gguf_tensors(save_model(model, tmp_path_factory.mktemp("hf") / "tiny", format="hf"))
    folder = tmp_path_factory.mktemp("gguf")
    shutil.copy(mistral.instruct_tokenizer.tokenizer.file_path, folder / "tokenizer.model.v3")
    return write_gguf(folder / "tiny-Q8_0.gguf", tensors, meta, Q.Q8_0)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_generate_on_a_gguf_file_matches_the_library(gguf_file: Path, quantize: str | None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", str(gguf_file), "--prompt", PROMPT, "--max-tokens", "6", "--json"]
    assert main(argv + (["--quantize", quantize] if quantize else [])) == 0
    out = json.loads(capsys.readouterr().out)
    tokenizer = Tokenizer.from_model_dir(gguf_file)
    assert tokenizer.path == gguf_file.parent / "tokenizer.model.v3"
    model, _ = load_model(gguf_file, quantize=quantize)
    prompt = tokenizer.encode(PROMPT, bos=True)
    expected = generate(model, [prompt], SamplingParams(max_tokens=6, logprobs=True), eos_id=tokenizer.eos_id)[0]
    assert out["prompt_tokens"] == prompt
    assert out["tokens"] == expected.tokens
    assert out["logprobs"] == pytest.approx(expected.logprobs, abs=1e-4)


def test_gguf_file_without_a_tokenizer_file_names_the_fix(gguf_file: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    alone = shutil.copy(gguf_file, tmp_path / gguf_file.name)
    assert main(["generate", "--model", str(alone), "--prompt", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert str(tmp_path) in lines[0] and "tekken.json" in lines[0] and "Tokenizer.from" not in lines[0]
