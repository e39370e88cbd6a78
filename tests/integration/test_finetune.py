"""`tramontane finetune`: DP LoRA on a tiny checkpoint with a real mistral_common tokenizer, end to end.

What must hold: the adapter folder is PEFT's layout plus the ledger; the ledger ends at the target epsilon
(never above); a starting adapter's ledger counts against the budget and an exhausted one is refused before
any record is read; user-level runs count users, not examples; a run killed with SIGKILL and resumed ends
with the ledger and the weights of an uninterrupted run; the report keeps the holder's figures apart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file

from tramontane import accounting
from tramontane.cli import main
from tramontane.errors import ConfigError, PrivacyBudgetError
from tramontane.finetune.lora import LoraConfig
from tramontane.finetune.run import PRIVACY_FILE, FinetuneConfig, finetune, read_privacy
from tramontane.models.checkpoint import save_model

from tests.conftest import random_model, tiny_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mistral = MistralTokenizer.v3()
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    vocab = mistral.instruct_tokenizer.tokenizer.n_words
    save_model(random_model(tiny_args(vocab_size=vocab, dim=32, head_dim=8), seed=3), path)
    shutil.copy(mistral.instruct_tokenizer.tokenizer.file_path, path / "tokenizer.model.v3")
    return path


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
            "user_id": f"user-{i % 6}"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    train, held = folder / "train.jsonl", folder / "held.jsonl"
    train.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(36)))
    held.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(100, 110)))
    return train, held


def _config(**overrides) -> FinetuneConfig:
    params = dict(epsilon=4.0, delta=1e-5, steps=4, batch_size=8, max_len=48, micro_batch_size=8,
                  checkpoint_every=1, seed=11, lora=LoraConfig(rank=4, alpha=8, targets=("attention",)))
    params.update(overrides)
    return FinetuneConfig(**params)


def test_dp_lora_run_writes_adapter_ledger_and_reports(model_dir: Path, data: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    train, held = data
    result = finetune(model_dir, train, tmp_path / "run", _config(canaries=2, canary_repetitions=(1, 3),
                                                                  canary_length=3), eval_data=held)
    adapter = tmp_path / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", PRIVACY_FILE} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(k.startswith("base_model.model.model.layers.") for k in load_file(adapter / "adapter_model.safetensors"))
    record = read_privacy(adapter)
    assert record is not None and record["privacy_unit"] == "example"
    eps = accounting.epsilon(record["ledger"], 1e-5, "rdp")
    assert 4.0 * 0.98 <= eps <= 4.0 * (1 + 1e-6)  # calibrated to the budget, never above it
    assert result.plan.steps == 4 and result.plan.units == 36 + 1 + 3  # two canaries: 1 and 3 repetitions
    release = json.loads((tmp_path / "run" / "report" / "release" / "report.json").read_text())
    assert release["privacy"]["epsilon_rdp"] == pytest.approx(eps)
    assert 0 < release["bounds"]["mi_advantage_bound"] < 1
    assert len(release["canary_exposure"]["canaries"]) >= 2
    assert "heldout_loss" not in json.dumps(release)  # the holder's figures stay out of the release
    holder = tmp_path / "run" / "report" / "holder-only" / "evaluation.json"
    assert stat.S_IMODE(holder.stat().st_mode) == 0o600
    evaluation = json.loads(holder.read_text())
    assert evaluation["heldout_loss"] > 0 and "auc" in evaluation["membership_attack"]


def test_user_level_counts_users(model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    result = finetune(model_dir, data[0], tmp_path / "run",
                      _config(privacy_unit="user", batch_size=3, max_examples_per_user=4))
    assert result.plan.units == 6  # six users, each at most 4 of their 6 examples
    assert result.holder["examples_dropped_by_user_bound"] == 6 * 2
    assert read_privacy(result.weights_dir)["privacy_unit"] == "user"


def test_adapter_ledger_counts_against_the_budget(model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    first = finetune(model_dir, data[0], tmp_path / "first", _config(epsilon=2.0))
    spent = first.statement.epsilon_rdp
    # Exhausted: refused before any record is read (the data path does not even exist).
    with pytest.raises(PrivacyBudgetError, match="nothing was read"):
        finetune(model_dir, tmp_path / "missing.jsonl", tmp_path / "second", _config(epsilon=2.0),
                 init_adapter=first.weights_dir)
    assert not (tmp_path / "second").exists()
    # Room left: the new steps are calibrated so that the whole ledger ends at the new budget.
    second = finetune(model_dir, data[0], tmp_path / "third", _config(epsilon=3.0), init_adapter=first.weights_dir)
    ledger = read_privacy(second.weights_dir)["ledger"]
    assert ledger.events[0] == first.statement.events[0]  # the first run's spending is kept, first
    assert spent < accounting.epsilon(ledger, 1e-5, "rdp") <= 3.0 * (1 + 1e-6)
    assert sum(e.steps for e in ledger.events) == 8
    with pytest.raises(ConfigError, match="same LoRA settings"):
        finetune(model_dir, data[0], tmp_path / "fourth", _config(epsilon=5.0, lora=LoraConfig(rank=2)),
                 init_adapter=first.weights_dir)


def test_existing_run_needs_resume(model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    finetune(model_dir, data[0], tmp_path / "run", _config(steps=1))
    with pytest.raises(ConfigError, match="another --out"):
        finetune(model_dir, data[0], tmp_path / "run", _config(steps=1))


def _cli(model_dir: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model_dir), "--data", str(train), "--out", str(out), "--epsilon", "4",
            "--delta", "1e-5", "--steps", "10", "--batch-size", "8", "--max-len", "48", "--lora-rank", "4",
            "--checkpoint-every", "1", "--seed", "5", *extra]


def test_kill_9_and_resume_gives_the_uninterrupted_ledger_and_weights(model_dir: Path, data: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    train = data[0]
    assert main(_cli(model_dir, train, tmp_path / "whole")) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT), OMP_NUM_THREADS="1")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tramontane.cli", *_cli(model_dir, train, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill once a few steps are checkpointed
            latest = out / "run" / "latest"
            if latest.exists() and json.loads(latest.read_text())["step"] >= 3:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert killed, "the run finished before it could be killed"
    assert not (out / "adapter").exists()
    assert main(_cli(model_dir, train, out, "--resume")) == 0
    whole, resumed = read_privacy(tmp_path / "whole" / "adapter"), read_privacy(out / "adapter")
    assert resumed["ledger"].to_dict() == whole["ledger"].to_dict()
    assert accounting.epsilon(resumed["ledger"], 1e-5) == accounting.epsilon(whole["ledger"], 1e-5)
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_cli_generate_and_merge_take_the_adapter(model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_cli(model_dir, data[0], tmp_path / "run", "--steps", "2")) == 0
    adapter = tmp_path / "run" / "adapter"
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(adapter), "--prompt", "Hi",
                 "--max-tokens", "4", "--json"]) == 0
    with_adapter = json.loads(capsys.readouterr().out)["tokens"]
    assert main(["finetune", "merge", "--model", str(model_dir), "--adapter", str(adapter), "--out",
                 str(tmp_path / "merged"), "--format", "consolidated"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "merged"), "--prompt", "Hi", "--max-tokens", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == with_adapter


def _tool_chat(i: int) -> dict:
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two integers",
                                               "parameters": {"type": "object", "properties": {
                                                   "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    call = {"id": f"call{i:05d}", "type": "function",
            "function": {"name": "add", "arguments": json.dumps({"a": i, "b": i})}}
    return {"tools": tools, "messages": [
        {"role": "user", "content": f"Add {i} and {i}."},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "name": "add", "content": str(2 * i)},
        {"role": "assistant", "content": f"The sum is {2 * i}."}]}


def test_full_finetune_on_agent_trajectories(model_dir: Path, tmp_path: Path) -> None:
    train = tmp_path / "tools.jsonl"
    train.write_text("".join(json.dumps(_tool_chat(i)) + "\n" for i in range(12)))
    result = finetune(model_dir, train, tmp_path / "run", _config(method="full", steps=2, batch_size=4,
                                                                  max_len=256))
    assert result.weights_dir.name == "model"
    record = read_privacy(result.weights_dir)
    assert record["privacy_unit"] == "example"
    assert accounting.epsilon(record["ledger"], 1e-5) <= 4.0 * (1 + 1e-6)
    from tramontane.models.checkpoint import load_model
    from tramontane.tokenizer import Tokenizer

    trained, _ = load_model(result.weights_dir)
    base, _ = load_model(model_dir)
    moved = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert moved  # every weight trains
    assert Tokenizer.from_model_dir(result.weights_dir).version == Tokenizer.from_model_dir(model_dir).version
