"""`torchrun --nproc-per-node 2 -m tramontane.cli finetune|synth fit` on loopback (gloo, CPU).

What must hold: the 2-process fine-tune writes the adapter and ledger of the single-process command with the
same seed (weights to 1e-6), printed once (rank 0); `synth fit` under torchrun spends the plan once (one DP
row count) and saves one synthesizer whose ledger holds every DP-SGD step.

This file is also the torchrun worker (`torchrun ... test_distributed_cli.py OUT`): one launch runs both
commands in turn, as `python -m tramontane.cli` does, each rank's output of each command in files of its own,
while this process runs the single-process fine-tune.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
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
from tests.integration.test_distributed import finish_torchrun, one_thread, start_torchrun, stop_torchrun

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


# -- the torchrun worker --------------------------------------------------------------------------------

def _worker(out: Path) -> None:
    """Run each command of OUT/commands.json as `python -m tramontane.cli ARGS` would, this rank's stdout and
    stderr going to OUT/NAME-rankR.out and .err; stop at the first that fails (the other rank cannot go on
    alone)."""
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 gives the command alone: tests.conftest asks for 2
    rank = os.environ["RANK"]
    for name, args in json.loads((out / "commands.json").read_text()).items():
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        code: object = "returned without exiting"
        with open(out / f"{name}-rank{rank}.out", "w") as stdout, open(out / f"{name}-rank{rank}.err", "w") as stderr:
            os.dup2(stdout.fileno(), 1)
            os.dup2(stderr.fileno(), 2)
            sys.argv = ["tramontane.cli", *args]
            try:
                runpy.run_module("tramontane.cli", run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                code = exit_.code
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        (out / f"{name}-rank{rank}.status").write_text(json.dumps(code))
        if code != 0:
            raise SystemExit(f"{name} on rank {rank}: {code}")


def _finetune_options(model_dir: Path, data: Path) -> list[str]:
    return ["--model", str(model_dir), "--data", str(data), "--epsilon", "4", "--delta", "1e-5", "--steps",
            "4", "--batch-size", "8", "--max-len", "48", "--micro-batch-size", "4", "--lr", "1e-3",
            "--lora-rank", "4", "--checkpoint-every", "2", "--seed", "11"]


@pytest.fixture(scope="module")
def launched(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch of both commands (fine-tune into two/, synth fit into run/ and model/), with the
    single-process fine-tune into one/ run here meanwhile; the folder of all."""
    folder = tmp_path_factory.mktemp("cli")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(36)))
    table = load_adult("train")[["age", "workclass", "sex", "income"]].sample(1500, random_state=3)
    table.reset_index(drop=True).to_csv(folder / "d.csv", index=False)
    options = _finetune_options(model_dir, data)
    commands = {"finetune": ["finetune", *options, "--out", str(folder / "two")],
                "synth": ["synth", "fit", "--data", str(folder / "d.csv"), "--epsilon", "20", "--steps", "4",
                          "--accountant", "rdp", "--seed", "0", "--checkpoint-every", "2", "--run-dir", str(folder / "run"),
                          "--out-model", str(folder / "model")]}
    (folder / "commands.json").write_text(json.dumps(commands))
    launch = start_torchrun([__file__, str(folder)])
    try:
        with one_thread():
            assert main(["finetune", *options, "--out", str(folder / "one")]) == 0
    except BaseException:
        stop_torchrun(launch)
        raise
    done = finish_torchrun(launch)
    assert done.returncode == 0, done.stderr[-4000:]
    return folder


def _ran(folder: Path, name: str) -> tuple[list[str], list[str]]:
    """Each rank's stdout and stderr of one command, once both ranks exited 0 from it."""
    for rank in (0, 1):
        assert json.loads((folder / f"{name}-rank{rank}.status").read_text()) == 0, \
            (folder / f"{name}-rank{rank}.err").read_text()[-4000:]
    return ([(folder / f"{name}-rank{rank}.out").read_text() for rank in (0, 1)],
            [(folder / f"{name}-rank{rank}.err").read_text() for rank in (0, 1)])


def test_finetune_on_two_processes_writes_the_single_process_adapter(launched: Path) -> None:
    tmp_path = launched
    stdout, stderr = _ran(launched, "finetune")
    assert stdout[0].strip() == str(tmp_path / "two" / "adapter") and stdout[1] == ""  # printed by rank 0 alone
    assert "".join(stderr).count("privacy: epsilon") == 1

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


def test_synth_fit_on_two_processes_spends_the_plan_once(launched: Path) -> None:
    tmp_path = launched
    _, stderr = _ran(launched, "synth")
    assert "".join(stderr).count("saved the synthesizer") == 1
    synth = Synthesizer.load(tmp_path / "model")
    labels = [event.label for event in synth.ledger.events]
    assert labels.count("row count") == 1
    steps = [e for e in synth.ledger.events if isinstance(e, accounting.DpSgdEvent)]
    assert sum(e.steps for e in steps) == 4
    assert accounting.epsilon(synth.ledger, 1e-5, synth.config.accountant) <= 20 * (1 + 1e-9)
    train = tmp_path / "run" / "train"
    meta = json.loads((train / json.loads((train / "latest").read_text())["checkpoint"] / "meta.json").read_text())
    trained = meta["ledger"]["events"]  # written by rank 0: the ledger up to the end of DP-SGD
    assert meta["step"] == 4 and synth.ledger.to_dict()["events"][:len(trained)] == trained
    assert synth.sample(50, seed=0).shape == (50, 4)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
