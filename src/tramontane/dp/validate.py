"""Refuse, before training, the modules per-example clipping cannot handle, naming every one of them.

DP-SGD's guarantee needs each example's gradient to depend on that example alone, and nothing computed from
the batch to leave training without noise. Checked here, from the module tree alone:

- BatchNorm (any variant): normalises with batch statistics, so one example's gradient depends on the
  others, and its running statistics are released without noise. Use GroupNorm, LayerNorm or RMSNorm.
- InstanceNorm with track_running_stats=True: the running statistics are a non-private release.
- nn.Embedding / nn.EmbeddingBag with scale_grad_by_freq (gradients scaled by batch-wide token counts) or
  max_norm (weights renormalised in place from the batch's tokens, outside the gradient).
- Recurrent layers (nn.RNN/LSTM/GRU): not supported (Opacus' DPLSTM re-implements them for this).
- nn.MultiheadAttention with batch_first=False: dim 0 would be time, but the example axis must be dim 0.

What cannot be seen from the tree (a custom module averaging over dim 0, a parameter used outside its
module's forward) is the caller's responsibility; `DPEngine` also checks at run time that every hooked layer
sees dim 0 == the number of examples.
"""

from __future__ import annotations

from torch import nn

from tramontane.errors import UnsupportedModuleError


def unsupported_reason(module: nn.Module) -> str | None:
    """Why `module` cannot be trained with per-example clipping, or None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return ("batch statistics mix examples (and running statistics are released without noise); "
                "use GroupNorm, LayerNorm or RMSNorm")
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return "running statistics are a non-private release; set track_running_stats=False"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq scales gradients by batch-wide token counts; set it to False"
        if module.max_norm is not None:
            return "max_norm renormalises weights in place from the batch's tokens; set it to None"
    if isinstance(module, nn.RNNBase):
        return "recurrent layers are not supported; use a transformer layer (or Opacus' DPLSTM)"
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return "the example axis must be dim 0: construct it with batch_first=True"
    return None


def find_unsupported(model: nn.Module) -> list[tuple[str, str, str]]:
    """(qualified name, type name, reason) of every unsupported module in `model`."""
    return [(name or "<root>", type(module).__name__, reason)
            for name, module in model.named_modules()
            if (reason := unsupported_reason(module)) is not None]


def validate_model(model: nn.Module) -> None:
    """Raise `UnsupportedModuleError` listing every module DP-SGD cannot train (see the module docstring)."""
    problems = find_unsupported(model)
    if problems:
        lines = "\n".join(f"  - {name} ({kind}): {reason}" for name, kind, reason in problems)
        raise UnsupportedModuleError(
            f"{len(problems)} module(s) cannot be trained with per-example gradient clipping:\n{lines}")
