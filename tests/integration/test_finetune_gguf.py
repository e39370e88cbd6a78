"""`tramontane finetune` / `plan search` / `finetune merge` over a llama.cpp GGUF base, end to end on a tiny file.

The oracle: the same run over the Hugging Face checkpoint the GGUF file was written from. The file is F32, so
it holds exactly that checkpoint's float32 weights (q / k rows in llama.cpp's adjacent-pair order, which both
loaders turn into the same tensors), and the tokenizer file is the same: a run over either base, with the same
seed, is the same arithmetic, so adapters, ledgers and trained weights must be equal exactly. What the GGUF
base changes is only where things are found (the tokenizer in the file's folder) and written (HF format for a
merged or fully fine-tuned model: tramontane writes no GGUF).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file

from tramontane.cli import main
from tramontane.errors import ConfigError
from tramontane.finetune import adapter as adapter_module
from tramontane.finetune.adapter import merge_adapter_checkpoint
from tramontane.finetune.lora import LoraConfig
from tramontane.finetune.run import FinetuneConfig, FinetuneResult, finetune, read_privacy
from tramontane.finetune.search import FinetuneTask
from tramontane.models import gguf as gguf_module
from tramontane.models.checkpoint import detect_format, load_model, save_model
from tramontane.tokenizer import Tokenizer
from tramontane.training.search import TrialConfig

from tests.conftest import random_model, tiny_args
from tests.gguf_files import Q, gguf_tensors, write_gguf

TOKENIZER = "tokenizer.model.v3"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random model as a Hugging Face checkpoint (the oracle's base) and as the F32 GGUF file written
    from it, each with the v3 tokenizer file; the GGUF's folder also holds a file that is no tokenizer."""
    mistral = MistralTokenizer.v3()
    vocab = mistral.instruct_tokenizer.tokenizer.n_words
    model = random_model(tiny_args(vocab_size=vocab, dim=32, head_dim=8, sliding_window=None), seed=3)
    hf_dir = save_model(model, tmp_path_factory.mktemp("hf") / "tiny", format="hf")
    shutil.copy(mistral.instruct_tokenizer.tokenizer.file_path, hf_dir / TOKENIZER)
    tensors, meta = gguf_tensors(hf_dir)
    folder = tmp_path_factory.mktemp("gguf")
    shutil.copy(mistral.instruct_tokenizer.tokenizer.file_path, folder / TOKENIZER)
    (folder / "README.md").write_text("not a tokenizer\n")
    return hf_dir, write_gguf(folder / "tiny-F32.gguf", tensors, meta, Q.F32)


