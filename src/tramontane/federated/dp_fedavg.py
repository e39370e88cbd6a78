"""DP-FedAvg with user-level differential privacy: the mechanism, apart from any federated runtime.

McMahan, Ramage, Talwar and Zhang, "Learning differentially private recurrent language models" (ICLR 2018,
arXiv 1710.06963), Algorithm 1 with the fixed denominator. The unit of privacy is a client (all the data of
one user, one hospital, one phone): neighbouring runs differ by one whole client. A round t:

1. Sampling. Each of the N clients of the population joins independently with probability
   q = clients_per_round / N (Poisson sampling), drawn by the server per client with the secure generator
   (`tramontane.dp.PoissonSampler`: fresh OS entropy every round, or a warned seed). The cohort is
   Binomial(N, q) and may be empty; the round still happens. Flower's own strategies do not sample this
   way: `FedAvg.configure_train` takes a fixed number max(int(fraction x connected), min_train_nodes) of
   the connected nodes with `random.sample` (uniform without replacement, Python's Mersenne Twister), and
   Flower's DP wrappers account it with "no-amplification". Fixed-size sampling is a different mechanism
   than the Poisson-subsampled Gaussian the accountants below compute, and its size (counting the nodes
   online) is not secret, so it is not used.
2. Client. Local training from the global model theta_t gives Delta_k = theta_local - theta_t, clipped in
   L2 over all its arrays together: Delta_k min(1, C / ||Delta_k||) (`clipping.clip_update`, McMahan et
   al.'s "flat clipping").
3. Server. S = sum of the cohort's clipped updates is all it needs (secure aggregation can compute it
   without the server seeing any single update: `clipping.sum_clipped_updates` is the one place a sum is
   taken).
   It adds N(0, sigma^2 C^2) to every coordinate once, divides by the EXPECTED cohort size qN (fixed: the
   realised count depends on who took part and would leak it), and sets
   theta_{t+1} = theta_t + server_learning_rate (S + Z) / (qN)   (`DPFedAvgServer.release`).

Privacy. Adding or removing one client changes S by at most C in L2, so a round is the Poisson-subsampled
Gaussian mechanism with sensitivity C and noise multiplier sigma, the event dp-accounting writes
`PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`: the ledger records it as `DpSgdEvent(q, sigma, 1,
label="dp-fedavg")` (clients in place of examples), one event per released round; rounds compose
adaptively. Dividing by qN and the server learning rate are post-processing. A sampled client that does not
reply adds a zero update: the sum and the denominator keep their form, so the guarantee holds (the model
is only noisier). Assumptions the ledger cannot check: the population is fixed for the run; the cohort is
secret from whoever sees the released models; the server adds the noise honestly (central DP: secure
aggregation hides single updates from the server, not the noise-free sum from a server that skips the
noise); every client's data belongs to one unit of privacy.

The Gaussian samples are torch's (see `tramontane.dp.noise` for what that does and does not protect).
This module imports neither torch nor flwr at import time: `DPFedAvgServer` imports torch for the secure
generator when it is built. Clients need only `tramontane.federated.clipping` (numpy).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, PrivacyLedger
from tramontane.accounting.events import check_count, check_delta, check_epsilon, check_sample_rate
from tramontane.errors import ConfigError, PrivacyBudgetError, PrivacyParameterError, TramontaneWarning
from tramontane.federated.clipping import Arrays, check_like

if TYPE_CHECKING:
    from tramontane.dp.noise import SecureRandom

logger = logging.getLogger(__name__)

LEDGER_LABEL = "dp-fedavg"


@dataclass(frozen=True)
class DPFedAvgConfig:
    """DP-FedAvg's privacy and server settings (see the module docstring for the mechanism).

    Args:
        num_clients: N, the population (every client that may be sampled).
        clients_per_round: the expected cohort qN; q = clients_per_round / N.
        noise_multiplier: sigma: the noise on the sum has standard deviation sigma x max_update_norm. 0 makes
            a non-private run (warned; nothing is accounted and its epsilon is infinite).
        max_update_norm: C, the L2 bound on each client's update.
        server_learning_rate: eta_s in theta + eta_s (S + Z) / (qN).
        delta: the delta the run's epsilon is reported at.
        target_epsilon: a budget: a round that would take epsilon above it is refused. None: no budget.
        accountant: "rdp" or "pld" (see `tramontane.accounting`).
        seed: None (secure: fresh OS entropy for sampling and noise) or a fixed seed (reproducible, warned).
    """

    num_clients: int
    clients_per_round: float
    noise_multiplier: float
    max_update_norm: float
    server_learning_rate: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None
    accountant: accounting.Accountant = "rdp"
    seed: int | None = None

    def __post_init__(self) -> None:
        check_count(self.num_clients, "num_clients", minimum=1)
        if not (0 < self.clients_per_round <= self.num_clients):
            raise ConfigError(f"clients_per_round must be in (0, num_clients = {self.num_clients}], got "
                              f"{self.clients_per_round}: it is the expected number of clients in a round")
        check_sample_rate(self.sample_rate)
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyParameterError(f"noise_multiplier must be >= 0 and finite, got "
                                        f"{self.noise_multiplier}")
        if not (self.max_update_norm > 0 and math.isfinite(self.max_update_norm)):
            raise PrivacyParameterError(f"max_update_norm must be positive and finite, got "
                                        f"{self.max_update_norm}")
        if not (self.server_learning_rate > 0 and math.isfinite(self.server_learning_rate)):
            raise ConfigError(f"server_learning_rate must be positive, got {self.server_learning_rate}")
        check_delta(self.delta)
        if self.target_epsilon is not None:
            check_epsilon(self.target_epsilon, "target_epsilon", positive=True)
        if self.accountant not in accounting.ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {list(accounting.ACCOUNTANTS)}, got "
                              f"{self.accountant!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def sample_rate(self) -> float:
        """q: the probability that a client takes part in a round."""
        return self.clients_per_round / self.num_clients

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the sum: sigma C."""
        return self.noise_multiplier * self.max_update_norm

    def round_event(self) -> DpSgdEvent:
        """The privacy event of one round."""
        return DpSgdEvent(self.sample_rate, self.noise_multiplier, 1, label=LEDGER_LABEL)


