"""`tramontane finetune`: DP LoRA on a tiny checkpoint with a real mistral_common tokenizer, end to end.

What must hold: the adapter folder is PEFT's layout plus the ledger; the ledger ends at the target epsilon
(never above); a starting adapter's ledger counts against the budget and an exhausted one is refused before
any record is read; user-level runs count users, not examples; a run killed with SIGKILL and resumed ends
with the ledger and the weights of an uninterrupted run; the report keeps the holder's figures apart. Over an
int8 / int4 quantized base (QLoRA-style): the adapters wrap quantized layers and alone train, the ledger is the
float base's, per-example clipping is the one-example-at-a-time loop's, and the adapter loads over either base.
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
from typing import Any

import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file

from tramontane import accounting
from tramontane.cli import main
from tramontane.errors import ConfigError, DataError, PrivacyBudgetError
from tramontane.finetune.lora import LoraConfig
from tramontane.finetune.run import PRIVACY_FILE, FinetuneConfig, FinetuneResult, finetune, read_privacy
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


def test_a_run_that_fails_before_training_leaves_nothing_to_resume(model_dir: Path, data: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    out = tmp_path / "run"
    with pytest.raises(DataError):
        finetune(model_dir, bad, out, _config(steps=1))
    assert not out.exists()  # no setup left behind that would ask for --resume
    kept = tmp_path / "mine"
    kept.mkdir()  # a folder the user made is kept, emptied of the failed run
    with pytest.raises(ConfigError, match="LoRA|target"):
        finetune(model_dir, data[0], kept, _config(steps=1, lora=LoraConfig(rank=4, targets=("nothing",))))
    assert kept.is_dir() and not any(kept.iterdir())
    finetune(model_dir, data[0], out, _config(steps=1))  # the same --out, no --resume
    assert (out / "adapter").is_dir()


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


# -- QLoRA-style: adapters over an int8 / int4 weight-only quantized base ------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six chats: a run over all of them at every step (q = 1) spends no time on subsampled accounting."""
    train = tmp_path_factory.mktemp("small") / "train.jsonl"
    train.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(6)))
    return train


def _qconfig(**overrides: Any) -> FinetuneConfig:
    params: dict[str, Any] = {"epsilon": 8.0, "steps": 2, "batch_size": 6}
    params.update(overrides)
    return _config(**params)


def _ledger(weights_dir: Path) -> dict[str, Any]:
    record = read_privacy(weights_dir)
    assert record is not None
    return record["ledger"].to_dict()


