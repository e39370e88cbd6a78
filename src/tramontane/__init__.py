"""tramontane: the Mistral model family with differential privacy built in."""

__version__ = "0.1.0"
