"""Poisson sampling, tested statistically: batch sizes Binomial(N, q), independent inclusion, empty steps."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tramontane.dp import PoissonSampler, micro_batches
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


def test_arguments_and_micro_batches() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(PrivacyParameterError):
            PoissonSampler(10, bad)
    with pytest.raises(PrivacyParameterError):
        PoissonSampler(0, 0.1)
    assert len(PoissonSampler(10, 0.25)) == 4  # one epoch in expectation
    assert micro_batches([4, 8, 15, 16, 23], 2) == [[4, 8], [15, 16], [23]]
    assert micro_batches([], 3) == []
