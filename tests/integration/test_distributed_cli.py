"""`torchrun --nproc-per-node 2 -m tramontane.cli finetune|synth fit` on loopback (gloo, CPU).

What must hold: the 2-process fine-tune writes the adapter and ledger of the single-process command with the
same seed (weights to 1e-6), printed once (rank 0); `synth fit` under torchrun spends the plan once (one DP
row count) and saves one synthesizer whose ledger holds every DP-SGD step.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file

from tramontane import accounting
from tramontane.cli import main
from tramontane.datasets import load_adult
from tramontane.finetune.run import PRIVACY_FILE
from tramontane.models.checkpoint import save_model
from tramontane.synth.synthesizer import Synthesizer

from tests.conftest import random_model, tiny_args
from tests.integration.test_distributed import torchrun

logging.getLogger("absl").setLevel(logging.ERROR)


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
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


def test_finetune_on_two_processes_writes_the_single_process_adapter(model_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(36)))
    options = ["--model", str(model_dir), "--data", str(data), "--epsilon", "4", "--delta", "1e-5", "--steps",
               "4", "--batch-size", "8", "--max-len", "48", "--micro-batch-size", "4", "--lr", "1e-3",
               "--lora-rank", "4", "--checkpoint-every", "2", "--seed", "11"]
    assert main(["finetune", *options, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun(["tramontane.cli", "finetune", *options, "--out", str(tmp_path / "two")], module=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == str(tmp_path / "two" / "adapter")  # printed by rank 0 alone
    assert done.stderr.count("privacy: epsilon") == 1

    one, two = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-6), name
    start = {n: p for n, p in one.items() if "lora_B" in n}  # B starts at zero: the run must have moved it
    assert max(p.abs().max().item() for p in start.values()) > 1e-4
    ledgers = [json.loads((tmp_path / run / "adapter" / PRIVACY_FILE).read_text())["ledger"] for run in ("one", "two")]
    assert ledgers[0] == ledgers[1]
    assert sum(e["steps"] for e in ledgers[1]["events"]) == 4
    assert (tmp_path / "two" / "report" / "release" / "report.json").is_file()


def test_synth_fit_on_two_processes_spends_the_plan_once(tmp_path: Path) -> None:
    table = load_adult("train")[["age", "workclass", "sex", "income"]].sample(1500, random_state=3)
    data = tmp_path / "d.csv"
    table.reset_index(drop=True).to_csv(data, index=False)
    done = torchrun(["tramontane.cli", "synth", "fit", "--data", str(data), "--epsilon", "20", "--steps", "4",
                     "--seed", "0", "--checkpoint-every", "2", "--run-dir", str(tmp_path / "run"),
                     "--out-model", str(tmp_path / "model")], module=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("saved the synthesizer") == 1
    synth = Synthesizer.load(tmp_path / "model")
    labels = [event.label for event in synth.ledger.events]
    assert labels.count("row count") == 1
    steps = [e for e in synth.ledger.events if isinstance(e, accounting.DpSgdEvent)]
    assert sum(e.steps for e in steps) == 4
    assert accounting.epsilon(synth.ledger, 1e-5) <= 20 * (1 + 1e-9)
    train = tmp_path / "run" / "train"
    meta = json.loads((train / json.loads((train / "latest").read_text())["checkpoint"] / "meta.json").read_text())
    trained = meta["ledger"]["events"]  # written by rank 0: the ledger up to the end of DP-SGD
    assert meta["step"] == 4 and synth.ledger.to_dict()["events"][:len(trained)] == trained
    assert synth.sample(50, seed=0).shape == (50, 4)
