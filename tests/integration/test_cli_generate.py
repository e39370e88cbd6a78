"""`tramontane generate` and `tramontane chat` end to end on a tiny consolidated checkpoint with a real
mistral_common tokenizer file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tramontane.cli import main
from tramontane.generation import SamplingParams, generate
from tramontane.models.checkpoint import load_model, save_model
from tramontane.models.cpu_linear import prepack_for_inference
from tramontane.models.quant import HAS_DYNAMIC_INT8, QuantConfig
from tramontane.tokenizer import Tokenizer

from tests.conftest import random_model, tiny_args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer model with the v3 sentencepiece tokenizer shipped by mistral_common."""
    mistral = MistralTokenizer.v3()
    tokenizer_file = Path(mistral.instruct_tokenizer.tokenizer.file_path)
    vocab = mistral.instruct_tokenizer.tokenizer.n_words
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(random_model(tiny_args(vocab_size=vocab, dim=32, head_dim=8), seed=21), path)
    shutil.copy(tokenizer_file, path / "tokenizer.model.v3")
    return path


def test_generate_json_matches_library(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(model_dir), "--prompt", "The wind from the north",
                 "--max-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    model, _ = load_model(model_dir)
    prompt = tokenizer.encode("The wind from the north", bos=True)
    expected = generate(model, [prompt], SamplingParams(max_tokens=6, logprobs=True), eos_id=tokenizer.eos_id)[0]
    assert out["prompt_tokens"] == prompt
    assert out["tokens"] == expected.tokens
    assert out["logprobs"] == pytest.approx(expected.logprobs, abs=1e-5)
    assert out["text"] == tokenizer.decode(expected.tokens)


def test_generate_sampling_seed_is_reproducible(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-tokens", "8", "--temperature", "1.0",
            "--top-p", "0.9", "--seed", "5", "--json"]
    main(argv)
    first = json.loads(capsys.readouterr().out)["tokens"]
    main(argv)
    assert json.loads(capsys.readouterr().out)["tokens"] == first


def test_chat_reads_turns_from_stdin(model_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [sys.executable, "-m", "tramontane.cli", "chat", "--model", str(model_dir), "--max-tokens", "4",
         "--temperature", "0"],
        input="Hello there\nAnd again\n\n", capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    # Greedy replies to the same conversation, computed with the library.
    tokenizer = Tokenizer.from_model_dir(model_dir)
    model, _ = load_model(model_dir)
    messages = [{"role": "user", "content": "Hello there"}]
    first = generate(model, [tokenizer.encode_chat(messages)], SamplingParams(max_tokens=4),
                     eos_id=tokenizer.eos_id)[0]
    assert proc.stdout.splitlines()[0] == tokenizer.decode(first.tokens)
    assert len(proc.stdout.splitlines()) == 2


def test_bad_model_directory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(tmp_path) in err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option, value", [
    ("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"),
    ("--top-p", "2"), ("--top-p", "0"), ("--top-p", "nan"), ("--max-tokens", "-1"),
])
def test_bad_sampling_option_is_refused_before_the_model_is_read(
        command: str, option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No model at --model: an error about the option proves it was checked before anything was loaded.
    argv = [command, "--model", str(tmp_path / "absent"), option, value]
    assert main(argv + (["--prompt", "x"] if command == "generate" else [])) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert option in line and "absent" not in line


def test_bad_chunk_size_is_refused_before_the_model_is_read(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x", "--chunk-size", "0"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--chunk-size" in line and "absent" not in line


# Python calls a command-line user cannot make.
PYTHON_HINTS = ("load_model", "Tokenizer.from", "Tokenizer.builtin", "format=")


def test_folder_with_two_checkpoint_formats_names_the_folder_not_a_python_argument(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    both = shutil.copytree(model_dir, tmp_path / "both")
    (both / "config.json").write_text("{}")
    assert main(["generate", "--model", str(both), "--prompt", "x"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--model" in line and not any(hint in line for hint in PYTHON_HINTS), line


def test_two_tokenizer_files_names_the_folder_not_a_python_call(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two = shutil.copytree(model_dir, tmp_path / "two")
    shutil.copy(two / "tokenizer.model.v3", two / "tokenizer.model.v7")
    assert main(["generate", "--model", str(two), "--prompt", "x"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--model" in line and not any(hint in line for hint in PYTHON_HINTS), line


@pytest.mark.parametrize("option", ["int8", pytest.param("w8a8", marks=pytest.mark.skipif(
    not HAS_DYNAMIC_INT8, reason="torch's fbgemm quantized engine is missing"))])
def test_generate_with_int8_weights_is_the_quantized_library_model(model_dir: Path, option: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--quantize int8 (weight-only) and w8a8 (the same weights, dynamic int8 activations)."""
    assert main(["generate", "--model", str(model_dir), "--prompt", "The wind from the north",
                 "--max-tokens", "6", "--json", "--quantize", option]) == 0
    out = json.loads(capsys.readouterr().out)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    model, _ = load_model(model_dir, quantize=QuantConfig("int8", activations="int8" if option == "w8a8"
                                                          else "float"))
    assert type(model.layers[0].attention.wq).__name__ == "Int8Linear"
    assert (model.layers[0].attention.wq.w8a8_kernel is not None) == (option == "w8a8")
    # as the CLI loads it: in eval mode (the int8 kernel; load_model leaves a quantized float checkpoint in
    # train mode), the head packed for oneDNN where that was timed faster (this process's same choice)
    prepack_for_inference(model)
    prompt = tokenizer.encode("The wind from the north", bos=True)
    expected = generate(model, [prompt], SamplingParams(max_tokens=6, logprobs=True), eos_id=tokenizer.eos_id)[0]
    assert out["tokens"] == expected.tokens
    assert out["logprobs"] == pytest.approx(expected.logprobs, abs=1e-5)
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--quant-group-size", "32"]) == 2
    assert "--quantize" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--quantize", option,
                 "--quant-group-size", "32"]) == 2
    assert "applies to --quantize int4" in capsys.readouterr().err
