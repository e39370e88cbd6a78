"""Privacy events and the append-only ledger: validation, merging, JSON round trip, DpEvent composition."""

from __future__ import annotations

import dataclasses
import json
import math

import dp_accounting
import numpy as np
import pytest

from tramontane.accounting import (
    LEDGER_FORMAT,
    LEDGER_VERSION,
    RDP_ORDERS,
    DpSgdEvent,
    EpsilonDeltaEvent,
    GaussianEvent,
    PrivacyLedger,
    epsilon,
)
from tramontane.errors import PrivacyParameterError


def _two_run_ledger() -> PrivacyLedger:
    ledger = PrivacyLedger()
    ledger.append(DpSgdEvent(0.01, 1.1, 1000, label="pretrain"))
    ledger.append(GaussianEvent(20.0, count=3, label="histogram"))
    ledger.append(DpSgdEvent(0.02, 2.0, 500, label="finetune"))
    ledger.append(EpsilonDeltaEvent(0.25, 1e-7, label="schema inference"))
    return ledger


def test_json_round_trip_is_exact_and_stable() -> None:
    ledger = _two_run_ledger()
    text = json.dumps(ledger.to_dict(), sort_keys=True)
    restored = PrivacyLedger.from_dict(json.loads(text))
    assert restored == ledger
    assert json.dumps(restored.to_dict(), sort_keys=True) == text
    data = json.loads(text)
    assert data["format"] == LEDGER_FORMAT and data["version"] == LEDGER_VERSION == 1
    # The stored field names are part of the checkpoint format: renaming one must fail this test.
    assert data["events"][0] == {"type": "dp_sgd", "sample_rate": 0.01, "noise_multiplier": 1.1,
                                 "steps": 1000, "label": "pretrain"}
    assert data["events"][1] == {"type": "gaussian", "noise_multiplier": 20.0, "count": 3,
                                 "label": "histogram"}
    assert data["events"][3] == {"type": "epsilon_delta", "epsilon": 0.25, "delta": 1e-7,
                                 "label": "schema inference"}


def test_json_round_trip_keeps_float_bits() -> None:
    q = 16384 / 1281167  # not representable in a short decimal
    ledger = PrivacyLedger([DpSgdEvent(q, 2.5 / 3, 72000)])
    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored.events[0].sample_rate == q and restored.events[0].noise_multiplier == 2.5 / 3


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=2),
        lambda d: d.update(format="something.else"),
        lambda d: d.update(events="not a list"),
        lambda d: d["events"][0].update(type="laplace"),
        lambda d: d["events"][0].update(extra_field=1),
        lambda d: d["events"][0].update(sample_rate=1.5),
        lambda d: d["events"][0].update(steps=-1),
    ],
)
def test_from_dict_refuses_malformed_ledgers(mutate) -> None:
    data = _two_run_ledger().to_dict()
    mutate(data)
    with pytest.raises(PrivacyParameterError):
        PrivacyLedger.from_dict(data)


def test_ledger_dp_event_is_the_dp_accounting_composition_of_its_runs() -> None:
    ledger = PrivacyLedger([DpSgdEvent(0.01, 1.1, 1000), DpSgdEvent(0.02, 2.0, 500)])
    expected = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 1000),
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(2.0)), 500),
    ])
    assert ledger.to_dp_event() == expected
    oracle = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    oracle.compose(expected)
    assert epsilon(ledger, 1e-5) == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-12)
    # Composition costs more than either run alone, and less than the sum of separate epsilons.
    first, second = epsilon(ledger.events[0], 1e-5), epsilon(ledger.events[1], 1e-5)
    assert max(first, second) < epsilon(ledger, 1e-5) < first + second


def test_epsilon_delta_events_are_unsupported_for_dp_accounting_not_dropped() -> None:
    ledger = _two_run_ledger()
    assert not dp_accounting.rdp.RdpAccountant().supports(ledger.to_dp_event())
    assert not dp_accounting.pld.PLDAccountant().supports(ledger.to_dp_event())


def test_ledger_is_append_only() -> None:
    ledger = _two_run_ledger()
    mutators = ("remove", "pop", "clear", "insert", "extend", "__setitem__", "__delitem__", "sort", "reverse")
    for name in mutators:
        assert not hasattr(ledger, name), name
    with pytest.raises(AttributeError):
        ledger.new_attribute = 1  # type: ignore[attr-defined]
    events = ledger.events
    assert isinstance(events, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].steps = 1  # type: ignore[misc]
    with pytest.raises(PrivacyParameterError):
        ledger.append((0.01, 1.0, 10))  # type: ignore[arg-type]
    assert ledger.events == events  # nothing above changed it


def test_merging_consecutive_identical_dp_sgd_steps_matches_opacus_history() -> None:
    from opacus.accountants import RDPAccountant

    schedule = [(0.01, 1.0)] * 50 + [(0.01, 2.0)] * 30 + [(0.01, 1.0)] * 20
    ledger, opacus_accountant = PrivacyLedger(), RDPAccountant()
    for q, sigma in schedule:
        ledger.append(DpSgdEvent(q, sigma, 1))
        opacus_accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger] == opacus_accountant.history
    assert len(ledger) == 3
    single = PrivacyLedger([DpSgdEvent(0.01, 1.0, 70), DpSgdEvent(0.01, 2.0, 30)])
    assert epsilon(ledger, 1e-5) == pytest.approx(epsilon(single, 1e-5), rel=1e-12)


def test_merge_needs_same_label() -> None:
    ledger = PrivacyLedger([DpSgdEvent(0.01, 1.0, 5, label="a"), DpSgdEvent(0.01, 1.0, 5, label="b")])
    assert [e.steps for e in ledger] == [5, 5]


@pytest.mark.parametrize(
    "make",
    [
        lambda: DpSgdEvent(-0.1, 1.0, 10),
        lambda: DpSgdEvent(1.01, 1.0, 10),
        lambda: DpSgdEvent(math.nan, 1.0, 10),
        lambda: DpSgdEvent(0.1, 0.0, 10),
        lambda: DpSgdEvent(0.1, -1.0, 10),
        lambda: DpSgdEvent(0.1, math.inf, 10),
        lambda: DpSgdEvent(0.1, 1.0, -1),
        lambda: DpSgdEvent(0.1, 1.0, 2.5),  # type: ignore[arg-type]
        lambda: DpSgdEvent(0.1, 1.0, True),
        lambda: GaussianEvent(0.0),
        lambda: GaussianEvent(1.0, count=-2),
        lambda: EpsilonDeltaEvent(-0.1, 1e-6, "x"),
        lambda: EpsilonDeltaEvent(0.1, 1.0, "x"),
        lambda: EpsilonDeltaEvent(0.1, 1e-6, ""),
        lambda: DpSgdEvent("often", 1.0, 10),  # type: ignore[arg-type]
        lambda: GaussianEvent(None),  # type: ignore[arg-type]
    ],
)
def test_events_validate_their_parameters(make) -> None:
    with pytest.raises(PrivacyParameterError):
        make()


def test_zero_noise_error_says_what_to_do() -> None:
    with pytest.raises(PrivacyParameterError, match="positive noise_multiplier"):
        DpSgdEvent(0.1, 0.0, 10)


def test_numpy_integers_are_accepted_as_steps() -> None:
    event = DpSgdEvent(np.float64(0.1), 1.0, np.int64(10))
    assert type(event.steps) is int and type(event.sample_rate) is float
    json.dumps(event.to_dict())
