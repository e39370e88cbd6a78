"""The privacy report card: a ledger's epsilon beside what it means (MI, confidence, reconstruction bounds)
and, when given, what an audit measured; plus the plots (attack ROC in log scale, bounds over training).

`privacy_card` returns a flat dict of JSON-able scalars (floats, ints, strings) so that reports can show
it as a two-column table. It reads a run's `accounting.PrivacyStatement` (a synthesizer's `statement`) or
a bare ledger at a delta. Keys:

- delta, epsilon_rdp, epsilon_pld: the ledger under both accountants (the statement's, when given);
- mi_advantage_bound: the TV bound of arXiv 2204.06106 (`bounds.mi_advantage_bound`);
- mi_advantage_naive_epsilon_delta, mi_advantage_naive_yeom: the usual conversions of (epsilon_pld,
  delta), never tighter than the bound;
- confidence_bound, confidence_naive (with confidence_prior, confidence_fpr): the largest Pr[member |
  flagged] at that FPR and prior (`bounds.confidence_bound`, a stand-in definition);
- "reconstruction_bound[<column>] (M=<values>)", with a schema: the chance an informed adversary recovers
  a training row's value of that column, uniform prior over its M values, i.e. chance 1/M
  (`reconstruction.reconstruction_bound`);
- audit_*: the audit's method, empirical epsilon (CANIFE's point estimate, biased upwards) with its
  interval (the lower end is the figure to compare with theory), the theoretical epsilon it is compared
  with and their ratios (from `SynthAudit.summary()` or any mapping with those keys).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tramontane import accounting
from tramontane.accounting import (
    DEFAULT_PLD_DISCRETIZATION,
    LEDGER_FORMAT,
    DpSgdEvent,
    LedgerLike,
    PldTooLargeError,
    PrivacyLedger,
    PrivacyStatement,
    check_pld_size,
    pld_self_compose,
)
from tramontane.audit.bounds import (
    PrivacyProfile,
    confidence_from_epsilon_delta,
    gaussian_tv,
    gdp_mu,
    naive_advantage_bounds,
    posterior_from_rates,
)
from tramontane.audit.reconstruction import rdp_bound, reconstruction_bounds
from tramontane.errors import DataError, PrivacyParameterError

CONFIDENCE_PRIOR = 0.5
CONFIDENCE_FPR = 1e-3


def privacy_card(ledger: LedgerLike | PrivacyStatement, delta: float | None = None, schema: Any = None,
                 audit: Any = None, *, prior: float = CONFIDENCE_PRIOR, fpr: float = CONFIDENCE_FPR,
                 pld_discretization: float | None = None) -> dict[str, Any]:
    """The report card of a run's privacy statement, or of a ledger at `delta` (see the module docstring
    for the keys).

    Args:
        ledger: a `PrivacyStatement` (e.g. `Synthesizer.statement`): its ledger at its delta and PLD
            discretisation, its epsilons read as they are; or a `PrivacyLedger`
            (or events), composed here once, at `delta`.
        delta: required with a ledger; with a statement None or the statement's.
        schema: a `Schema` (anything with `.columns` of objects with `.name` and `.n_values`): adds one
            reconstruction bound per column with M = its number of values.
        audit: a `SynthAudit` (its `summary()`) or a mapping with empirical_epsilon, empirical_epsilon_low,
            empirical_epsilon_high and optionally theoretical_epsilon, theoretical_over_empirical, method.
        pld_discretization: of the PLD accountant (default: the statement's, or the ledger's default;
            coarser is faster and looser). With a statement it must be the statement's.

    Raises `accounting.PldTooLargeError` when the ledger's PLD would exceed `accounting.PLD_MAX_POINTS`.
    """
    statement = None
    if isinstance(ledger, PrivacyStatement):
        statement = ledger
        if delta is not None and delta != statement.delta:
            raise PrivacyParameterError(f"delta={delta} is not the privacy statement's delta {statement.delta}: "
                                        "leave delta out, or build the statement at that delta")
        if pld_discretization is not None and pld_discretization != statement.pld_discretization:
            raise PrivacyParameterError(
                f"pld_discretization={pld_discretization} is not the privacy statement's "
                f"{statement.pld_discretization}: leave it out, or build the statement with it")
        ledger, delta, pld_discretization = statement.events, statement.delta, statement.pld_discretization
    elif delta is None:
        raise PrivacyParameterError("privacy_card needs the delta to state a ledger at (or a PrivacyStatement)")
    elif pld_discretization is None:
        pld_discretization = DEFAULT_PLD_DISCRETIZATION
    profile = PrivacyProfile(ledger, pld_discretization=pld_discretization)  # the ledger's PLD, composed once
    events = profile.mechanisms + profile.declared
    eps_rdp, eps_pld = _card_epsilons(profile, delta, statement)
    naive = naive_advantage_bounds(eps_pld, delta)
    grid = np.unique(np.concatenate([profile.epsilon_grid(), [eps_pld]]))
    card: dict[str, Any] = {
        "delta": delta, "epsilon_rdp": eps_rdp, "epsilon_pld": eps_pld,
        "mi_advantage_bound": profile.tv,
        "mi_advantage_naive_epsilon_delta": naive["epsilon_delta"],
        "mi_advantage_naive_yeom": naive["yeom"],
        "confidence_prior": prior, "confidence_fpr": fpr,
        "confidence_bound": float(posterior_from_rates(profile.tpr_bound(fpr, grid), fpr, prior)),
        "confidence_naive": confidence_from_epsilon_delta(eps_pld, delta, fpr, prior),
    }
    if schema is not None:
        sizes = [int(c.n_values) for c in schema.columns]
        per_m = reconstruction_bounds(events, sizes, delta, epsilon=eps_rdp)
        for column in schema.columns:
            m = int(column.n_values)
            card[f"reconstruction_bound[{column.name}] (M={m})"] = per_m[m].bound
    if audit is not None:
        summary = audit.summary() if hasattr(audit, "summary") else dict(audit)
        for key in ("method", "empirical_epsilon", "empirical_epsilon_low", "empirical_epsilon_high",
                    "theoretical_epsilon", "theoretical_over_empirical", "theoretical_over_empirical_low",
                    "per_step_empirical_epsilon",
                    "per_step_theoretical_epsilon", "loss_attack_advantage", "lira_advantage"):
            if key in summary:
                card[f"audit_{key}"] = summary[key]
    return card


def _card_epsilons(profile: PrivacyProfile, delta: float,
                   statement: PrivacyStatement | None) -> tuple[float, float]:
    """(RDP, PLD) epsilon of the ledger: the statement's as they are, else composed here by the accountants'
    rules (the profile's PLD is the pld accountant's, declared steps by basic composition)."""
    if statement is not None:
        return statement.epsilon_rdp, statement.epsilon_pld
    return accounting.epsilon([*profile.mechanisms, *profile.declared], delta, "rdp"), profile.epsilon(delta)


def ledger_bounds(ledger: LedgerLike, delta: float, num_values: int | None = None) -> dict[str, Any]:
    """`privacy_card` of the ledger plus, with `num_values` = M, its reconstruction bounds (keys
    reconstruction_bound = the smallest valid one, reconstruction_bound_rdp,
    reconstruction_bound_epsilon_delta, reconstruction_chance = 1/M) and, for a ledger of Gaussian / DP-SGD
    events, the GDP closed form (exact for Gaussian releases, a CLT approximation for DP-SGD).

    Raises `PldTooLargeError` (a `PrivacyParameterError`) when the ledger's PLD exceeds
    `accounting.PLD_MAX_POINTS`, naming its RDP epsilon: the membership and confidence bounds need the PLD.
    """
    try:
        out = privacy_card(ledger, delta)
    except PldTooLargeError as err:
        eps = accounting.epsilon(ledger, delta, "rdp")
        try:
            mu, _ = gdp_mu(ledger)
            gdp = f"; the GDP approximation puts the membership advantage at {gaussian_tv(mu):.4g}"
        except PrivacyParameterError:
            gdp = ""
        raise PldTooLargeError(
            f"the membership and confidence bounds need this ledger's privacy loss distribution: {err}. "
            f"Its RDP epsilon at delta={delta:g} is {eps:.6g}{gdp}") from None
    try:
        mu, exact = gdp_mu(ledger)
        out["mi_advantage_gdp" if exact else "mi_advantage_gdp_approximation"] = gaussian_tv(mu)
    except PrivacyParameterError:  # declared (epsilon, delta) events have no GDP parameter
        pass
    if num_values is not None:
        rb = reconstruction_bounds(ledger, [num_values], delta, epsilon=out["epsilon_rdp"])[num_values]
        out.update({"num_values": rb.num_values, "reconstruction_bound": rb.bound,
                    "reconstruction_bound_rdp": rb.rdp_bound, "reconstruction_bound_epsilon_delta":
                    rb.epsilon_delta_bound, "reconstruction_chance": rb.prior})
    return out


def read_ledger(path: str | Path) -> tuple[PrivacyLedger, float | None]:
    """(ledger, delta or None) from a JSON file holding a ledger (`PrivacyLedger.to_dict()`, or any object
    with one under "ledger", e.g. a synthesizer's state) or from a saved synthesizer directory."""
    path = Path(path)
    if path.is_dir():
        from tramontane.synth.synthesizer import STATE_FILE

        path = path / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: give a ledger JSON file or a saved synthesizer "
                        "directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a JSON file: {err}") from None
    delta = None
    if isinstance(data, dict) and "ledger" in data and data.get("format") != LEDGER_FORMAT:
        delta = data.get("delta")
        data = data["ledger"]
    return PrivacyLedger.from_dict(data), delta


