"""Typed model configuration, loaded from `params.json` exactly as released checkpoints ship it.

The field names are those of mistral-inference's `ModelArgs` (`dim`, `n_layers`, `hidden_dim`, ...), so a
consolidated checkpoint's `params.json` maps onto `ModelArgs` without renaming. An optional `moe` sub-config
switches every feed-forward layer to a sparse mixture of experts (Mixtral).
"""

from __future__ import annotations

import json
import logging
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tramontane.errors import ConfigError

logger = logging.getLogger(__name__)

# Mistral 7B v0.1's params.json may omit `rope_theta`; its training used 1e4. Later mistral-inference
# versions fall back to 1e6, which silently breaks v0.1, so we never do.
DEFAULT_ROPE_THETA = 10_000.0

# Keys that released params.json files carry but that do not change the network we build.
_IGNORED_PARAMS_KEYS = frozenset(
    {"max_batch_size", "max_seq_len", "max_position_embeddings", "model_type", "torch_dtype", "quantization",
     "_name_or_path", "lora"}
)


@dataclass
class MoeArgs:
    """Sparse mixture of experts: each token goes to its top-`num_experts_per_tok` of `num_experts` FFNs."""

    num_experts: int
    num_experts_per_tok: int

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"moe.num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok}"
            )


@dataclass
class ModelArgs:
    """Hyper-parameters of a Mistral-family decoder (names as in `params.json`)."""

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = DEFAULT_ROPE_THETA
    # A query attends to exactly `sliding_window` keys, itself included (None: full causal attention).
    sliding_window: int | None = None
    moe: MoeArgs | None = None
    tied_embeddings: bool = False
    # Unrecognised params.json keys, kept so that saving writes back what was loaded.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoeArgs(**self.moe)
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each key/value head among n_heads/n_kv_heads queries)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.sliding_window is not None:
            if isinstance(self.sliding_window, str):  # early Mixtral releases wrote it as a string
                self.sliding_window = int(self.sliding_window)
            if self.sliding_window < 1:
                raise ConfigError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ModelArgs":
        """Build from a parsed `params.json`; missing required keys raise `ConfigError` naming them."""
        known = {f.name for f in fields(cls)} - {"extra"}
        required = {f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING} - {"extra"}
        params = dict(params)
        if "head_dim" not in params and "dim" in params and "n_heads" in params:
            params["head_dim"] = params["dim"] // params["n_heads"]
        if "n_kv_heads" not in params and "n_heads" in params:
            params["n_kv_heads"] = params["n_heads"]
        missing = sorted(required - params.keys())
        if missing:
            raise ConfigError(
                f"params.json is missing required key(s) {missing}; a Mistral params.json needs "
                f"{sorted(required)}"
            )
        if params.get("rope_theta") is None:
            params["rope_theta"] = DEFAULT_ROPE_THETA
        extra = {k: v for k, v in params.items() if k not in known}
        unknown = sorted(set(extra) - _IGNORED_PARAMS_KEYS)
        if unknown:
            logger.warning("params.json keys not used by the text model: %s", unknown)
        kwargs = {k: v for k, v in params.items() if k in known}
        if isinstance(kwargs.get("moe"), dict):
            moe = kwargs["moe"]
            try:
                kwargs["moe"] = MoeArgs(num_experts=moe["num_experts"],
                                        num_experts_per_tok=moe["num_experts_per_tok"])
            except KeyError as err:
                raise ConfigError(f"params.json 'moe' section is missing {err}") from None
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as err:
            raise ConfigError(f"invalid params.json: {err}") from None

    def to_params(self) -> dict[str, Any]:
        """The `params.json` dictionary (unrecognised keys that were loaded are written back)."""
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        if out["moe"] is None:
            del out["moe"]
        if out["sliding_window"] is None:
            del out["sliding_window"]
        return {**self.extra, **out}

    @classmethod
    def load(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        try:
            params = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(params, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_params(params)

    def num_parameters(self) -> int:
        """Total parameters of the text model built from these args."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        if self.moe is not None:
            ffn = ffn * self.moe.num_experts + self.dim * self.moe.num_experts
        per_layer = attn + ffn + 2 * self.dim
        head = 0 if self.tied_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + self.dim + head

