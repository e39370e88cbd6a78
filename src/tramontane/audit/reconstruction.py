"""Reconstruction bounds: how likely an adversary is to recover a private value from M candidates.

Guo, Sablayrolles and Sanjabi, "Analyzing privacy leakage in machine learning via multiple hypothesis
testing: a lesson from Fano" (arXiv 2210.13662). Setting (the informed adversary): the target's private
value Z is uniform over M candidates z_1..z_M, the adversary knows everything else about the training set,
sees the output h ~ M(D + {Z}) and guesses Z_hat(h); success p = Pr[Z_hat = Z], chance 1/M.
The theorem statements were not checked against the paper body; the bounds below are the standard Fano
variants derived in the project notes, each proved in its docstring's one-line argument:

- pure DP (`pure_dp_bound`): e^eps / (e^eps + M - 1) for eps-DP under replace-one neighbours (the
  posterior odds of two candidates move by at most e^eps; tight for M-ary randomized response). Under
  add-or-remove eps-DP, min(e^eps / M, 1 - e^-eps (1 - 1/M)) (hockey-stick data processing against the
  run without the target, both directions; tight);
- (epsilon, delta) (`epsilon_delta_bound`): min(e^eps / M + delta, 1 - e^-eps (1 - 1/M - delta)), the same
  argument with delta, add-or-remove;
- Renyi DP (`rdp_bound`): under Q = M(D) (the run without the target) the guess is independent of Z, so
  succeeds with probability 1/M; Renyi data processing on the indicator {Z_hat = Z} then gives
  D_alpha(Bern(p) || Bern(1/M)) <= D_alpha(P_{Z,h} || P_Z x Q) <= max_i D_alpha(M(D + z_i) || M(D)) =
  rdp(alpha), the add-or-remove RDP curve DP-SGD accountants report. We solve for the largest p at every
  order and take the minimum over orders. Never looser than classic Fano, p <= (I + log 2) / log M with
  I <= rdp(alpha), nor than RDP probability preservation, p <= (e^rdp(alpha) / M)^((alpha - 1) / alpha);
  both are here for comparison (`fano_bound`, `probability_preservation_bound`).
- DP-SGD ledgers (`reconstruction_bound`): the ledger's RDP curve (dp-accounting, Mironov et al. 2019)
  fed to `rdp_bound`, and the (epsilon, delta) bound beside it; the reported bound is the smaller.
  Declared pure (epsilon, 0) events add epsilon to every order (pure DP implies (alpha, eps)-RDP, and RDP
  composes adaptively); declared events with delta > 0 have no RDP curve, so only the (epsilon, delta)
  bound of the whole ledger applies then.

`gaussian_simplex_success` is the exact MAP success against the Gaussian mechanism with orthogonal
candidates (h = e_Z + N(0, sigma^2 I_M)), to see how loose the bounds are (Guo et al.'s Fig. 1 setting).

Assumptions: the prior over the M candidates is uniform and the candidate set is fixed before training;
add-or-remove neighbours unless said otherwise; the ledger is truthful. Imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tramontane import accounting
from tramontane.accounting import LedgerLike
from tramontane.accounting.events import check_delta, check_epsilon
from tramontane.audit.bounds import split_events
from tramontane.errors import PrivacyParameterError


def _check_values(num_values: int) -> int:
    if isinstance(num_values, bool) or not isinstance(num_values, (int, np.integer)) or num_values < 1:
        raise PrivacyParameterError(f"the number of candidate values M must be a positive integer, got "
                                    f"{num_values!r}")
    return int(num_values)


def pure_dp_bound(epsilon: float, num_values: int, neighbouring: str = "replace") -> float:
    """Success bound of an eps-DP mechanism, uniform prior over M values (see the module docstring).

    `neighbouring="replace"`: e^eps / (e^eps + M - 1); "add_remove": min(e^eps / M, 1 - e^-eps (1 - 1/M)).
    """
    eps, m = check_epsilon(epsilon), _check_values(num_values)
    if neighbouring == "replace":
        return 1.0 / (1.0 + (m - 1) * math.exp(-eps))
    if neighbouring == "add_remove":
        return epsilon_delta_bound(eps, 0.0, m)
    raise PrivacyParameterError(f"neighbouring must be 'replace' or 'add_remove', got {neighbouring!r}")


def epsilon_delta_bound(epsilon: float, delta: float, num_values: int) -> float:
    """min(1, e^eps / M + delta, 1 - e^-eps (1 - 1/M - delta)) for (eps, delta)-DP, add-or-remove.

    Against Q = M(D): P_z(Z_hat = z) <= e^eps Q(Z_hat = z) + delta, averaged over z; and
    Q(Z_hat != z) <= e^eps P_z(Z_hat != z) + delta for the complement."""
    eps, m = check_epsilon(epsilon), _check_values(num_values)
    if not 0.0 <= delta < 1.0:
        raise PrivacyParameterError(f"delta must be in [0, 1), got {delta}")
    direct = math.exp(eps) / m + delta if eps < 700 else math.inf
    complement = 1.0 - math.exp(-eps) * (1.0 - 1.0 / m - delta)
    return float(min(1.0, direct, complement))


def bernoulli_renyi(p: np.ndarray | float, r: float, alpha: np.ndarray | float) -> np.ndarray:
    """D_alpha(Bern(p) || Bern(r)) for alpha > 1, in log space (no overflow at large alpha and M):
    log(p^a r^(1-a) + (1-p)^a (1-r)^(1-a)) / (a - 1)."""
    p, alpha = np.asarray(p, dtype=float), np.asarray(alpha, dtype=float)
    with np.errstate(divide="ignore"):
        a = alpha * np.log(p) + (1 - alpha) * math.log(r)
        b = alpha * np.log1p(-p) + (1 - alpha) * math.log1p(-r)
    return np.logaddexp(a, b) / (alpha - 1)


def rdp_bound_per_order(orders: np.ndarray, rdp: np.ndarray, num_values: int,
                        iterations: int = 80) -> np.ndarray:
    """For each order alpha, the largest p in [1/M, 1] with D_alpha(Bern(p) || Bern(1/M)) <= rdp(alpha).

    D_alpha(Bern(p) || Bern(1/M)) increases from 0 at p = 1/M to log M at p = 1, so bisection; the
    upper end of the final bracket is returned (never below the exact root). Orders <= 1 give 1."""
    m = _check_values(num_values)
    orders, rdp = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    r = 1.0 / m
    if m == 1:
        return np.ones_like(orders)
    lo, hi = np.full(orders.shape, r), np.ones(orders.shape)
    valid = orders > 1
    safe_orders = np.where(valid, orders, 2.0)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ok = bernoulli_renyi(mid, r, safe_orders) <= rdp
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    out = np.where(rdp >= math.log(m), 1.0, hi)
    return np.where(valid, out, 1.0)


@dataclass(frozen=True)
class RdpReconstructionBound:
    """The RDP (Bernoulli) reconstruction bound and the order attaining it."""

    bound: float
    order: float | None


def rdp_bound(orders: np.ndarray, rdp: np.ndarray, num_values: int) -> RdpReconstructionBound:
    """min over orders of `rdp_bound_per_order` (arXiv 2210.13662 via Renyi data processing)."""
    per_order = rdp_bound_per_order(orders, rdp, num_values)
    if per_order.size == 0:
        return RdpReconstructionBound(1.0, None)
    i = int(np.argmin(per_order))
    return RdpReconstructionBound(float(per_order[i]), float(np.asarray(orders)[i]))


def probability_preservation_bound(orders: np.ndarray, rdp: np.ndarray, num_values: int) -> float:
    """min over orders alpha > 1 of (e^rdp(alpha) / M)^((alpha - 1) / alpha), capped at 1 (the RDP
    probability-preservation bound; `rdp_bound` drops no term of it and is never looser)."""
    m = _check_values(num_values)
    orders, rdp = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    keep = orders > 1
    if not keep.any():
        return 1.0
    log_p = (rdp[keep] - math.log(m)) * (orders[keep] - 1) / orders[keep]
    return float(min(1.0, math.exp(min(0.0, float(log_p.min())))))


def fano_bound(mutual_information: float, num_values: int) -> float:
    """Classic Fano: p <= (I(Z; h) + log 2) / log M (nats), capped at 1; vacuous for M <= 2."""
    m = _check_values(num_values)
    if m <= 2:
        return 1.0
    return float(min(1.0, (mutual_information + math.log(2)) / math.log(m)))


def gaussian_simplex_success(noise_multiplier: float, num_values: int, points: int = 4001) -> float:
    """Exact MAP success against h = e_Z + N(0, sigma^2 I_M), Z uniform over M: the integral of
    phi(t) Phi(t + 1/sigma)^(M - 1) dt (the true coordinate must come out largest)."""
    from scipy import stats

    m = _check_values(num_values)
    t = np.linspace(-12.0, 12.0 + 1.0 / noise_multiplier, points)
    integrand = stats.norm.pdf(t) * np.exp((m - 1) * stats.norm.logcdf(t + 1.0 / noise_multiplier))
    return float(np.trapezoid(integrand, t))


@dataclass(frozen=True)
class ReconstructionBound:
    """Reconstruction-success bounds of a ledger for a uniform prior over `num_values` candidates."""

    num_values: int
    bound: float  # the smallest valid bound below
    rdp_bound: float | None  # Bernoulli-RDP bound; None when declared (eps, delta > 0) events prevent it
    rdp_order: float | None
    epsilon_delta_bound: float | None  # from the ledger's epsilon at `delta`; None without a delta
    epsilon: float | None
    delta: float | None
    fano_bound: float | None  # classic Fano with I <= rdp at the smallest order (for comparison)
    probability_preservation_bound: float | None

    @property
    def prior(self) -> float:
        return 1.0 / self.num_values

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prior": self.prior}


def reconstruction_bounds(events: LedgerLike, num_values: Sequence[int], delta: float | None = None,
                          accountant: accounting.Accountant = "rdp",
                          epsilon: float | None = None) -> dict[int, ReconstructionBound]:
    """`reconstruction_bound` for several M at once (the ledger's RDP curve and epsilon computed once).
    `epsilon`: the ledger's epsilon at `delta` when the caller already has it."""
    ms = sorted({_check_values(m) for m in num_values})
    mechanisms, declared = split_events(events)
    curve = None
    if all(e.delta == 0.0 for e in declared):
        if mechanisms:
            orders, rdp = accounting.rdp_curve(mechanisms)
            orders, rdp = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
        else:
            orders = np.asarray(accounting.RDP_ORDERS, dtype=float)
            rdp = np.zeros_like(orders)
        curve = (orders, rdp + sum(e.epsilon for e in declared))
    if delta is not None:
        delta = check_delta(delta)
        if epsilon is None:
            epsilon = accounting.epsilon([*mechanisms, *declared], delta, accountant)
    elif curve is None:
        raise PrivacyParameterError("the ledger holds (epsilon, delta) events with delta > 0, which have "
                                    "no RDP curve: give a delta to bound reconstruction through "
                                    "(epsilon, delta)")
    out = {}
    for m in ms:
        rdp_b = order = fano = pp = ed = None
        if curve is not None:
            orders, rdp = curve
            result = rdp_bound(orders, rdp, m)
            rdp_b, order = result.bound, result.order
            fano = fano_bound(float(rdp[np.argmin(orders)]), m)
            pp = probability_preservation_bound(orders, rdp, m)
        if delta is not None:
            assert epsilon is not None  # computed above whenever delta is given
            ed = epsilon_delta_bound(epsilon, delta, m)
        out[m] = ReconstructionBound(num_values=m, bound=min(b for b in (rdp_b, ed) if b is not None),
                                     rdp_bound=rdp_b, rdp_order=order, epsilon_delta_bound=ed,
                                     epsilon=epsilon if delta is not None else None, delta=delta,
                                     fano_bound=fano, probability_preservation_bound=pp)
    return out


def reconstruction_bound(events: LedgerLike, num_values: int, delta: float | None = None,
                         accountant: accounting.Accountant = "rdp") -> ReconstructionBound:
    """Bounds on an informed adversary's success in recovering one of `num_values` equally likely values
    of a training example from the ledger's release (see the module docstring; arXiv 2210.13662).

    With `delta`, the (epsilon, delta) bound at the ledger's epsilon (from `accountant`) joins the RDP one
    and `bound` is the smaller of the two.
    """
    m = _check_values(num_values)
    return reconstruction_bounds(events, [m], delta, accountant)[m]