@pytest.fixture(scope="module")
def int8_run(model_dir: Path, small_data: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneResult, torch.nn.Module, FinetuneConfig]:
    """A DP LoRA run over an int8 base, and the model it trained (kept by wrapping `load_base`)."""
    from tramontane.finetune import run

    built: list[torch.nn.Module] = []
    load_base = run.load_base

    def keep(*args: Any, **kwargs: Any) -> torch.nn.Module:
        built.append(load_base(*args, **kwargs))
        return built[-1]

    config = _qconfig(quantize="int8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "load_base", keep)
        result = finetune(model_dir, small_data, tmp_path_factory.mktemp("int8") / "run", config)
    return result, built[0], config


def test_dp_lora_over_an_int8_base_trains_only_the_adapters_on_the_float_runs_ledger(
        model_dir: Path, small_data: Path, tmp_path: Path,
        int8_run: tuple[FinetuneResult, torch.nn.Module, FinetuneConfig]) -> None:
    from tramontane.finetune.lora import LoraLinear
    from tramontane.finetune.run import load_base
    from tramontane.models.quant import Int8Linear, decoder_linear_names

    quant, trained, config = int8_run
    adapters = 0
    for name in decoder_linear_names(trained):  # every decoder linear layer is quantized, adapted or not
        module = trained.get_submodule(name)
        adapters += isinstance(module, LoraLinear)
        assert isinstance(module.base if isinstance(module, LoraLinear) else module, Int8Linear), name
    assert adapters == 2 * 4  # wq wk wv wo of both layers
    # only the adapters moved: the same base and adapter initialisation, built afresh, differs in them alone
    fresh = load_base(model_dir, config, lora_seed=config.seed).state_dict()
    after = trained.state_dict()
    assert after.keys() == fresh.keys()
    changed = {k for k in after if not torch.equal(after[k], fresh[k])}
    assert {k for k in after if ".lora_B." in k} <= changed  # B starts at zero: each one moved
    assert all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert any(k.endswith(".qweight") for k in after)  # the int8 weights were compared too, and kept
    # privacy accounting does not depend on the quantization: the float-base run has the same plan and ledger
    plain = finetune(model_dir, small_data, tmp_path / "float", _qconfig())
    assert quant.plan == plain.plan
    assert _ledger(quant.weights_dir) == _ledger(plain.weights_dir)
    assert quant.release["config"]["quantize"] == "int8" and plain.release["config"]["quantize"] is None


def test_a_resumed_int8_run_requantizes_and_ends_with_the_uninterrupted_adapter(
        model_dir: Path, small_data: Path, tmp_path: Path,
        int8_run: tuple[FinetuneResult, torch.nn.Module, FinetuneConfig]) -> None:
    whole, _, config = int8_run

    def stop(step: int, steps: int, info: dict[str, float]) -> None:
        if step == 2:  # before step 2's checkpoint: the resume starts from step 1's
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(model_dir, small_data, tmp_path / "cut", config, on_step=stop)
    assert not (tmp_path / "cut" / "adapter").exists()
    with pytest.raises(ConfigError, match="quant_group_size.*quantize"):  # the setting is part of the run
        finetune(model_dir, small_data, tmp_path / "cut", _qconfig(quantize="int4", quant_group_size=32),
                 resume=True)
    resumed = finetune(model_dir, small_data, tmp_path / "cut", config, resume=True)
    assert _ledger(resumed.weights_dir) == _ledger(whole.weights_dir)
    a = load_file(whole.weights_dir / "adapter_model.safetensors")
    b = load_file(resumed.weights_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # in one process the same operations: a float base on resume would differ by ~1e-6
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)


@pytest.mark.parametrize("quantize, group, strategy, head", [
    ("int8", None, "ghost", False), ("int8", None, "materialize", False), ("int4", 32, "auto", False),
    ("int8", None, "ghost", True), ("int4", 32, "auto", True)])
def test_per_example_clipping_over_a_quantized_base_is_the_one_example_at_a_time_loop(
        tmp_path: Path, quantize: str, group: int | None, strategy: str, head: bool) -> None:
    """head: the output head and the embeddings are quantized too (`quantize_head`), so every gradient reaches
    the adapters through the dequantized head."""
    from tramontane.dp import DPEngine
    from tramontane.errors import TramontaneWarning
    from tramontane.finetune.lora import lora_modules
    from tramontane.finetune.run import load_base
    from tramontane.models.quant import QuantizedEmbedding, QuantizedLinear

    save_model(random_model(tiny_args(dim=32, head_dim=8), seed=4), tmp_path / "tiny")  # vocabulary of 97
    model = load_base(tmp_path / "tiny", _qconfig(quantize=quantize, quant_group_size=group, quantize_head=head,
                                                  lora=LoraConfig(rank=3, alpha=6, targets=("all",))), lora_seed=1)
    model.train()  # as the trainer runs it: the quantized layers dequantize, in the batch and alone alike
    assert all(isinstance(lora.base, QuantizedLinear) for lora in lora_modules(model).values())
    assert isinstance(model.output, QuantizedLinear) == head
    assert isinstance(model.tok_embeddings, QuantizedEmbedding) == head
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a non-zero B, so that every adapter weight has a gradient
        for lora in lora_modules(model).values():
            lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=gen) * 0.3)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".lora_A." in n or ".lora_B." in n for n in params)
    tokens = torch.randint(0, 97, (5, 11), generator=gen)

    def losses(batch: torch.Tensor) -> torch.Tensor:  # [B]: each row's summed next-token loss
        logits = model(batch[:, :-1])
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].reshape(-1),
                                                      reduction="none")
        return per_token.view(batch.shape[0], -1).sum(1)

    # the oracle: each example alone, its adapter gradient by autograd, clipped, then summed
    alone = [torch.autograd.grad(losses(tokens[i:i + 1]).sum(), list(params.values())) for i in range(5)]
    norms = torch.stack([torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt() for grads in alone])
    clip = float(norms.median())  # some examples clipped, some not
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    expected = {n: torch.stack([float(f) * grads[j].double() for f, grads in zip(factors, alone)]).sum(0)
                for j, n in enumerate(params)}

    with pytest.warns(TramontaneWarning, match="NOT"):  # sigma 0: the clipped sum alone
        engine = DPEngine(model, max_grad_norm=clip, noise_multiplier=0.0, linear_strategy=strategy)
    with engine.record():
        engine.backward(losses(tokens))
    assert engine.per_example_norms is not None
    torch.testing.assert_close(engine.per_example_norms.double(), norms, rtol=1e-5, atol=0)
    got = engine.clipped_grad_sum()
    assert got.keys() == params.keys()
    for name, want in expected.items():
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_cli_finetune_over_an_int4_base_writes_an_adapter_both_bases_load(
        model_dir: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tramontane.finetune.adapter import load_model_with_adapter
    from tramontane.finetune.lora import lora_modules
    from tramontane.models.quant import Int4Linear, QuantConfig

    out = tmp_path / "run"
    assert main(["finetune", "--model", str(model_dir), "--data", str(small_data), "--out", str(out),
                 "--epsilon", "8", "--delta", "1e-5", "--steps", "2", "--batch-size", "6", "--max-len", "48",
                 "--lora-rank", "4", "--seed", "5", "--quantize", "int4", "--quant-group-size", "32",
                 "--quantize-head"]) == 0
    adapter = out / "adapter"
    record = read_privacy(adapter)
    assert record is not None and sum(e.steps for e in record["ledger"].events) == 2
    release = json.loads((out / "report" / "release" / "report.json").read_text())
    assert [release["config"][k] for k in ("quantize", "quant_group_size", "quantize_head")] == ["int4", 32, True]
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)  # trained: B is off zero
    # the adapter loads over the float base and over the int4 base it was trained on (head and embeddings
    # quantized too), the same weights in both
    on_float, _ = load_model_with_adapter(model_dir, adapter)
    on_int4, _ = load_model_with_adapter(model_dir, adapter,
                                         quantize=QuantConfig("int4", 32, embeddings=True, output=True))
    assert isinstance(on_int4.output, Int4Linear) and isinstance(on_float.output, torch.nn.Linear)
    float_adapters, int4_adapters = lora_modules(on_float), lora_modules(on_int4)
    assert float_adapters.keys() == int4_adapters.keys() and len(float_adapters) == 8
    for name, lora in int4_adapters.items():
        assert isinstance(lora.base, Int4Linear) and isinstance(float_adapters[name].base, torch.nn.Linear)
        assert torch.equal(lora.lora_B.weight, float_adapters[name].lora_B.weight)
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(adapter), "--quantize", "int4",
                 "--quant-group-size", "32", "--quantize-head", "--prompt", "Hi", "--max-tokens", "3",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 3


