"""Poisson sampling, tested statistically: batch sizes Binomial(N, q), independent inclusion, empty steps."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from tramontane.dp import DPEngine, PoissonSampler, micro_batches
from tramontane.dp.noise import derive_seed
from tramontane.errors import PrivacyParameterError, TramontaneWarning

Z = 6.0


def _sizes(sampler: PoissonSampler) -> torch.Tensor:
    return torch.tensor([len(batch) for batch in sampler], dtype=torch.float64)


def test_batch_sizes_are_binomial() -> None:
    n, q, steps = 1000, 0.05, 2000
    with pytest.warns(TramontaneWarning, match="NOT secure"):
        sampler = PoissonSampler(n, q, steps=steps, seed=1)
    assert len(sampler) == steps and sampler.expected_batch_size == pytest.approx(50.0)
    sizes = _sizes(sampler)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < Z * math.sqrt(var / steps)
    # Sample variance of a binomial: sd ~ sqrt((mu4 - var^2 (steps-3)/(steps-1)) / steps), mu4 ~ 3 var^2.
    sd_var = math.sqrt(2 * var**2 / steps + var * (1 - 6 * q * (1 - q)) / steps)
    assert abs(sizes.var().item() - var) < Z * sd_var  # a fixed batch size (variance 0) fails


def test_inclusion_is_independent_per_example() -> None:
    """Every index included with probability q (not, e.g., only a prefix), and batches without repeats."""
    n, q, steps = 200, 0.1, 600
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        sampler = PoissonSampler(n, q, steps=steps, seed=2)
    counts = torch.zeros(n)
    for batch in sampler:
        assert len(set(batch)) == len(batch) and all(0 <= i < n for i in batch)
        counts[batch] += 1
    expected, sd = steps * q, math.sqrt(steps * q * (1 - q))
    assert ((counts - expected).abs() < Z * sd).all()
    # Spread across indices is binomial, not degenerate: chi-square statistic ~ N(n, 2n).
    chi2 = (((counts - expected) / sd) ** 2).sum().item()
    assert abs(chi2 - n) < Z * math.sqrt(2 * n)


def test_empty_batches_are_yielded_not_skipped() -> None:
    n, q, steps = 1000, 0.001, 600  # P(empty) = 0.999^1000 = 0.368
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without a seed
        sizes = _sizes(PoissonSampler(n, q, steps=steps))
    assert len(sizes) == steps
    p_empty = (1 - q) ** n
    empties = (sizes == 0).sum().item()
    assert abs(empties - steps * p_empty) < Z * math.sqrt(steps * p_empty * (1 - p_empty))


def test_unseeded_sampling_differs_and_seeded_reproduces() -> None:
    assert list(PoissonSampler(500, 0.2, steps=3)) != list(PoissonSampler(500, 0.2, steps=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        first, second = PoissonSampler(500, 0.2, steps=3, seed=5), PoissonSampler(500, 0.2, steps=3, seed=5)
        assert list(first) == list(second)


def test_seeded_batches_are_independent_of_noise_from_the_same_seed() -> None:
    """A sampler and an engine given one seed: which examples join a batch must not predict the noise
    (were both one stream, the noise would be a function of the very uniforms that drew the batch)."""
    n = 4096
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        (batch,) = list(PoissonSampler(n, 0.5, steps=1, seed=9))
        model = nn.Linear(64, 64)  # weight: 4096 coordinates
        DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, seed=9).add_noise_and_set_grads(1.0)
    included = torch.zeros(n, dtype=torch.float64)
    included[batch] = 1.0
    noise = model.weight.grad.flatten().double()
    for stat in (noise, noise.abs()):
        corr = torch.corrcoef(torch.stack([included, stat]))[0, 1].item()
        assert abs(corr) < Z / math.sqrt(n), corr
    assert len({derive_seed(9, label) for label in ("Poisson sampling", "DP-SGD noise", 0, "0")}) == 4
    assert all(0 <= derive_seed(seed, "x") < 2**63 for seed in (0, -1, 2**70))


def test_first_step_continues_the_seeded_sequence() -> None:
    """A resumed sampler (first_step=k) draws the uninterrupted sampler's batches k, k+1, ...; unseeded,
    first_step changes nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        whole = list(PoissonSampler(500, 0.2, steps=5, seed=5))
        resumed = list(PoissonSampler(500, 0.2, steps=3, seed=5, first_step=2))
    assert resumed == whole[2:]
    assert resumed[0] != whole[0]
    assert list(PoissonSampler(500, 0.2, steps=2, first_step=2)) != list(PoissonSampler(500, 0.2, steps=2))


def test_arguments_and_micro_batches() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(PrivacyParameterError):
            PoissonSampler(10, bad)
    with pytest.raises(PrivacyParameterError):
        PoissonSampler(0, 0.1)
    for bad_step in (-1, 1.5):
        with pytest.raises(PrivacyParameterError, match="first_step"):
            PoissonSampler(10, 0.1, first_step=bad_step)
    assert len(PoissonSampler(10, 0.25)) == 4  # one epoch in expectation
    assert micro_batches([4, 8, 15, 16, 23], 2) == [[4, 8], [15, 16], [23]]
    assert micro_batches([], 3) == []
