"""The training loop: budget refusal, calibration, resume after a kill, learning with and without DP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tramontane import accounting
from tramontane.errors import PrivacyBudgetError
from tramontane.training import TrainConfig, Trainer, latest_checkpoint
from tramontane.training.objectives import LanguageModelingObjective

from tests.conftest import random_model, tiny_args

ROOT = Path(__file__).resolve().parents[2]


def _copy_task(n: int = 64, length: int = 10, seed: int = 0) -> LanguageModelingObjective:
    """Rows 'a b c ... a b c': the second half repeats the first, so a model can learn it."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(3, 20, (n, length // 2), generator=gen)
    seq = torch.cat([half, half], dim=1)
    labels = seq[:, 1:].clone()
    labels[:, : length // 2 - 1] = -100  # only the copied half is predictable
    return LanguageModelingObjective(seq[:, :-1], labels)


def test_refuses_a_run_that_would_exceed_the_budget(tmp_path: Path) -> None:
    model = random_model(tiny_args())
    config = TrainConfig(steps=2000, batch_size=32, noise_multiplier=0.8, target_epsilon=1.0, delta=1e-5)
    with pytest.raises(PrivacyBudgetError, match="nothing was spent"):
        Trainer(model, _copy_task(), 64, config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_calibrated_run_spends_at_most_the_target() -> None:
    model = random_model(tiny_args())
    config = TrainConfig(steps=6, batch_size=16, target_epsilon=3.0, delta=1e-5, micro_batch_size=8)
    result = Trainer(model, _copy_task(), 64, config).fit()
    assert result.epsilon <= 3.0
    assert result.epsilon == pytest.approx(3.0, rel=1e-3)
    assert result.ledger.events[0].steps == 6
    direct = accounting.epsilon([accounting.DpSgdEvent(16 / 64, result.noise_multiplier, 6)], 1e-5)
    assert result.epsilon == pytest.approx(direct)


def test_non_private_training_learns_and_heavy_noise_does_not() -> None:
    objective = _copy_task(n=128)
    eval_batch = torch.arange(128)

    def eval_loss(model) -> float:
        with torch.no_grad():
            return float(objective.losses(model, eval_batch).mean())

    torch.manual_seed(0)
    plain = random_model(tiny_args(sliding_window=None), seed=1)
    before = eval_loss(plain)
    Trainer(plain, objective, 128, TrainConfig(steps=150, batch_size=32, lr=3e-3, private=False, data_seed=0)).fit()
    learned = eval_loss(plain)
    assert learned < 0.5 * before

    noisy = random_model(tiny_args(sliding_window=None), seed=1)
    Trainer(noisy, objective, 128, TrainConfig(steps=150, batch_size=32, lr=3e-3, noise_multiplier=50.0,
                                               delta=1e-5, max_grad_norm=0.1)).fit()
    # sigma = 50 on batches of ~32 drowns the signal: no learning close to the non-private run.
    assert eval_loss(noisy) > learned + 0.5


_RUN = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.integration.test_training import _copy_task
from tests.conftest import random_model, tiny_args
from tramontane.training import TrainConfig, Trainer
torch.manual_seed(0)
model = random_model(tiny_args())
config = TrainConfig(steps=12, batch_size=16, noise_multiplier=1.3, target_epsilon=20.0, delta=1e-5,
                     micro_batch_size=8, checkpoint_every=2)
slow = float(sys.argv[2])
trainer = Trainer(model, _copy_task(), 64, config, run_dir=sys.argv[1],
                  on_step=lambda step, total, info: __import__("time").sleep(slow))
result = trainer.fit()
print(result.epsilon)
"""


def test_killed_and_resumed_run_ends_with_the_same_ledger(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_RUN.format(root=str(ROOT)))
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    straight = subprocess.run([sys.executable, str(script), str(tmp_path / "a"), "0"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr

    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "b"), "0.3"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        ckpt = latest_checkpoint(tmp_path / "b") if (tmp_path / "b" / "latest").exists() else None
        if ckpt is not None and json.loads((ckpt / "meta.json").read_text())["step"] >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((latest_checkpoint(tmp_path / "b") / "meta.json").read_text())["step"]
    assert 4 <= killed_at < 12
    resumed = subprocess.run([sys.executable, str(script), str(tmp_path / "b"), "0"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((latest_checkpoint(tmp_path / "a") / "meta.json").read_text())
    b = json.loads((latest_checkpoint(tmp_path / "b") / "meta.json").read_text())
    assert a["step"] == b["step"] == 12
    assert a["ledger"] == b["ledger"]
    assert float(straight.stdout) == pytest.approx(float(resumed.stdout), rel=1e-12)


def test_a_resumed_non_private_run_goes_on_with_the_next_batches(tmp_path: Path) -> None:
    class Recorded(LanguageModelingObjective):
        def __init__(self, seen: list[list[int]]) -> None:
            task = _copy_task()
            super().__init__(task.inputs, task.labels)
            self.seen = seen

        def rows(self, indices):
            self.seen.append(sorted(int(i) for i in indices))
            return super().rows(indices)

    class Stop(Exception):
        pass

    def stop_at(step: int):
        def on_step(done: int, total: int, info: dict) -> None:
            if done == step:
                raise Stop
        return on_step

    config = TrainConfig(steps=10, batch_size=16, lr=1e-3, private=False, data_seed=3, checkpoint_every=2,
                         micro_batch_size=16)
    straight: list[list[int]] = []
    Trainer(random_model(tiny_args(), seed=1), Recorded(straight), 64, config, run_dir=tmp_path / "a").fit()
    interrupted: list[list[int]] = []
    with pytest.raises(Stop):  # stopped during step 5, after the checkpoint of step 4
        Trainer(random_model(tiny_args(), seed=1), Recorded(interrupted), 64, config, run_dir=tmp_path / "b",
                on_step=stop_at(5)).fit()
    resumed: list[list[int]] = []
    trainer = Trainer(random_model(tiny_args(), seed=1), Recorded(resumed), 64, config, run_dir=tmp_path / "b")
    assert trainer.step == 4
    trainer.fit()
    assert len(straight) == 10 and interrupted == straight[:5]
    assert resumed == straight[4:]  # steps 5-10: the run's own next batches, not its first ones again
