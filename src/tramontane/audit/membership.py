"""Membership-inference attacks on trained models, scored the same way as the bounds they are checked against.

Model-agnostic: every attack here takes per-example scores (higher = more likely a member) that the caller
computes with its model, e.g. a synthesizer's per-row log-likelihood (`synth_audit.py`).

- Loss-threshold attack (Yeom, Giacomelli, Fredrikson and Jha 2018): score = -loss of the example under
  the target model; flag members above a threshold.
- Likelihood-ratio attack, LiRA (Carlini, Chien, Nasr, Song, Terzis and Tramer, "Membership inference
  attacks from first principles", arXiv 2112.03570): train shadow models on random halves of a population,
  fit per-example Gaussians to the example's score in shadows that did (IN) and did not (OUT) train on it,
  and score the target model's value by the Gaussian log-likelihood ratio (online) or by how far it sits
  in the OUT distribution's upper tail (offline). With few shadows a global variance (`fix_variance`) is
  more stable, as the paper recommends. `lira_scores` is the scoring; training shadows is the caller's.
- Exposure of inserted canaries (Carlini, Liu, Erlingsson, Kos and Song, "The secret sharer",
  arXiv 1802.08232): exposure = log2 |R| - log2 rank of the canary among |R| candidates (itself included),
  ranked by the model's score; log2 |R| means the model ranks the inserted secret first.
- `attack_summary`: ROC, AUC, best advantage TPR - FPR (to set beside `mi_advantage_bound`), TPR at low
  FPRs (what matters for privacy, Carlini et al.), and the empirical epsilon with Clopper-Pearson interval
  of `estimators.empirical_epsilon`.

Caveat on empirical epsilons from member vs non-member examples: DP bounds what one example's presence
changes; comparing different examples (members vs held-out rows) measures that only if membership was
decided at random for each example. Otherwise (e.g. a fixed train/test split) the number is a heuristic.
Imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from tramontane.audit.estimators import EpsilonEstimate, empirical_epsilon, rates_at_thresholds
from tramontane.errors import PrivacyParameterError

DEFAULT_FPRS = (1e-3, 1e-2, 1e-1)


def roc_curve(members: Sequence[float] | np.ndarray, nonmembers: Sequence[float] | np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, thresholds) of the tests "score >= t" for t from +inf down to the lowest score."""
    thresholds, fp, fn = rates_at_thresholds(np.asarray(members, dtype=float),
                                             np.asarray(nonmembers, dtype=float))
    n_pos, n_neg = len(members), len(nonmembers)
    return fp / n_neg, 1.0 - fn / n_pos, thresholds


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve given by increasing FPR (trapezoids; ties count one half)."""
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR of a test in the curve whose FPR is at most `target`."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


@dataclass(frozen=True)
class AttackSummary:
    """How well one attack separates members from non-members."""

    name: str
    auc: float
    advantage: float  # max over thresholds of TPR - FPR
    tpr_at_fpr: dict[str, float]
    epsilon: EpsilonEstimate
    members: int
    nonmembers: int
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)

    def to_dict(self, curve_points: int = 200) -> dict[str, Any]:
        """JSON-able, with the ROC thinned to about `curve_points` points (log-spaced in FPR)."""
        keep = _thin(self.fpr, curve_points)
        return {"name": self.name, "auc": self.auc, "advantage": self.advantage,
                "tpr_at_fpr": self.tpr_at_fpr, "epsilon": self.epsilon.to_dict(), "members": self.members,
                "nonmembers": self.nonmembers,
                "roc": {"fpr": self.fpr[keep].tolist(), "tpr": self.tpr[keep].tolist()}}


def _thin(fpr: np.ndarray, points: int) -> np.ndarray:
    if len(fpr) <= points:
        return np.arange(len(fpr))
    grid = np.concatenate([[0.0], np.geomspace(max(fpr[fpr > 0].min(initial=1e-6), 1e-6), 1.0, points)])
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, len(fpr) - 1))
    return np.unique(np.concatenate([idx, [len(fpr) - 1]]))


def attack_summary(members: Sequence[float] | np.ndarray, nonmembers: Sequence[float] | np.ndarray,
                   name: str = "attack", delta: float | None = None, confidence: float = 0.95,
                   fprs: Sequence[float] = DEFAULT_FPRS) -> AttackSummary:
    """ROC, AUC, advantage, TPR at `fprs` and empirical epsilon of scores (higher = member)."""
    m, n = np.asarray(members, dtype=float).ravel(), np.asarray(nonmembers, dtype=float).ravel()
    if len(m) == 0 or len(n) == 0:
        raise PrivacyParameterError("an attack needs at least one member and one non-member score")
    fpr, tpr, _ = roc_curve(m, n)
    return AttackSummary(name=name, auc=auc(fpr, tpr), advantage=float((tpr - fpr).max()),
                         tpr_at_fpr={f"{f:g}": tpr_at_fpr(fpr, tpr, f) for f in fprs},
                         epsilon=empirical_epsilon(m, n, delta, confidence), members=len(m),
                         nonmembers=len(n), fpr=fpr, tpr=tpr)


def loss_threshold_scores(losses: Sequence[float] | np.ndarray) -> np.ndarray:
    """Yeom et al.'s attack score: minus the example's loss (e.g. its log-likelihood)."""
    return -np.asarray(losses, dtype=float)


def lira_scores(target: Sequence[float] | np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray, *,
                online: bool = True, fix_variance: bool = True, min_std: float = 1e-6) -> np.ndarray:
    """LiRA membership scores [N] (higher = member) of N examples.

    Args:
        target: [N] each example's score under the target model (for classifiers the logit-scaled
            confidence; for generative models the log-likelihood, already roughly Gaussian).
        shadow: [K, N] the same scores under K shadow models.
        shadow_in: [K, N] bool, whether shadow k trained on example n.
        online: Gaussian log-likelihood ratio IN vs OUT; False: offline, log Pr[OUT score <= target].
            Examples without IN shadows get the offline score.
        fix_variance: one variance per side pooled over examples, instead of per example.
    """
    target = np.asarray(target, dtype=float)
    shadow, shadow_in = np.asarray(shadow, dtype=float), np.asarray(shadow_in, dtype=bool)
    if shadow.shape != shadow_in.shape or shadow.ndim != 2 or shadow.shape[1] != target.shape[0]:
        raise PrivacyParameterError(f"shadow scores {shadow.shape} and membership {shadow_in.shape} must "
                                    f"both be [K, N] with N = {target.shape[0]}")

    def moments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = mask.sum(0)
        mean = np.where(count > 0, (shadow * mask).sum(0) / np.maximum(count, 1), np.nan)
        dev = np.where(mask, shadow - mean, 0.0)
        var = np.where(count > 1, (dev**2).sum(0) / np.maximum(count - 1, 1), np.nan)
        if fix_variance or np.isnan(var).any():
            pooled = np.nansum(dev**2) / max(int((count - 1).clip(min=0).sum()), 1)
            var = np.full_like(mean, pooled) if fix_variance else np.where(np.isnan(var), pooled, var)
        return mean, np.sqrt(np.maximum(var, min_std**2)), count

    mu_out, sd_out, n_out = moments(~shadow_in)
    if (n_out == 0).any():
        raise PrivacyParameterError("every example needs at least one OUT shadow model")
    offline = stats.norm.logcdf((target - mu_out) / sd_out)
    if not online:
        return offline
    mu_in, sd_in, n_in = moments(shadow_in)
    ratio = stats.norm.logpdf(target, mu_in, sd_in) - stats.norm.logpdf(target, mu_out, sd_out)
    return np.where(n_in > 0, ratio, offline)


def exposure(canary_score: float, candidate_scores: Sequence[float] | np.ndarray) -> float:
    """log2 |R| - log2 rank of the canary among R = candidates + canary (rank 1 = highest score; ties
    count against the canary). Candidates exclude the canary itself."""
    cand = np.asarray(candidate_scores, dtype=float).ravel()
    rank = 1 + int((cand >= canary_score).sum())
    return math.log2(len(cand) + 1) - math.log2(rank)
