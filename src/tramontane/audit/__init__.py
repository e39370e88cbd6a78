"""Privacy measurement: theoretical bounds that say what an epsilon means, and audits that measure leakage.

Bounds (from a privacy ledger; no torch):
- `bounds`: membership-inference advantage bound = TV of the composed pair (Mahloujifar et al.,
  arXiv 2204.06106), closed forms, Monte Carlo cross-check, naive conversions, confidence bound;
- `reconstruction`: reconstruction-success bounds for M equally likely values (Guo, Sablayrolles and
  Sanjabi, arXiv 2210.13662): pure DP, (epsilon, delta), Renyi-DP via a Bernoulli, classic Fano.
Audits:
- `estimators` (no torch): CANIFE's empirical epsilon from score sets with Clopper-Pearson intervals, and
  its composition over a run;
- `membership` (no torch): loss-threshold and LiRA scores, ROC, exposure of inserted canaries;
- `canife` (torch): canary crafting with a double backward and the replay of DP-SGD steps (Maddock,
  Sablayrolles and Stock, arXiv 2210.02912);
- `exposure` (torch): secret-exposure canaries for language models (Carlini et al., "The secret sharer",
  arXiv 1802.08232): canary formats and records, exact ranks or the skew-normal estimate;
- `synth_audit` (torch): all of it on a fitted `Synthesizer`.
Report: `card.privacy_card` and the plots.

The torch-based modules are not imported here: `from tramontane.audit.canife import ...`.
"""

from tramontane.audit.bounds import (
    MonteCarloEstimate,
    PrivacyProfile,
    advantage_from_epsilon_delta,
    confidence_bound,
    confidence_from_epsilon_delta,
    gaussian_noise_for_epsilon,
    gaussian_tv,
    gdp_mu,
    mi_advantage_bound,
    mi_advantage_gaussian,
    mi_advantage_gdp,
    mi_advantage_monte_carlo,
    mi_advantage_one_step,
    naive_advantage_bounds,
    tradeoff_epsilon_delta,
)
from tramontane.audit.card import bound_curves, plot_bound_curves, plot_roc, privacy_card
from tramontane.audit.estimators import (
    ComposedEstimate,
    EpsilonEstimate,
    clopper_pearson,
    compose_estimates,
    empirical_epsilon,
    epsilon_from_rates,
)
from tramontane.audit.membership import AttackSummary, attack_summary, lira_scores, roc_curve
from tramontane.audit.reconstruction import (
    ReconstructionBound,
    epsilon_delta_bound,
    fano_bound,
    gaussian_simplex_success,
    probability_preservation_bound,
    pure_dp_bound,
    rdp_bound,
    reconstruction_bound,
    reconstruction_bounds,
)

__all__ = [
    "AttackSummary", "ComposedEstimate", "EpsilonEstimate", "MonteCarloEstimate", "PrivacyProfile",
    "ReconstructionBound",
    "advantage_from_epsilon_delta", "attack_summary", "bound_curves", "clopper_pearson", "compose_estimates",
    "confidence_bound", "confidence_from_epsilon_delta", "empirical_epsilon", "epsilon_delta_bound",
    "epsilon_from_rates", "fano_bound", "gaussian_noise_for_epsilon", "gaussian_simplex_success",
    "gaussian_tv", "gdp_mu", "lira_scores", "mi_advantage_bound", "mi_advantage_gaussian", "mi_advantage_gdp",
    "mi_advantage_monte_carlo", "mi_advantage_one_step", "naive_advantage_bounds", "plot_bound_curves",
    "plot_roc", "privacy_card", "probability_preservation_bound", "pure_dp_bound", "rdp_bound",
    "reconstruction_bound", "reconstruction_bounds", "roc_curve", "tradeoff_epsilon_delta",
]