def test_full_finetuning_of_a_quantized_base_is_refused(model_dir: Path, small_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from tramontane.finetune.run import _resolve_base_quantization, load_base
    from tramontane.models.checkpoint import load_model
    from tramontane.models.quant import quantize_model

    with pytest.raises(ConfigError, match="method='lora'"):
        _qconfig(method="full", quantize="int8")
    with pytest.raises(ConfigError, match="needs quantize='int4'"):
        _qconfig(quant_group_size=32)
    with pytest.raises(ConfigError, match="int8 quantization is per output channel"):
        _qconfig(quantize="int8", quant_group_size=32)
    with pytest.raises(ConfigError, match="quantize_head.*needs quantize"):
        _qconfig(quantize_head=True)
    assert main(["finetune", "--model", str(model_dir), "--data", str(small_data), "--out", str(tmp_path / "c"),
                 "--epsilon", "8", "--delta", "1e-5", "--quantize-head"]) == 2
    assert "--quantize-head need" in capsys.readouterr().err
    assert _qconfig(quantize="int4").quant_group_size == 64  # the default, recorded as used
    assert main(["finetune", "--model", str(model_dir), "--data", str(small_data), "--out", str(tmp_path / "a"),
                 "--epsilon", "8", "--method", "full", "--quantize", "int8"]) == 2
    assert "--method lora" in capsys.readouterr().err
    # a group size the checkpoint's layers do not take: refused before the run writes anything
    with pytest.raises(ConfigError, match="does not divide"):
        finetune(model_dir, small_data, tmp_path / "b", _qconfig(quantize="int4"))
    assert not (tmp_path / "b").exists()
    # a checkpoint saved quantized cannot be fully fine-tuned either
    quantized = tmp_path / "int8-checkpoint"
    save_model(quantize_model(load_model(model_dir)[0], "int8"), quantized)
    with pytest.raises(ConfigError, match="quantized checkpoint"):
        load_base(quantized, _qconfig(method="full"))
    with pytest.raises(ConfigError, match="saved with a float output head"):  # its head was not quantized
        _resolve_base_quantization(quantized, _qconfig(quantize="int8", quantize_head=True))


def test_a_checkpoint_saved_quantized_is_the_base_the_report_records(model_dir: Path, small_data: Path,
                                                                      tmp_path: Path) -> None:
    """A base saved quantized (head and embeddings too) trains as it was saved; the report names its scheme
    (not "no quantization"); a different scheme asked for, or full fine-tuning, is refused before anything
    is written."""
    from tramontane.models.checkpoint import load_model
    from tramontane.models.quant import QuantConfig, quantize_model

    quantized = tmp_path / "int4-checkpoint"
    save_model(quantize_model(load_model(model_dir)[0], QuantConfig("int4", 32, embeddings=True, output=True)),
               quantized)
    for path in model_dir.iterdir():  # the tokenizer
        if path.name.startswith("tekken") or ".model" in path.name:
            shutil.copy2(path, quantized / path.name)
    for config, match in ((_qconfig(quantize="int8"), "already quantized \\(int4, group size 32\\)"),
                          (_qconfig(quantize="int4"), "already quantized"),  # group size 64 is not 32
                          (_qconfig(method="full"), "quantized checkpoint")):
        with pytest.raises(ConfigError, match=match):
            finetune(quantized, small_data, tmp_path / "refused", config)
        assert not (tmp_path / "refused").exists()
    for name, config in (("as-saved", _qconfig()), ("same-scheme", _qconfig(quantize="int4", quant_group_size=32))):
        result = finetune(quantized, small_data, tmp_path / name, config)
        assert [result.release["config"][k] for k in ("quantize", "quant_group_size", "quantize_head")] == [
            "int4", 32, True]


def test_plan_searchs_command_repeats_the_quantized_base(model_dir: Path, small_data: Path) -> None:
    """The `tramontane finetune` options `plan search` prints for a quantized base parse back to the same base."""
    from tramontane.cli import _quantize, build_parser
    from tramontane.finetune.search import finetune_arguments
    from tramontane.models.quant import QuantConfig

    for config in (_qconfig(quantize="int4", quant_group_size=32, quantize_head=True), _qconfig(quantize="int8")):
        options = finetune_arguments(config)
        args = build_parser().parse_args(["finetune", "--model", str(model_dir), "--data", str(small_data),
                                          "--out", "x", *options])
        assert _quantize(args) == config.quant_config
    assert config.quant_config == QuantConfig("int8")