# -- curves over training ---------------------------------------------------------------------------------

def bound_curves(sample_rate: float, noise_multiplier: float, steps: int, delta: float,
                 num_values: Sequence[int] = (2, 10, 100), points: int = 10,
                 pld_discretization: float = 1e-3) -> dict[str, Any]:
    """MI advantage bound, its naive counterpart, epsilon and reconstruction bounds after s steps of DP-SGD,
    for s on a grid up to `steps`. One step's privacy loss distribution is built once with dp-accounting's
    public `from_gaussian_mechanism` (as its PLD accountant does, pessimistic) and self-composed for each s;
    the discretisation is coarser than the card's: these are for plotting. Refuses (`PldTooLargeError`)
    beyond `accounting.PLD_MAX_POINTS`, as the pld accountant does."""
    from dp_accounting.pld import privacy_loss_distribution

    check_pld_size(DpSgdEvent(sample_rate, noise_multiplier, steps), pld_discretization)
    grid = np.unique(np.linspace(0, steps, points + 1).round().astype(int))[1:]
    out: dict[str, Any] = {"steps": grid.tolist(), "epsilon": [], "mi_advantage_bound": [],
                           "mi_advantage_naive": [], "reconstruction": {str(m): [] for m in num_values}}
    one_step = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=pld_discretization,
        sampling_prob=sample_rate)
    orders, rdp_step = accounting.rdp_curve(DpSgdEvent(sample_rate, noise_multiplier, 1))  # RDP adds up
    for s in grid:
        composed = pld_self_compose(one_step, int(s))
        eps = float(composed.get_epsilon_for_delta(delta))
        out["epsilon"].append(eps)
        out["mi_advantage_bound"].append(min(1.0, float(composed.get_delta_for_epsilon(0.0))))
        out["mi_advantage_naive"].append(naive_advantage_bounds(eps, delta)["epsilon_delta"])
        for m in num_values:
            out["reconstruction"][str(m)].append(rdp_bound(orders, np.asarray(rdp_step) * s, m).bound)
    return out


