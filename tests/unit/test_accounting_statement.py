"""`PrivacyStatement`: a ledger composed once at one delta, equal to the accountant functions it calls, and the
one value the synthesizer, the CLI, the release report and the privacy card read."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tramontane import accounting
from tramontane.accounting import (
    DpSgdEvent,
    EpsilonDeltaEvent,
    ExponentialMechanismEvent,
    GaussianEvent,
    PrivacyLedger,
    PrivacyStatement,
)
from tramontane.errors import PrivacyParameterError

DELTA = 1e-5
LEDGERS = {
    "dp-sgd and a count": PrivacyLedger([GaussianEvent(20.0, label="row count"),
                                         DpSgdEvent(0.02, 2.0, 300, "synth dp-sgd")]),
    "with declared events": PrivacyLedger([EpsilonDeltaEvent(0.1, 1e-7, "schema inference: column 'a'"),
                                           GaussianEvent(5.0, 3, "marginals"),
                                           DpSgdEvent(0.05, 2.0, 20, "synth dp-sgd")]),
    "one gaussian": PrivacyLedger([GaussianEvent(1.0)]),
}


@pytest.mark.parametrize("name", list(LEDGERS))
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilons_are_the_accountants(name: str, accountant: str) -> None:
    ledger = LEDGERS[name]
    st = PrivacyStatement.of(ledger, DELTA, accountant)
    # exactly what the accountant functions give, each under its own name
    assert st.epsilon_rdp == accounting.epsilon(ledger, DELTA, "rdp")
    assert st.epsilon_pld == accounting.epsilon(ledger, DELTA, "pld")
    assert st.epsilon_pld < st.epsilon_rdp  # PLD is the tighter of the two on these ledgers
    assert st.epsilon == (st.epsilon_rdp if accountant == "rdp" else st.epsilon_pld)
    assert (st.delta, st.accountant, st.events) == (DELTA, accountant, ledger.events)
    assert st.target_epsilon is None and st.eta is None and st.epsilon_tan is None


def test_pld_discretization_is_the_one_stated() -> None:
    ledger = LEDGERS["dp-sgd and a count"]
    coarse = PrivacyStatement.of(ledger, DELTA, "pld", pld_discretization=1e-3)
    assert coarse.pld_discretization == 1e-3
    assert coarse.epsilon_pld == accounting.epsilon(ledger, DELTA, "pld", pld_discretization=1e-3)
    assert coarse.epsilon_pld != PrivacyStatement.of(ledger, DELTA, "pld").epsilon_pld


def test_an_empty_ledger_spends_nothing() -> None:
    st = PrivacyStatement.of(PrivacyLedger(), DELTA)
    assert (st.epsilon_rdp, st.epsilon_pld, st.events, st.accountant) == (0.0, 0.0, (), "rdp")


def test_tan_figures_of_the_dp_sgd_setting() -> None:
    q, sigma, steps = 0.02, 2.0, 300
    st = PrivacyStatement.of(LEDGERS["dp-sgd and a count"], DELTA, target_epsilon=3.0,
                             dp_sgd=DpSgdEvent(q, sigma, steps, "any label"))
    assert st.eta == accounting.eta(q, sigma, steps) == pytest.approx(q * math.sqrt(steps / 2) / sigma)
    assert st.total_amount_of_noise == accounting.total_amount_of_noise(q, sigma, steps) == pytest.approx(1 / st.eta)
    assert st.epsilon_tan == accounting.eps_tan(st.eta, DELTA)
    assert st.target_epsilon == 3.0


def test_to_dict_is_the_release_reports_privacy_section() -> None:
    from tramontane.report.release import RELEASE_FIELDS

    ledger = LEDGERS["with declared events"]
    st = PrivacyStatement.of(ledger, DELTA, "pld", target_epsilon=2.0)
    out = st.to_dict()
    # every key the report writes under "privacy", in its order, and nothing else
    section = [f.path.removeprefix("privacy.") for f in RELEASE_FIELDS
               if f.path.startswith("privacy.") and f.path.count(".") == 1]
    assert list(out) == section == ["target_epsilon", "delta", "accountant", "epsilon_rdp", "epsilon_pld", "ledger"]
    for key in section[:-1]:  # the attributes the CLI prints are the same figures
        assert out[key] == getattr(st, key)
    assert out["ledger"] == ledger.to_dict()
    assert PrivacyLedger.from_dict(out["ledger"]) == ledger


def test_a_snapshot_of_the_ledger() -> None:
    ledger = PrivacyLedger([GaussianEvent(20.0, label="row count")])
    st = PrivacyStatement.of(ledger, DELTA)
    ledger.append(DpSgdEvent(0.01, 1.0, 10))
    assert st.events != ledger.events and len(st.to_dict()["ledger"]["events"]) == 1
    # events stored unmerged (as `PrivacyLedger.from_dict` keeps them) stay unmerged
    split = PrivacyLedger.from_dict({**ledger.to_dict(), "events": [DpSgdEvent(0.05, 2.0, 5).to_dict()] * 2})
    assert PrivacyStatement.of(split, DELTA).ledger_dict() == split.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.epsilon_rdp = 0.0  # type: ignore[misc]


def test_bad_inputs_are_refused() -> None:
    ledger = LEDGERS["with declared events"]
    with pytest.raises(PrivacyParameterError, match="accountant"):
        PrivacyStatement.of(ledger, DELTA, "gdp")  # type: ignore[arg-type]
    with pytest.raises(PrivacyParameterError, match="declared"):
        PrivacyStatement.of(ledger, 1e-7)  # no more than the declared events' delta
    with pytest.raises(PrivacyParameterError, match="delta"):
        PrivacyStatement.of(ledger, 1.5)


def test_the_card_reads_the_statement() -> None:
    from tramontane.audit.card import privacy_card

    ledger = PrivacyLedger([EpsilonDeltaEvent(0.1, 1e-7, "schema inference"), GaussianEvent(2.0, 2, "count")])
    st = PrivacyStatement.of(ledger, DELTA, "rdp")
    from_statement, from_ledger = privacy_card(st), privacy_card(ledger, DELTA)
    assert from_statement == from_ledger  # bit for bit: the same accountants, the same PLD, the same delta
    assert (from_statement["epsilon_rdp"], from_statement["epsilon_pld"]) == (st.epsilon_rdp, st.epsilon_pld)
    with pytest.raises(PrivacyParameterError, match="delta"):
        privacy_card(st, 1e-6)
    with pytest.raises(PrivacyParameterError, match="pld_discretization"):
        privacy_card(st, pld_discretization=1e-3)
    with pytest.raises(PrivacyParameterError, match="delta"):
        privacy_card(ledger)


def test_the_card_states_exponential_mechanism_selections_as_the_accountants_do() -> None:
    from tramontane.audit.bounds import PrivacyProfile
    from tramontane.audit.card import privacy_card

    ledger = PrivacyLedger([GaussianEvent(2.0, 2, "count"), ExponentialMechanismEvent(0.05, 4, "selection")])
    st = PrivacyStatement.of(ledger, DELTA, "rdp")
    card = privacy_card(st)
    assert card == privacy_card(ledger, DELTA)
    assert (card["epsilon_rdp"], card["epsilon_pld"]) == (st.epsilon_rdp, st.epsilon_pld)
    # the card's PLD (its TV bound) composes each selection as the randomized-response pair, as the pld
    # accountant does: tighter than counting the four as one pure 0.2-DP step
    profile = PrivacyProfile(ledger)
    assert profile.epsilon(DELTA) == pytest.approx(st.epsilon_pld, rel=1e-9)
    loose = PrivacyProfile([GaussianEvent(2.0, 2, "count"), accounting.EpsilonDeltaEvent(0.2, 0.0, "selection")])
    assert profile.tv < loose.tv and profile.epsilon(DELTA) < loose.epsilon(DELTA)


def test_the_synthesizer_states_its_ledger() -> None:
    from tramontane.synth.synthesizer import Synthesizer

    synth = Synthesizer(epsilon=2.0, delta=DELTA)
    assert synth.privacy() == PrivacyStatement.of(PrivacyLedger(), DELTA, target_epsilon=2.0,
                                                    accountant=synth.config.accountant).to_dict()
    first = synth.statement
    assert synth.statement is first  # computed once for a ledger
    synth.ledger.append(GaussianEvent(20.0, label="row count"))  # a spend: stated again
    assert synth.statement.epsilon_rdp == accounting.epsilon(synth.ledger, DELTA, "rdp") > 0
    assert synth.privacy()["ledger"] == synth.ledger.to_dict()
