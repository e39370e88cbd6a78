"""The Mistral model family as PyTorch modules, their configuration, cache and checkpoint formats."""

from tramontane.models.args import ModelArgs, MoeArgs
from tramontane.models.cache import KVCache
from tramontane.models.transformer import Transformer, TransformerBlock

__all__ = ["KVCache", "ModelArgs", "MoeArgs", "Transformer", "TransformerBlock"]
