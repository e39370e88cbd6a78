"""The exponential-mechanism event: its rdp curve is the zCDP closed form, its pld the optimal composition of
pure epsilon-DP (Kairouz, Oh and Viswanath 2015), and it survives the ledger's JSON form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tramontane import accounting
from tramontane.accounting import ExponentialMechanismEvent, GaussianEvent, PrivacyLedger
from tramontane.audit.bounds import split_events
from tramontane.errors import PrivacyParameterError


def test_rdp_is_the_zcdp_closed_form() -> None:
    event = ExponentialMechanismEvent(0.3, count=7, label="selection")
    orders, rdp = accounting.rdp_curve(event)
    np.testing.assert_allclose(rdp, np.asarray(orders) * 7 * 0.3**2 / 8, rtol=1e-12)


def _composed_pure_dp_delta(epsilon: float, count: int, target: float) -> float:
    """delta at `target` of `count` compositions of the randomized-response pair at `epsilon`: under P the
    privacy loss is (count - 2 i) epsilon with i ~ Binomial(count, 1 / (1 + e^epsilon))."""
    minority = 1.0 / (1.0 + math.exp(epsilon))
    i = np.arange(count + 1)
    loss = (count - 2 * i) * epsilon
    return float((stats.binom.pmf(i, count, minority) * np.clip(1 - np.exp(target - loss), 0, None)).sum())


@pytest.mark.parametrize("epsilon,count,target", [(0.3, 10, 1.0), (0.05, 40, 0.4), (1.0, 1, 0.5)])
def test_pld_is_the_optimal_composition_of_pure_dp(epsilon: float, count: int, target: float) -> None:
    event = ExponentialMechanismEvent(epsilon, count=count)
    exact = _composed_pure_dp_delta(epsilon, count, target)
    got = accounting.delta(event, target, "pld")
    assert exact > 1e-4
    assert exact * (1 - 1e-12) <= got <= exact * 1.01 + 1e-6  # pessimistic discretisation, tight


def test_rdp_is_tighter_than_pure_dp_composition_for_many_small_selections() -> None:
    event = ExponentialMechanismEvent(0.01, count=400)
    rdp, pld = accounting.epsilon(event, 1e-5, "rdp"), accounting.epsilon(event, 1e-5, "pld")
    rho = 400 * 0.01**2 / 8
    assert rdp <= rho + 2 * math.sqrt(rho * math.log(1e5))  # the zCDP conversion bound
    assert rdp < pld < 400 * 0.01  # both below basic composition


def test_composes_with_gaussian_events_and_survives_json() -> None:
    ledger = PrivacyLedger([GaussianEvent(40.0, 30, label="marginals"),
                            ExponentialMechanismEvent(0.02, count=20, label="marginal selection")])
    again = PrivacyLedger.from_dict(ledger.to_dict())
    assert again == ledger
    rho = 30 / (2 * 40.0**2) + 20 * 0.02**2 / 8
    orders, rdp = accounting.rdp_curve(again)
    np.testing.assert_allclose(rdp, np.asarray(orders) * rho, rtol=1e-9)
    assert accounting.pld_points(again) > 0


def test_bounds_take_a_selection_as_pure_dp() -> None:
    mechanisms, declared = split_events([GaussianEvent(3.0), ExponentialMechanismEvent(0.1, count=5)])
    assert mechanisms == [GaussianEvent(3.0)]
    assert [(d.epsilon, d.delta) for d in declared] == [(pytest.approx(0.5), 0.0)]


def test_a_selection_validates_its_parameters() -> None:
    with pytest.raises(PrivacyParameterError, match="epsilon"):
        ExponentialMechanismEvent(-1.0)
    assert ExponentialMechanismEvent(0.0, count=3).spends_nothing