class DPFedAvgServer:
    """The server's half of DP-FedAvg: Poisson sampling of the cohort, the noisy average of the clipped
    updates, and the privacy ledger with one event per released round.

    Args:
        config: the mechanism's settings.
        ledger: what was spent before (a resumed run); a new ledger by default.
        first_round: rounds already run (a resumed run), so that seeded draws continue the run's sequence.
    """

    def __init__(self, config: DPFedAvgConfig, ledger: PrivacyLedger | None = None,
                 first_round: int = 0) -> None:
        from tramontane.dp.noise import SecureRandom  # torch: the server's side only

        self.config = config
        self.ledger = PrivacyLedger() if ledger is None else ledger
        self.rounds = first_round  # rounds released so far
        if not config.private:
            warnings.warn("noise_multiplier = 0: a NON-PRIVATE federated run; nothing is accounted and its "
                          "epsilon is infinite", TramontaneWarning, stacklevel=2)
        with warnings.catch_warnings():
            # one warning about a fixed seed is enough: the sampler's, below
            warnings.simplefilter("ignore", TramontaneWarning)
            self._noise = SecureRandom(config.seed, "DP-FedAvg noise", first_step=first_round)
            self._replay_noise = SecureRandom(config.seed, "DP-FedAvg replay noise")
        if config.seed is not None:
            warnings.warn(f"DP-FedAvg uses a fixed seed ({config.seed}) for client sampling and noise: it is "
                          "reproducible and NOT secure. Leave the seed unset for a private run.",
                          TramontaneWarning, stacklevel=2)

    # -- budget ----------------------------------------------------------------------------------------

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at `delta` (default: the config's); inf for a non-private run that ran."""
        if not self.config.private:
            return math.inf if self.rounds else 0.0
        if not len(self.ledger):
            return 0.0
        return accounting.epsilon(self.ledger, self.config.delta if delta is None else delta,
                                  self.config.accountant)

    def epsilon_after_next_round(self) -> float:
        if not self.config.private:
            return math.inf
        return accounting.epsilon([*self.ledger.events, self.config.round_event()], self.config.delta,
                                  self.config.accountant)

    def check_budget(self) -> None:
        """Raise `PrivacyBudgetError` if one more round would take epsilon above the target."""
        target = self.config.target_epsilon
        if target is None:
            return
        after = self.epsilon_after_next_round()
        if after > target:
            raise PrivacyBudgetError(
                f"round {self.rounds + 1} would spend epsilon {after:.4g} > target {target:g} at delta "
                f"{self.config.delta:g} (spent so far: {self.epsilon():.4g}); nothing was spent. Raise the "
                "target, the noise multiplier, or lower clients_per_round for more rounds")

    # -- sampling --------------------------------------------------------------------------------------

    def sample_cohort(self, round_index: int | None = None) -> list[int]:
        """Indices in [0, N) of the clients of round `round_index` (0-based; default: the next round), each
        included independently with probability q. Seeded, the draw is a function of (seed, round) alone."""
        from tramontane.dp.sampling import PoissonSampler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TramontaneWarning)  # the seed was warned about once, at init
            sampler = PoissonSampler(self.config.num_clients, self.config.sample_rate, steps=1,
                                     seed=self.config.seed,
                                     first_step=self.rounds if round_index is None else round_index)
        return next(iter(sampler))

    # -- release ---------------------------------------------------------------------------------------

    def noisy_update(self, clipped_sum: Mapping[str, np.ndarray], noise: SecureRandom) -> Arrays:
        """eta_s (S + Z) / (qN), Z ~ N(0, sigma^2 C^2) per coordinate, drawn from `noise` (one step of it)."""
        import torch

        c = self.config
        noise.next_step()
        out: Arrays = {}
        for k, v in clipped_sum.items():
            s = np.asarray(v, dtype=np.float64)
            z = (noise.normal(torch.Size(s.shape), c.noise_std, torch.device("cpu"), torch.float64).numpy()
                 if c.private else np.zeros_like(s))
            out[k] = c.server_learning_rate * (s + z) / c.clients_per_round
        return out

    def release(self, params: Mapping[str, np.ndarray], clipped_sum: Mapping[str, np.ndarray]) -> Arrays:
        """The next global model from the cohort's clipped sum: the round's one release, recorded on the
        ledger. Call `check_budget` before the round starts."""
        check_like(clipped_sum, params, "the clipped sum")
        step = self.noisy_update(clipped_sum, self._noise)
        if self.config.private:
            self.ledger.append(self.config.round_event())
        self.rounds += 1
        logger.info("DP-FedAvg round %d released; epsilon %.4g at delta %g", self.rounds, self.epsilon(),
                    self.config.delta)
        return _apply(params, step)

    def replay(self, params: Mapping[str, np.ndarray], clipped_sum: Mapping[str, np.ndarray]) -> Arrays:
        """What `release` would give with fresh noise, from a separate stream, recording nothing: for audits
        that measure the mechanism (CANIFE), never for a model that is released."""
        check_like(clipped_sum, params, "the clipped sum")
        step = self.noisy_update(clipped_sum, self._replay_noise)
        return _apply(params, step)


def _apply(params: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> Arrays:
    """params + step in float64, cast back to each parameter's dtype."""
    return {k: (np.asarray(v, dtype=np.float64) + step[k]).astype(np.asarray(v).dtype)
            for k, v in params.items()}
