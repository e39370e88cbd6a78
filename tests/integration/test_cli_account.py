"""`tramontane account` and `tramontane plan` print what dp-accounting computes (independent oracle)."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from tramontane.accounting import RDP_ORDERS
from tramontane.cli import main


def _rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    accountant = RdpAccountant(list(RDP_ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_account_epsilon_and_tan(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, ["account", "--sample-rate", "0.04", "--noise-multiplier", "1.5", "--steps", "2250",
                        "--delta", "1e-5", "--json"])
    assert out["epsilon"] == pytest.approx(_rdp_epsilon(0.04, 1.5, 2250, 1e-5), rel=1e-9)
    eta = 0.04 * (2250 / 2) ** 0.5 / 1.5
    assert out["eta"] == pytest.approx(eta)
    assert out["epsilon_tan"] == pytest.approx(eta**2 + 2 * eta * (11.512925464970229) ** 0.5)
    assert out["overcharged"] is True and any("privacy wall" in w for w in out["warnings"])


def test_account_calibrates_sigma(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, ["account", "--sample-rate", "0.01", "--epsilon", "2", "--steps", "1000",
                        "--delta", "1e-5", "--json"])
    achieved = _rdp_epsilon(0.01, out["noise_multiplier"], 1000, 1e-5)
    assert achieved <= 2.0 and achieved == pytest.approx(2.0, rel=1e-3)
    # A slightly smaller sigma would overspend: the calibration is tight.
    assert _rdp_epsilon(0.01, out["noise_multiplier"] * 0.99, 1000, 1e-5) > 2.0


def test_plan_is_calibrated_and_labels_the_simulation(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, ["plan", "--dataset-size", "50000", "--epsilon", "8", "--delta", "1e-5", "--steps", "2500",
                        "--reference-batch", "4096", "--json"])
    run = out["private_run"]
    assert run["batch_size"] == 4096
    assert _rdp_epsilon(4096 / 50000, run["noise_multiplier"], 2500, 1e-5) <= 8.0
    sim = out["simulation"]
    assert sim["private"] is False and "not private" in sim["label"]
    assert sim["noise_multiplier"] == pytest.approx(run["noise_multiplier"] * sim["batch_size"] / 4096)


def test_account_refuses_zero_noise(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["account", "--sample-rate", "0.04", "--noise-multiplier", "0", "--steps", "10",
                 "--delta", "1e-5"]) == 2
    assert "noise" in capsys.readouterr().err
