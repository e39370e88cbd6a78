"""CANIFE for DP-SGD steps: craft a canary, replay noisy steps with and without it, estimate epsilon.

Maddock, Sablayrolles and Stock, "CANIFE: crafting canaries for empirical privacy measurement in federated
learning" (arXiv 2210.02912; facebookresearch/canife `canary_designer.py`, `canary_analyser.py`), moved
from DP-FedAvg's clients to DP-SGD's examples: the unit that is clipped and noised is one training example.

1. Design pool: clipped per-example gradients u_1..u_m of examples the adversary holds
   (`clipped_example_gradients`).
2. Crafting (`craft_canary`), CANIFE's objective with a double backward through the parameter gradient:
       L(x) = D mean_i <C g(x) / ||g(x)||, u_i>^2 + D max(0, c - ||g(x)||)^2,
   g(x) = grad_theta loss(x), D the number of parameters, c the norm constant that makes the canary's
   gradient saturate the clip norm C. The optimisation variable is the input: per-position logits over
   the allowed tokens, fed as soft embeddings of Gumbel-softmax weights (Guo et al. 2021, GBDA), as in
   CANIFE's text variant; the final canary is the argmax, a real example. `orthogonal_direction` is the
   other option: a gradient-space canary (a unit vector orthogonal to the pool), the ideal canary an
   adversary that controls its gradient could insert; it measures the noise mechanism alone.
3. Replay (`replay_dp_steps`, or `replayed_scores` one round at a time; CANIFE's `train_freeze`): with
   the model frozen, `rounds` DP-SGD steps of the real engine (`tramontane.dp.DPEngine.step`, the step
   training takes: Poisson batch at the run's rate, per-example clipping, Gaussian noise), the canary added
   as an extra example on even rounds. The attack score of a step is s = <u_hat, noisy clipped sum> / C
   with u_hat the unit direction of the canary's clipped gradient: an ideal canary adds exactly 1, the
   noise N(0, sigma^2), the other examples what crafting drove to 0.
4. `audit_dp_step`: CANIFE's estimator (`estimators.empirical_epsilon`) on the two score sets, beside the
   one-step theoretical epsilon of the unsampled Gaussian mechanism (the canary is in every "with" step),
   the comparison CANIFE's "2-7x lower" figures make; `estimators.compose_estimates` turns it into an
   empirical epsilon for the whole run.

Randomness of the replay (batches, noise) may be seeded: an audit is a measurement, not a release.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tramontane.audit.estimators import EpsilonEstimate, empirical_epsilon, gaussian_epsilon
from tramontane.dp import CLIP_EPS, DPEngine, Objective, PoissonSampler
from tramontane.errors import PrivacyParameterError, TramontaneWarning

logger = logging.getLogger(__name__)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DP-SGD trains, in `DPEngine`'s order (tied parameters once)."""
    return [p for _, p in model.named_parameters() if p.requires_grad]


def flat_gradient(grads: Sequence[torch.Tensor | None], params: Sequence[nn.Parameter]) -> torch.Tensor:
    """Concatenate per-parameter gradients [D] (None -> zeros)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params)])


def clipped_gradient(model: nn.Module, objective: Objective, batch: Any,
                     max_grad_norm: float) -> torch.Tensor:
    """The clipped gradient [D] of ONE example (all its rows), as `DPEngine` clips it."""
    params = trainable(model)
    loss = objective.losses(model, batch).sum()
    g = flat_gradient(torch.autograd.grad(loss, params, allow_unused=True), params)
    return g * min(1.0, max_grad_norm / (float(g.norm()) + CLIP_EPS))


def clipped_example_gradients(model: nn.Module, objective: Objective, indices: Sequence[int],
                              max_grad_norm: float) -> torch.Tensor:
    """Clipped per-example gradients [m, D] of the design pool (one backward each)."""
    return torch.stack([clipped_gradient(model, objective, objective.rows([i])[0], max_grad_norm)
                        for i in indices])


def orthogonal_direction(pool: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A unit vector [D] orthogonal to every design-pool gradient: a random direction with the pool's span
    projected out (the gradient-space canary)."""
    m, d = pool.shape
    if m >= d:
        raise PrivacyParameterError(f"a design pool of {m} gradients spans all {d} dimensions")
    v = torch.randn(d, generator=generator, dtype=pool.dtype)
    basis, _ = torch.linalg.qr(pool.T)  # D m
    v = v - basis @ (basis.T @ v)
    return v / v.norm()