def plot_bound_curves(curves: Mapping[str, Any], path: str | Path) -> Path:
    """Two panels over training steps: MI advantage (bound vs naive) and reconstruction bounds."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    s = curves["steps"]
    ax1.plot(s, curves["mi_advantage_bound"], marker="o", label="TV bound (PLD)")
    ax1.plot(s, curves["mi_advantage_naive"], marker="x", linestyle="--", label="naive from (epsilon, delta)")
    ax1.set_xlabel("DP-SGD steps")
    ax1.set_ylabel("membership advantage bound")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    for m, values in curves["reconstruction"].items():
        line, = ax2.plot(s, values, marker="o", label=f"M = {m}")
        ax2.axhline(1 / int(m), color=line.get_color(), linestyle=":", linewidth=0.8)
    ax2.set_xlabel("DP-SGD steps")
    ax2.set_ylabel("reconstruction success bound")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8, title="values (dotted: chance)")
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
             bounds: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, title: str = "") -> Path:
    """ROC curves in log-log scale (TPR at low FPR is what matters, Carlini et al. 2022), with the
    diagonal and optionally the largest TPR a mechanism allows at each FPR (`PrivacyProfile.tpr_bound`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.4))
    lo = 1.0
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        keep = (fpr > 0) & (tpr > 0)
        if keep.any():
            ax.plot(fpr[keep], tpr[keep], label=name)
            lo = min(lo, float(fpr[keep].min()))
    lo = max(min(lo, 1e-3), 1e-6)
    grid = np.geomspace(lo, 1, 50)
    ax.plot(grid, grid, color="grey", linestyle=":", label="chance")
    for (name, (fpr, tpr)), style in zip((bounds or {}).items(), ("--", "-.", ":")):
        ax.plot(fpr, tpr, color="black", linestyle=style, label=name)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1.05)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - optional extra
        raise ImportError("plots need matplotlib: pip install 'tramontane[synth]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
