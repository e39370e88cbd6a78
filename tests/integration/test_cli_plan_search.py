"""`tramontane plan search`: the constant-TAN search on the fine-tuning task, end to end on a tiny checkpoint.

What must hold: the trials run at the reduced batch with sigma_ref * B_sim / B_ref and are labelled not
private (stdout, JSON file with the holder's mode); a trial's metric is what the fine-tuning task gives at
that setting in this process (the worker processes ran what was planned); the recommended `tramontane
finetune` command, run as printed, trains the private run planned: same batch, steps, learning rate and
noise multiplier, its ledger within the budget; `tramontane plan` without a subcommand works as before.
"""

from __future__ import annotations

import json
import shlex
import shutil
import stat
from pathlib import Path

import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tests.conftest import random_model, tiny_args
from tramontane import accounting
from tramontane.cli import main
from tramontane.finetune.lora import LoraConfig
from tramontane.finetune.run import FinetuneConfig, read_privacy
from tramontane.finetune.search import FinetuneTask
from tramontane.models.checkpoint import save_model
from tramontane.training.search import TrialConfig

EPSILON, DELTA, B_REF, B_SIM, STEPS = 8.0, 1e-5, 24, 6, 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mistral = MistralTokenizer.v3()
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    vocab = mistral.instruct_tokenizer.tokenizer.n_words
    save_model(random_model(tiny_args(vocab_size=vocab, dim=32, head_dim=8, n_layers=1), seed=3), path)
    shutil.copy(mistral.instruct_tokenizer.tokenizer.file_path, path / "tokenizer.model.v3")
    return path


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    train, held = folder / "train.jsonl", folder / "held.jsonl"
    train.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(32)))
    held.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(100, 106)))
    return train, held


def _argv(model_dir: Path, data: tuple[Path, Path], *extra: str) -> list[str]:
    return ["plan", "search", "--model", str(model_dir), "--data", str(data[0]), "--eval", str(data[1]),
            "--epsilon", str(EPSILON), "--delta", str(DELTA), "--lr", "1e-3,3e-2", "--steps", str(STEPS),
            "--reference-batch", str(B_REF), "--simulated-batch", str(B_SIM), "--max-len", "32",
            "--micro-batch-size", "8", "--lora-rank", "2", *extra]


def test_search_in_worker_processes_and_its_command_trains_the_planned_run(
        model_dir: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "search.json"
    assert main(_argv(model_dir, data, "--workers", "2", "--threads-per-worker", "1", "--out", str(out),
                      "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["private"] is False and "NOT PRIVATE" in printed["note"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    written = json.loads(out.read_text())
    assert written["trials"] == printed["trials"] and written["recommendation"] == printed["recommendation"]
    sigma_ref = accounting.calibrate_noise_multiplier(EPSILON, DELTA, B_REF / 32, STEPS).noise_multiplier
    assert [t["lr"] for t in sorted(printed["trials"], key=lambda t: t["lr"])] == [1e-3, 3e-2]
    for trial in printed["trials"]:
        assert trial["private"] is False and trial["label"] == "simulation, not private"
        assert trial["batch_size"] == B_SIM and trial["steps"] == STEPS
        assert trial["noise_multiplier"] == pytest.approx(sigma_ref * B_SIM / B_REF, rel=1e-12)
    # What a worker process computed is what the task computes here for the same setting and seed.
    best = printed["trials"][0]
    task = FinetuneTask(model_dir, data[0], data[1],
                        FinetuneConfig(private=False, max_len=32, micro_batch_size=8, seed=0,
                                       lora=LoraConfig(rank=2, alpha=4)))
    again = task(TrialConfig(best["lr"], STEPS, B_SIM, best["noise_multiplier"], 32, best["seeds"][0]))
    assert again == pytest.approx(best["metric"], rel=1e-6)
    rec = printed["recommendation"]
    assert rec["private"] is True and rec["lr"] == best["lr"] and rec["batch_size"] == B_REF
    assert rec["noise_multiplier"] == pytest.approx(sigma_ref, rel=1e-9)
    # The printed command is the private run: its own calibration lands on the recommended sigma.
    command = shlex.split(printed["command"])
    assert command[:2] == ["tramontane", "finetune"]
    command[command.index("--out") + 1] = str(tmp_path / "run")
    assert main(command[1:]) == 0
    capsys.readouterr()
    record = read_privacy(tmp_path / "run" / "adapter")
    assert record is not None and record["private"] is True
    (event,) = record["ledger"].events
    assert (event.sample_rate, event.steps) == (B_REF / 32, STEPS)
    assert event.noise_multiplier == pytest.approx(rec["noise_multiplier"], rel=1e-9)
    assert accounting.epsilon(record["ledger"], DELTA) <= EPSILON * (1 + 1e-9)
    report = json.loads((tmp_path / "run" / "report" / "release" / "report.json").read_text())
    assert report["config"]["lr"] == rec["lr"] and report["config"]["lora"]["rank"] == 2


def test_search_prints_the_trials_as_not_private(model_dir: Path, data: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # one step a trial: what is checked here is the printing, not the training
    assert main(_argv(model_dir, data, "--lr", "1e-3", "--repeats", "2", "--steps", "1")) == 0
    captured = capsys.readouterr()
    assert "NOT PRIVATE" in captured.out and "recommended private run" in captured.out
    assert "NOT PRIVATE" in captured.err and "trial 1/1 (not private)" in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("tramontane finetune --model")


@pytest.mark.parametrize(("extra", "message"), [
    (("--lr", "fast"), "--lr takes comma-separated numbers"),
    (("--steps", "2.5"), "--steps takes comma-separated whole numbers"),
    (("--simulated-batch", "64"), "above the reference batch"),
    (("--epsilon", "-1"), "--epsilon"),
])
def test_search_refuses_bad_options(model_dir: Path, data: tuple[Path, Path], extra: tuple[str, ...], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(model_dir, data, *extra)) == 2
    assert message in capsys.readouterr().err


def test_plan_without_subcommand_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--dataset-size", "50000", "--epsilon", "8", "--delta", "1e-5", "--steps", "2500",
                 "--reference-batch", "4096", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["private_run"]["batch_size"] == 4096 and out["simulation"]["private"] is False
    assert main(["plan", "--epsilon", "8"]) == 2
    assert "needs --dataset-size, --delta, --steps" in capsys.readouterr().err
