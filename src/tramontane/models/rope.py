"""Rotary position embeddings in the interleaved-pair layout of consolidated Mistral checkpoints.

Each head's `head_dim` features are read as `head_dim / 2` pairs of adjacent features (2i, 2i+1); pair i is
rotated by the angle `position * theta^(-2i / head_dim)`. Hugging Face checkpoints use the "rotate half"
layout instead; `checkpoint.py` permutes the rows of `wq`/`wk` when converting, so the network itself only
knows this one layout.
"""

from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """`theta^(-2i/head_dim)` for i < head_dim/2, float32 (as mistral-inference and HF compute it)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `positions * inv_freq`: positions [B, T] -> two float32 tensors [B, T, 1, D/2]."""
    angles = positions.float()[..., None] * inv_freq  # B T D/2
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs of x [B, T, H, D] (computed in float32, returned in x's dtype)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # B T H D/2 2
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
