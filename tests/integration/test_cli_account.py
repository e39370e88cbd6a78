"""`tramontane account` and `tramontane plan` print what dp-accounting computes (independent oracle)."""

from __future__ import annotations

import json
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from tramontane.accounting import RDP_ORDERS, plan_constant_tan, tan_report
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


def _printed_tables(out: str) -> list[dict[str, str]]:
    """The key/value rows of each table `main` printed, in order."""
    tables: list[dict[str, str]] = []
    for line in out.splitlines():
        if line.startswith("┌"):
            tables.append({})
        elif line.startswith("│"):
            key, value = (cell.strip() for cell in line.strip("│").split("│"))
            tables[-1][key] = value
    return tables


def _cells(result: dict) -> dict[str, str]:
    return {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in result.items()}


def test_account_prints_the_report_dict(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["account", "--sample-rate", "0.04", "--noise-multiplier", "1.5", "--steps", "2250", "--delta", "1e-5"]
    with pytest.warns(UserWarning):
        report = tan_report(0.04, 1.5, 2250, 1e-5).to_dict()
    assert main(argv) == 0
    assert _printed_tables(capsys.readouterr().out) == [_cells(report)]
    out = _run(capsys, [*argv, "--json"])
    assert out.pop("warnings") and out == report


def test_plan_prints_the_plan_dict(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--dataset-size", "50000", "--epsilon", "8", "--delta", "1e-5", "--steps", "2500",
            "--reference-batch", "4096"]
    plan = plan_constant_tan(50_000, 8.0, 1e-5, 2500, batch_size_ref=4096).to_dict()
    assert main(argv) == 0
    assert _printed_tables(capsys.readouterr().out) == [_cells(plan["private_run"]), _cells(plan["simulation"])]
    out = _run(capsys, [*argv, "--json"])
    assert out.pop("warnings") == [] and out == plan


def test_account_refuses_zero_noise(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["account", "--sample-rate", "0.04", "--noise-multiplier", "0", "--steps", "10",
                 "--delta", "1e-5"]) == 2
    assert "noise" in capsys.readouterr().err


# --- limits: huge compositions, nothing spent, bad numbers ------------------------------------------------


BILLION = "1000000000"


@pytest.mark.parametrize("argv, refused", [
    (["account", "--sample-rate", "0.01", "--steps", BILLION, "--delta", "1e-5", "--noise-multiplier", "1",
      "--accountant", "pld"], True),
    (["bounds", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", BILLION], True),
    # At a noise level that makes a billion steps private (epsilon ~ 8) both answer.
    (["account", "--sample-rate", "0.01", "--steps", BILLION, "--delta", "1e-5", "--noise-multiplier", "211",
      "--accountant", "pld", "--json"], False),
    (["bounds", "--sample-rate", "0.01", "--noise-multiplier", "211", "--steps", BILLION, "--json"], False),
])
def test_a_billion_steps_get_a_prompt_one_line_answer(argv: list[str], refused: bool) -> None:
    # All four ran for minutes or hours (a PLD of ~7e7 points; size**steps as a Python integer). Now the
    # pld accountant squares and refuses above PLD_MAX_POINTS, naming the rdp accountant.
    out = subprocess.run([sys.executable, "-m", "tramontane.cli", *argv], check=False, capture_output=True,
                         text=True, timeout=30)
    assert "Traceback" not in out.stderr
    if refused:
        assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.strip().count("\n") == 0
        assert "--accountant rdp" in out.stderr and "limit of 1e+07" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert 7.5 < result["epsilon_pld" if argv[0] == "bounds" else "epsilon"] < 10.0


@pytest.mark.parametrize("setting", [["--sample-rate", "0", "--steps", "100"],
                                     ["--sample-rate", "0.01", "--steps", "0"]])
def test_nothing_spent_is_not_overcharged(capsys: pytest.CaptureFixture[str], setting: list[str]) -> None:
    argv = ["account", *setting, "--noise-multiplier", "1", "--delta", "1e-5"]
    out = _run(capsys, [*argv, "--json"])
    assert out["epsilon"] == 0.0 and out["overcharged"] is False and out["warnings"] == []
    assert out["epsilon_over_epsilon_tan"] is None  # 0 / 0
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["account", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5", "--epsilon", "inf"], "--epsilon"),
    (["account", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5", "--epsilon", "nan"], "--epsilon"),
    (["account", "--sample-rate", "nan", "--steps", "10", "--delta", "1e-5", "--noise-multiplier", "1"],
     "--sample-rate"),
    (["account", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5", "--noise-multiplier", "inf"],
     "--noise-multiplier"),
    (["account", "--sample-rate", "0.01", "--steps", "-1", "--delta", "1e-5", "--noise-multiplier", "1"], "--steps"),
    (["account", "--sample-rate", "0.01", "--steps", "10", "--delta", "inf", "--noise-multiplier", "1"], "--delta"),
    (["plan", "--dataset-size", "1000", "--epsilon", "inf", "--delta", "1e-5", "--steps", "100"], "--epsilon"),
    (["plan", "--dataset-size", "1000", "--epsilon", "-1", "--delta", "1e-5", "--steps", "100"], "--epsilon"),
    (["plan", "--dataset-size", "1000", "--epsilon", "1", "--delta", "nan", "--steps", "100"], "--delta"),
    (["plan", "--dataset-size", "0", "--epsilon", "1", "--delta", "1e-5", "--steps", "100"], "--dataset-size"),
    (["plan", "--dataset-size", "1000", "--epsilon", "1", "--delta", "1e-5", "--steps", "100",
      "--simulated-batch", "-3"], "--simulated-batch"),
    (["bounds", "--sample-rate", "-0.5", "--noise-multiplier", "1", "--steps", "10"], "--sample-rate"),
    (["bounds", "--sample-rate", "0.01", "--noise-multiplier", "nan", "--steps", "10"], "--noise-multiplier"),
    (["bounds", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10", "--delta", "inf"], "--delta"),
    (["bounds", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10", "--values", "0"], "--values"),
])
def test_bad_numbers_are_refused_naming_the_option(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                   option: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} must"), err
    if "inf" in argv and option == "--epsilon":
        assert "finite" in err


def test_zero_noise_hint_names_the_calibrating_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["account", "--sample-rate", "0.04", "--noise-multiplier", "0", "--steps", "10",
                 "--delta", "1e-5"]) == 2
    err = capsys.readouterr().err
    assert "--noise-multiplier" in err and "tramontane account --epsilon" in err