def soft_sequence_loss(model: nn.Module, length: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """weights [T, V] (a distribution over tokens at each of T positions) -> the next-token loss of that soft
    sequence as `LanguageModelingObjective` computes it for inputs x[:-1] and labels x[1:] (mean over the
    T - 1 predicted tokens): inputs are soft embeddings, targets soft labels. For a model with
    `tok_embeddings` and an `embeddings=` forward argument (`tramontane.models.Transformer`)."""
    if length < 2:
        raise PrivacyParameterError("a canary sequence needs at least 2 tokens")
    tokens = torch.zeros(1, length - 1, dtype=torch.long)

    def loss(weights: torch.Tensor) -> torch.Tensor:
        table = model.get_parameter("tok_embeddings.weight")
        emb = (weights[:-1].to(table.dtype) @ table)[None]  # 1 T-1 dim
        logp = torch.log_softmax(model(tokens, embeddings=emb).float()[0], dim=-1)  # T-1 V
        return -(weights[1:].float() * logp).sum() / (length - 1)

    return loss


@dataclass
class CanaryDesign:
    """The outcome of `craft_canary`."""

    logits: torch.Tensor  # the optimised input logits (masked entries at -inf)
    tokens: torch.Tensor  # the canary: argmax of the logits at each position
    initial_loss: float  # crafting objective of the initial argmax input, on the whole pool
    final_loss: float  # same for the final canary
    grad_norm: float  # ||g|| of the final canary before clipping
    history: list[float] = field(default_factory=list)

    @property
    def health(self) -> float:
        """CANIFE's canary health (L_initial - L_final) / L_initial: 1 = perfect, 0 = no progress."""
        return (self.initial_loss - self.final_loss) / self.initial_loss if self.initial_loss > 0 else 0.0


def _design_loss(soft_loss: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor,
                 params: list[nn.Parameter], pool: torch.Tensor, max_grad_norm: float,
                 norm_constant: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CANIFE's objective, ||g||) at input weights; differentiable w.r.t. the weights (double backward)."""
    loss = soft_loss(weights)
    g = flat_gradient(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True), params)
    norm = g.norm()
    g_hat = max_grad_norm * g / (norm + 1e-12)
    d = g.numel()
    return d * (pool @ g_hat).pow(2).mean() + d * torch.relu(norm_constant - norm).pow(2), norm


def craft_canary(soft_loss: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter],
                 logits: torch.Tensor, pool: torch.Tensor, *, max_grad_norm: float,
                 mask: torch.Tensor | None = None, steps: int = 100, lr: float = 0.1,
                 norm_constant: float | None = None, pool_batch: int | None = None, temperature: float = 1.0,
                 generator: torch.Generator | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> CanaryDesign:
    """Optimise an input canary with CANIFE's objective (see the module docstring).

    Args:
        soft_loss: weights [P, V] (a distribution over tokens at each of P positions) -> the model's loss
            of that soft input; with one-hot weights it must equal the training loss of the hard input.
        params: the model's trainable parameters (the gradient the canary shapes).
        logits: [P, V] initial logits. mask: [P, V] bool, the tokens allowed at each position.
        pool: [m, D] clipped design-pool gradients. pool_batch: minibatch of the pool per step (None: all).
        norm_constant: c in the hinge; default 2 * max_grad_norm.
        on_step: called with (steps done, steps) after each optimisation step (progress display).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel  # the math kernel supports double backward

    if mask is None:
        mask = torch.ones_like(logits, dtype=torch.bool)
    c = 2.0 * max_grad_norm if norm_constant is None else norm_constant
    var = logits.detach().clone().float().masked_fill(~mask, 0.0).requires_grad_(True)
    opt = torch.optim.Adam([var], lr=lr)

    def hard(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = x.masked_fill(~mask, -math.inf).argmax(-1)
        return torch.nn.functional.one_hot(idx, x.shape[-1]).to(x.dtype), idx

    def evaluate(x: torch.Tensor) -> tuple[float, float]:
        value, norm = _design_loss(soft_loss, hard(x)[0], params, pool, max_grad_norm, c)
        return float(value.detach()), float(norm.detach())

    history: list[float] = []
    with sdpa_kernel(SDPBackend.MATH):
        initial, _ = evaluate(var.detach())
        for _ in range(steps):
            u = torch.rand(var.shape, generator=generator).clamp(1e-9, 1 - 1e-9)
            noisy = (var - torch.log(-torch.log(u))) / temperature
            weights = torch.softmax(noisy.masked_fill(~mask, -math.inf), dim=-1)
            batch = pool
            if pool_batch is not None and pool_batch < len(pool):
                batch = pool[torch.randperm(len(pool), generator=generator)[:pool_batch]]
            value, _ = _design_loss(soft_loss, weights, params, batch, max_grad_norm, c)
            (grad,) = torch.autograd.grad(value, [var])
            opt.zero_grad()
            var.grad = grad
            opt.step()
            history.append(float(value.detach()))
            if on_step is not None:
                on_step(len(history), steps)
        final, norm = evaluate(var.detach())
    _, tokens = hard(var.detach())
    logger.info("canary crafted: objective %.4g -> %.4g, gradient norm %.3g", initial, final, norm)
    return CanaryDesign(logits=var.detach().masked_fill(~mask, -math.inf), tokens=tokens,
                        initial_loss=initial, final_loss=final, grad_norm=norm, history=history)


def replayed_scores(model: nn.Module, objective: Objective, num_examples: int, *, sample_rate: float,
                    noise_multiplier: float, max_grad_norm: float, direction: torch.Tensor, rounds: int,
                    canary_rows: Callable[[], tuple[Any, torch.Tensor | None]] | None = None,
                    canary_gradient: torch.Tensor | None = None, micro_batch_size: int = 256,
                    noise_seed: int | None = None,
                    sampling_seed: int | None = None) -> Generator[tuple[bool, float], None, None]:
    """Yield (canary present, score) for each of `rounds` DP-SGD steps of the frozen model, alternating with
    and without the canary (CANIFE's `train_freeze`); see the module docstring and `replay_dp_steps`.

    One round at a time, so that a caller can show progress and keep the rounds done when it is stopped.
    Model parameters are left untouched and `.grad` is cleared when the generator finishes or is closed.
    """
    if (canary_rows is None) == (canary_gradient is None):
        raise PrivacyParameterError("give exactly one of canary_rows and canary_gradient")
    if rounds < 2:
        raise PrivacyParameterError("need at least 2 rounds (one with, one without the canary)")
    params = trainable(model)
    expected = sample_rate * num_examples
    with warnings.catch_warnings():  # seeded noise and sigma = 0 are deliberate here: a measurement
        warnings.simplefilter("ignore", TramontaneWarning)
        engine = DPEngine(model, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                          seed=noise_seed)
        sampler = PoissonSampler(num_examples, sample_rate, steps=rounds, seed=sampling_seed)
    direction = direction.to(torch.float32)
    try:
        for r, indices in enumerate(sampler):
            present = r % 2 == 0
            canary = _lazily(canary_rows) if present and canary_rows is not None else ()
            engine.step(objective, indices, expected_batch_size=expected, micro_batch_size=micro_batch_size,
                        extra_batches=canary)
            noisy_sum = flat_gradient([p.grad for p in params], params) * expected
            if present and canary_gradient is not None:
                noisy_sum = noisy_sum + canary_gradient.to(noisy_sum)
            for p in params:
                p.grad = None
            yield present, float(direction @ noisy_sum) / max_grad_norm
    finally:
        engine.reset()
        for p in params:
            p.grad = None


def _lazily(make: Callable[[], tuple[Any, torch.Tensor | None]]) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """One micro-batch, built only when the step reaches it (after the batch's own rows were drawn)."""
    yield make()


def replay_dp_steps(model: nn.Module, objective: Objective, num_examples: int, *, sample_rate: float,
                    noise_multiplier: float, max_grad_norm: float, direction: torch.Tensor, rounds: int,
                    canary_rows: Callable[[], tuple[Any, torch.Tensor | None]] | None = None,
                    canary_gradient: torch.Tensor | None = None, micro_batch_size: int = 256,
                    noise_seed: int | None = None, sampling_seed: int | None = None,
                    on_round: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores (with canary, without) of `rounds` DP-SGD steps of the frozen model, alternating with and
    without the canary (CANIFE's `train_freeze`); see the module docstring.

    The canary is either `canary_rows()` -> (batch, example ids) of the objective, added to each "with"
    step as one more clipped example, or `canary_gradient` [D], a clipped gradient added to the step's
    clipped sum (what the engine would add for an example with that gradient). `direction` [D] is the
    unit vector u_hat the score projects on. Model parameters are left untouched, `.grad` is cleared.
    """
    with_scores: list[float] = []
    without_scores: list[float] = []
    rounds_iter = replayed_scores(model, objective, num_examples, sample_rate=sample_rate,
                                  noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                  direction=direction, rounds=rounds, canary_rows=canary_rows,
                                  canary_gradient=canary_gradient, micro_batch_size=micro_batch_size,
                                  noise_seed=noise_seed, sampling_seed=sampling_seed)
    with closing(rounds_iter):
        for r, (present, score) in enumerate(rounds_iter):
            (with_scores if present else without_scores).append(score)
            if on_round is not None:
                on_round(r + 1, rounds)
    return np.asarray(with_scores), np.asarray(without_scores)


@dataclass(frozen=True)
class StepAudit:
    """CANIFE's per-step measurement and the one-step theory it is compared with."""

    estimate: EpsilonEstimate
    theoretical_epsilon: float  # one unsampled Gaussian step at `delta`, RDP accountant (as CANIFE)
    theoretical_epsilon_at_estimator_delta: float  # the same at the estimator's delta (like for like)
    delta: float
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    canary: str  # "input" (crafted example) or "gradient" (gradient-space canary)
    scores_with: np.ndarray = field(repr=False)
    scores_without: np.ndarray = field(repr=False)

    @property
    def signal(self) -> float:
        """Mean score shift the canary causes (1 for an ideal canary)."""
        return float(self.scores_with.mean() - self.scores_without.mean())

    @property
    def ratio(self) -> float:
        """theoretical / empirical one-step epsilon (inf when the estimate is 0)."""
        e = self.estimate.epsilon
        return self.theoretical_epsilon / e if e > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | str:
            return x if math.isfinite(x) else "inf"

        return {"estimate": self.estimate.to_dict(), "theoretical_epsilon": num(self.theoretical_epsilon),
                "theoretical_epsilon_at_estimator_delta": num(self.theoretical_epsilon_at_estimator_delta),
                "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "max_grad_norm": self.max_grad_norm, "canary": self.canary,
                "signal": self.signal, "score_std_without": float(self.scores_without.std()),
                "ratio": num(self.ratio),
                "rounds": int(len(self.scores_with) + len(self.scores_without))}


def step_audit(scores_with: np.ndarray, scores_without: np.ndarray, *, noise_multiplier: float,
               sample_rate: float, max_grad_norm: float, delta: float, canary: str,
               estimator_delta: float | None = None, confidence: float = 0.95) -> StepAudit:
    """CANIFE's estimate from replayed scores, beside the one-step Gaussian epsilon (inf when sigma = 0)."""
    est = empirical_epsilon(scores_with, scores_without, estimator_delta, confidence)
    private = noise_multiplier > 0
    theory = gaussian_epsilon(noise_multiplier, delta) if private else math.inf
    theory_hat = gaussian_epsilon(noise_multiplier, est.delta) if private and est.delta > 0 else math.inf
    return StepAudit(estimate=est, theoretical_epsilon=theory,
                     theoretical_epsilon_at_estimator_delta=theory_hat,
                     delta=delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                     max_grad_norm=max_grad_norm, canary=canary, scores_with=np.asarray(scores_with),
                     scores_without=np.asarray(scores_without))