def _chat(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six training chats (a run over all of them at every step, q = 1: no subsampled accounting) and three
    held-out ones."""
    folder = tmp_path_factory.mktemp("small")
    train, held = folder / "train.jsonl", folder / "held.jsonl"
    train.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(6)))
    held.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(100, 103)))
    return train, held


def _config(**overrides: Any) -> FinetuneConfig:
    params: dict[str, Any] = {"epsilon": 8.0, "delta": 1e-5, "steps": 2, "batch_size": 6, "max_len": 48,
                              "micro_batch_size": 8, "checkpoint_every": 1, "seed": 11,
                              "lora": LoraConfig(rank=4, alpha=8, targets=("attention",))}
    params.update(overrides)
    return FinetuneConfig(**params)


@pytest.fixture(scope="module")
def lora_runs(bases: tuple[Path, Path], small_data: tuple[Path, Path],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneResult, FinetuneResult, list[Path]]:
    """The DP LoRA run over the GGUF file (and the files the GGUF reader parsed during it), and the oracle's
    run over the HF checkpoint."""
    hf_dir, gguf_file = bases
    out = tmp_path_factory.mktemp("runs")
    parsed: list[Path] = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path: Any, *args: Any, **kwargs: Any) -> None:
            parsed.append(Path(path))
            super().__init__(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_module, "_OPENED", {})  # nothing parsed before the run
        patch.setattr(gguf, "GGUFReader", Counting)
        on_gguf = finetune(gguf_file, small_data[0], out / "gguf", _config())
    return on_gguf, finetune(hf_dir, small_data[0], out / "hf", _config()), parsed


def _ledger(weights_dir: Path) -> dict[str, Any]:
    record = read_privacy(weights_dir)
    assert record is not None and record["private"]
    return record["ledger"].to_dict()


def _assert_same_adapter(got: Path, want: Path) -> None:
    a, b = load_file(got / "adapter_model.safetensors"), load_file(want / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 4 * 2  # A and B of wq wk wv wo, two layers
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # trained: B is off zero
    assert _ledger(got) == _ledger(want)


def test_dp_lora_over_a_gguf_file_is_the_run_over_the_checkpoint_it_was_written_from(
        bases: tuple[Path, Path], lora_runs: tuple[FinetuneResult, FinetuneResult, list[Path]]) -> None:
    _, gguf_file = bases
    on_gguf, on_hf, parsed = lora_runs
    assert on_gguf.plan == on_hf.plan
    _assert_same_adapter(on_gguf.weights_dir, on_hf.weights_dir)
    config = json.loads((on_gguf.weights_dir / "adapter_config.json").read_text())
    oracle = json.loads((on_hf.weights_dir / "adapter_config.json").read_text())
    assert config.pop("base_model_name_or_path") == str(gguf_file)  # the file, as it was given
    oracle.pop("base_model_name_or_path")
    assert config == oracle
    assert parsed == [gguf_file]  # load_args then load_model: the metadata parsed once in the run


def test_cli_qlora_over_a_gguf_file_requantizes_its_weights_as_over_the_checkpoint(
        bases: tuple[Path, Path], small_data: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """int8 of the GGUF's dequantized weights is int8 of the checkpoint's: the same adapter again (the command
    line's settings are `_config`'s)."""
    hf_dir, gguf_file = bases
    out = tmp_path / "gguf"
    assert main(["finetune", "--model", str(gguf_file), "--data", str(small_data[0]), "--out", str(out),
                 "--epsilon", "8", "--delta", "1e-5", "--steps", "2", "--batch-size", "6", "--max-len", "48",
                 "--micro-batch-size", "8", "--checkpoint-every", "1", "--lora-rank", "4", "--seed", "11",
                 "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "adapter")
    on_hf = finetune(hf_dir, small_data[0], tmp_path / "hf", _config(quantize="int8"))
    release = json.loads((out / "report" / "release" / "report.json").read_text())
    assert release["config"] == on_hf.release["config"] and release["config"]["quantize"] == "int8"
    _assert_same_adapter(out / "adapter", on_hf.weights_dir)


def _generated(capsys: pytest.CaptureFixture[str], *argv: str) -> list[int]:
    capsys.readouterr()
    assert main(["generate", *argv, "--prompt", "What is 3 plus 3?", "--max-tokens", "5", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def test_generate_and_merge_take_the_adapter_over_the_gguf_file(
        bases: tuple[Path, Path], lora_runs: tuple[FinetuneResult, FinetuneResult, list[Path]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    hf_dir, gguf_file = bases
    adapter = str(lora_runs[0].weights_dir)
    with_adapter = _generated(capsys, "--model", str(gguf_file), "--adapter", adapter)
    assert with_adapter == _generated(capsys, "--model", str(hf_dir), "--adapter", adapter)
    # merged into the GGUF base: a Hugging Face checkpoint by default, with the tokenizer of the file's folder
    merged = tmp_path / "merged"
    assert main(["finetune", "merge", "--model", str(gguf_file), "--adapter", adapter, "--out", str(merged)]) == 0
    assert detect_format(merged) == "hf"
    assert sorted(p.name for p in merged.iterdir()) == ["config.json", "model.safetensors", TOKENIZER]
    assert _generated(capsys, "--model", str(merged)) == with_adapter
    # --overwrite replaces it; consolidated is the other layout it writes
    assert main(["finetune", "merge", "--model", str(gguf_file), "--adapter", adapter, "--out", str(merged),
                 "--format", "consolidated", "--overwrite"]) == 0
    assert detect_format(merged) == "consolidated"
    assert _generated(capsys, "--model", str(merged)) == with_adapter
    assert main(["finetune", "merge", "--model", str(gguf_file), "--adapter", adapter, "--out",
                 str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert load_model(tmp_path / "bf16")[0].dtype == torch.bfloat16


def test_merging_into_gguf_is_refused_before_the_base_is_read(
        bases: tuple[Path, Path], lora_runs: tuple[FinetuneResult, FinetuneResult, list[Path]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, gguf_file = bases

    def not_read(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the base was read")

    monkeypatch.setattr(adapter_module, "load_model", not_read)
    with pytest.raises(ConfigError, match="format='hf'.*convert_hf_to_gguf.py"):
        merge_adapter_checkpoint(gguf_file, lora_runs[0].weights_dir, tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()  # the library's default over a GGUF base: Hugging Face
    merge_adapter_checkpoint(gguf_file, lora_runs[0].weights_dir, tmp_path / "default")
    assert detect_format(tmp_path / "default") == "hf"


def test_full_finetuning_of_a_gguf_file_writes_the_checkpoints_run_in_hf_format(
        bases: tuple[Path, Path], small_data: tuple[Path, Path], tmp_path: Path) -> None:
    hf_dir, gguf_file = bases
    on_gguf = finetune(gguf_file, small_data[0], tmp_path / "gguf", _config(method="full"))
    on_hf = finetune(hf_dir, small_data[0], tmp_path / "hf", _config(method="full"))
    model_dir = on_gguf.weights_dir
    assert detect_format(model_dir) == "hf"
    assert TOKENIZER in {p.name for p in model_dir.iterdir()} and not (model_dir / "README.md").exists()
    assert Tokenizer.from_model_dir(model_dir).version == Tokenizer.from_model_dir(gguf_file).version
    assert _ledger(model_dir) == _ledger(on_hf.weights_dir)
    trained, want = load_model(model_dir)[0].state_dict(), load_model(on_hf.weights_dir)[0].state_dict()
    base = load_model(gguf_file)[0].state_dict()
    assert trained.keys() == want.keys()
    for name in trained:
        torch.testing.assert_close(trained[name], want[name], rtol=0, atol=0)
    assert any(not torch.equal(trained[n], base[n]) for n in trained)  # the weights trained


def test_plan_search_over_a_gguf_file(bases: tuple[Path, Path], small_data: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    hf_dir, gguf_file = bases
    train, held = small_data
    settings = FinetuneConfig(private=False, max_len=48, micro_batch_size=8, seed=0,
                              lora=LoraConfig(rank=2, alpha=4))
    trial = TrialConfig(1e-2, 2, 3, 0.5, 6, seed=1)
    on_gguf = FinetuneTask(str(gguf_file), str(train), str(held), settings)
    assert on_gguf.dataset_size() == 6
    assert on_gguf(trial) == FinetuneTask(str(hf_dir), str(train), str(held), settings)(trial)
    with pytest.raises(ConfigError, match="GGUF file"):
        FinetuneTask(str(held), str(train), str(held), settings)  # a file, but no GGUF
    capsys.readouterr()
    assert main(["plan", "search", "--model", str(gguf_file), "--data", str(train), "--eval", str(held),
                 "--epsilon", "8", "--delta", "1e-5", "--lr", "1e-2", "--steps", "1", "--reference-batch", "6",
                 "--simulated-batch", "3", "--max-len", "48", "--lora-rank", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["trials"]) == 1 and f"--model {gguf_file}" in printed["command"]
