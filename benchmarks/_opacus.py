"""Opacus wrapping a model for the benchmarks' side-by-side runs (one copy for every benchmark)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                 batch_size: int, mode: str) -> tuple[nn.Module, Any, Any, str]:
    """Opacus' `make_private` in `mode` ("opacus_hooks", "opacus_ghost", "opacus_functorch", ...), noise 1 and
    clip 1, fixed batches (the timing's), no Poisson sampling: (wrapped model, DP optimizer, criterion, the
    grad_sample_mode). With "ghost" the criterion takes `shape=` (Opacus' fast gradient clipping)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)
    grad_sample_mode = mode.removeprefix("opacus_")
    made = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, grad_sample_mode=grad_sample_mode, criterion=nn.CrossEntropyLoss())
    if grad_sample_mode == "ghost":
        wrapped, dp_optimizer, criterion, _ = made
    else:
        (wrapped, dp_optimizer, _), criterion = made, nn.CrossEntropyLoss()
    return wrapped, dp_optimizer, criterion, grad_sample_mode
