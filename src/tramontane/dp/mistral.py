"""The Mistral family's rules for the DP engine, registered on import (`tramontane.dp` imports this module).

The engine itself works on any nn.Module; this is the only module of `tramontane.dp` that knows
`tramontane.models`. It registers (`rules.register_rule`):

- tramontane's `RMSNorm` (models/layers.py): the generic `NormRule`, normalising with the same operations
  and dtypes as its forward (statistics in float32 whatever the input dtype);
- `MoeLayer` (models/moe.py, Mixtral's sparse mixture of experts): a `RoutingRule`. Each expert receives
  token rows of several examples mixed. Which example a row belongs to is recovered from the router
  (`gate`) output the forward computed: MoeLayer picks each token's experts as the top-k of the gate's
  logits, a deterministic function of them, so the same top-k gives every expert's rows in its order.
  The recording checks that some layer of each expert saw exactly those rows, so a routing that
  differs from this (a changed MoeLayer.forward) is refused rather than charged to the wrong examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tramontane.dp.rules import NormRule, RoutingRule, register_rule
from tramontane.models.layers import RMSNorm
from tramontane.models.moe import MoeLayer


def _rms_normalize(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """normalize(x) exactly as `RMSNorm.forward` computes it before the weight."""
    assert isinstance(module, RMSNorm)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.eps)).type_as(x)


def _last_dim(module: nn.Module) -> int:
    return 1


class MoeRouting(RoutingRule):
    """`MoeLayer`: the gate scores the flattened tokens [N, dim]; expert e gets tokens where(top_k == e)."""

    def router(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, MoeLayer)
        return module.gate

    def branches(self, module: nn.Module) -> Sequence[nn.Module]:
        assert isinstance(module, MoeLayer)
        return list(module.experts)

    def branch_rows(self, module: nn.Module, router_output: torch.Tensor) -> list[torch.Tensor]:
        assert isinstance(module, MoeLayer)
        top = torch.topk(router_output, module.num_experts_per_tok, dim=-1).indices  # N k
        return [torch.where(top == e)[0] for e in range(len(module.experts))]


register_rule(RMSNorm, NormRule(_rms_normalize, _last_dim))
register_rule(MoeLayer, MoeRouting())
