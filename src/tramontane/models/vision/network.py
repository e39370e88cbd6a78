"""Pixtral vision network: the ViT encoder, the vision-language adapter and the model that reads images.

The encoder (mistral-inference `vision_encoder.py`) embeds each image (C, H, W) at its own size with a
patch convolution, concatenates the patches of all images into one sequence, and runs pre-norm transformer
blocks identical to the text ones (`TransformerBlock`, SiLU-gated FFN) with two differences:
- 2D rotary embeddings: a patch's row turns the even-indexed frequencies, its column the odd-indexed ones;
- block-diagonal attention: a patch sees every patch of its own image and nothing else (no causal mask).
The adapter (GELU MLP) maps each patch feature to one text embedding, which replaces one `[IMG]` token.
Mistral Small 3.1 (`mm_projector_id: "patch_merge"`) first RMS-normalises the features and merges each 2x2
block of patches into one token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tramontane.errors import ConfigError, DataError, GenerationError
from tramontane.models.args import ModelArgs
from tramontane.models.cache import KVCache
from tramontane.models.layers import AttentionContext, RMSNorm
from tramontane.models.multimodal import splice_embeddings
from tramontane.models.rope import inverse_frequencies
from tramontane.models.transformer import Transformer, TransformerBlock

logger = logging.getLogger(__name__)

PATCH_MERGE = "patch_merge"  # params.json `mm_projector_id` of the 2x2 patch merger (Mistral Small 3.1)
_VISION_NORM_EPS = 1e-5  # hard-coded in mistral-inference and vLLM for ln_pre, the blocks and the pre-norm


# ------------------------------------------------------------------------------------------------- config


@dataclass
class VisionEncoderArgs:
    """The `vision_encoder` section of a multimodal `params.json` (names as released)."""

    hidden_size: int
    num_channels: int
    image_size: int  # largest image side the encoder takes, in pixels
    patch_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rope_theta: float = 10_000.0
    image_token_id: int = 10
    image_break_token_id: int | None = None
    image_end_token_id: int | None = None
    adapter_bias: bool = True
    spatial_merge_size: int = 1
    add_pre_mm_projector_layer_norm: bool = False
    mm_projector_id: str = ""
    max_image_size: int | None = None  # the tokenizer's resize limit; informational here
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_channels", "image_size", "patch_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "spatial_merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"vision_encoder.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_encoder.hidden_size={self.hidden_size} must be a multiple of "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"the vision head dim ({self.head_dim}) must be a multiple of 4: 2D rotary "
                              "embeddings split each head's frequency pairs between rows and columns")
        if not self.rope_theta > 0:
            raise ConfigError(f"vision_encoder.rope_theta must be > 0, got {self.rope_theta}")
        if self.mm_projector_id not in ("", PATCH_MERGE):
            raise ConfigError(f"vision_encoder.mm_projector_id {self.mm_projector_id!r} is not supported "
                              f"(known: '' for none, {PATCH_MERGE!r})")
        if self.mm_projector_id != PATCH_MERGE and self.spatial_merge_size != 1:
            raise ConfigError(f"vision_encoder.spatial_merge_size={self.spatial_merge_size} needs "
                              f"mm_projector_id={PATCH_MERGE!r} (nothing else merges patches)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_merger(self) -> bool:
        return self.mm_projector_id == PATCH_MERGE

    def block_args(self) -> ModelArgs:
        """The text-block hyper-parameters the encoder's blocks are built from (MHA: as many kv heads as
        query heads; there is no vocabulary, vocab_size is a placeholder)."""
        return ModelArgs(dim=self.hidden_size, n_layers=self.num_hidden_layers, head_dim=self.head_dim,
                         hidden_dim=self.intermediate_size, n_heads=self.num_attention_heads,
                         n_kv_heads=self.num_attention_heads, norm_eps=_VISION_NORM_EPS, vocab_size=1,
                         rope_theta=self.rope_theta)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> VisionEncoderArgs:
        """From the parsed `vision_encoder` section; unknown keys are kept in `extra` (and logged)."""
        if not isinstance(params, dict):
            raise ConfigError(f"params.json 'vision_encoder' must be an object, got {type(params).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - {"extra"} - params.keys())
        if missing:
            raise ConfigError(f"params.json 'vision_encoder' is missing required key(s) {missing}")
        extra = {k: v for k, v in params.items() if k not in known}
        if extra:
            logger.warning("params.json vision_encoder keys not used: %s", sorted(extra))
        return cls(**{k: v for k, v in params.items() if k in known}, extra=extra)

    def to_params(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        return {**self.extra, **out}


# ------------------------------------------------------------------------------------------------ modules


def rotary_angles_2d(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, N, 1, D/2] for patches at (rows [N], cols [N]).

    mistral-inference `precompute_freqs_cis_2d`: of the D/2 base frequencies theta^(-2i/D), the even-indexed
    ones turn with the row and make the first D/4 rotary pairs, the odd-indexed ones turn with the column and
    make the last D/4 pairs (adjacent-pair layout, as `apply_rotary` expects).
    """
    inv_freq = inverse_frequencies(head_dim, theta, rows.device)
    row_angles = rows.float()[:, None] * inv_freq[0::2]  # N D/4
    col_angles = cols.float()[:, None] * inv_freq[1::2]  # N D/4
    angles = torch.cat([row_angles, col_angles], dim=-1)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


class VisionEncoder(nn.Module):
    """Pixtral-ViT: images -> one feature [hidden_size] per patch, images concatenated in order."""

    def __init__(self, args: VisionEncoderArgs) -> None:
        super().__init__()
        self.args = args
        self.patch_conv = nn.Conv2d(args.num_channels, args.hidden_size, kernel_size=args.patch_size,
                                    stride=args.patch_size, bias=False)
        self.ln_pre = RMSNorm(args.hidden_size, _VISION_NORM_EPS)
        block_args = args.block_args()
        self.transformer = nn.ModuleDict(
            {"layers": nn.ModuleList(TransformerBlock(block_args) for _ in range(args.num_hidden_layers))}
        )

    def grid(self, image: torch.Tensor) -> tuple[int, int]:
        """Patch rows and columns of image [C, H, W]; `DataError` for an image the encoder cannot take."""
        a = self.args
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != a.num_channels:
            shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise DataError(f"an image must be a tensor [C={a.num_channels}, H, W], got {shape}")
        h, w = image.shape[1:]
        if h % a.patch_size or w % a.patch_size or h == 0 or w == 0:
            raise DataError(f"image size {h}x{w} is not a multiple of the patch size {a.patch_size}; "
                            "pre-process images with mistral_common (vision.encode_image)")
        if max(h, w) > a.image_size:
            raise DataError(f"image size {h}x{w} exceeds the encoder's image_size {a.image_size}; "
                            "pre-process images with mistral_common (vision.encode_image), which downscales")
        return h // a.patch_size, w // a.patch_size

    def forward(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """images: list of [C, H_i, W_i] -> features [N, hidden_size], N = sum of patches, row-major."""
        grids = [self.grid(image) for image in images]
        weight = self.patch_conv.weight
        # each image at its own size: [1, C, H, W] -> [hidden, h, w] -> [h*w, hidden]
        patches = [self.patch_conv(image[None].to(weight.device, weight.dtype))[0].flatten(1).T
                   for image in images]
        x = self.ln_pre(torch.cat(patches))[None]  # 1 N hidden
        device = x.device
        rows = torch.cat([torch.arange(h, device=device).repeat_interleave(w) for h, w in grids])
        cols = torch.cat([torch.arange(w, device=device).repeat(h) for h, w in grids])
        cos, sin = rotary_angles_2d(rows, cols, self.args.head_dim, self.args.rope_theta)
        image_of = torch.repeat_interleave(torch.arange(len(grids), device=device),
                                           torch.tensor([h * w for h, w in grids], device=device))
        mask = (image_of[:, None] == image_of[None, :])[None, None]  # 1 1 N N: block diagonal
        ctx = AttentionContext(cos, sin, mask)
        layers = self.transformer["layers"]
        assert isinstance(layers, nn.ModuleList)
        for layer in layers:
            x = layer(x, ctx)
        return x[0]


class PatchMerger(nn.Module):
    """Concatenates each s x s block of patch features (in `F.unfold` order: feature-major, then the block's
    rows and columns, as mistral-inference and HF do) and projects it back to `dim`."""

    def __init__(self, dim: int, spatial_merge_size: int) -> None:
        super().__init__()
        self.spatial_merge_size = spatial_merge_size
        self.merging_layer = nn.Linear(dim * spatial_merge_size**2, dim, bias=False)

    def forward(self, features: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """features [sum h*w, dim] of images with patch grids (h, w) -> [sum h*w / s^2, dim]."""
        s, d = self.spatial_merge_size, features.shape[-1]
        merged = []
        for image, (h, w) in zip(features.split([h * w for h, w in grids]), grids):
            if h % s or w % s:
                raise DataError(f"an image of {h}x{w} patches cannot be merged in {s}x{s} blocks; pre-process"
                                " images with mistral_common, whose size is then a multiple of patch * merge")
            blocks = image.view(h // s, s, w // s, s, d).permute(0, 2, 4, 1, 3)  # h/s w/s d s s
            merged.append(blocks.reshape(-1, d * s * s))
        return self.merging_layer(torch.cat(merged))


class VisionLanguageAdapter(nn.Module):
    """w_out(GELU(w_in x)), exact (erf) GELU."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool) -> None:
        super().__init__()
        self.w_in = nn.Linear(in_dim, out_dim, bias=bias)
        self.w_out = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


class VisionLanguageModel(Transformer):
    """A Mistral decoder that reads images: Pixtral-12B, Mistral Small 3.1 (consolidated parameter names).

    The text model's parameters keep their top-level names (`tok_embeddings`, `layers.*`, `norm`, `output`);
    the vision ones live under `vision_encoder`, `pre_mm_projector_norm`, `patch_merger` and
    `vision_language_adapter`. `max_seq_len` (default: params.json `max_seq_len` or HF
    `max_position_embeddings`, if known) bounds the prompt plus generated tokens.
    """

    def __init__(
        self, args: ModelArgs, vision_args: VisionEncoderArgs, max_seq_len: int | None = None
    ) -> None:
        super().__init__(args)
        self.vision_args = vision_args
        self.max_seq_len: int | None = (max_seq_len or args.extra.get("max_seq_len")
                                        or args.extra.get("max_position_embeddings"))
        hidden = vision_args.hidden_size
        self.vision_encoder = VisionEncoder(vision_args)
        self.pre_mm_projector_norm = (RMSNorm(hidden, _VISION_NORM_EPS)
                                      if vision_args.add_pre_mm_projector_layer_norm else None)
        self.patch_merger = (PatchMerger(hidden, vision_args.spatial_merge_size)
                             if vision_args.patch_merger else None)
        self.vision_language_adapter = VisionLanguageAdapter(hidden, args.dim, vision_args.adapter_bias)

    def tokens_per_image(self, image: torch.Tensor) -> int:
        """How many `[IMG]` tokens `image` [C, H, W] fills."""
        h, w = self.vision_encoder.grid(image)
        return h * w // self.vision_args.spatial_merge_size**2

    def image_features(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """One text embedding [dim] per `[IMG]` token of `images`, concatenated in order: [N, dim]."""
        images = _image_list(images)
        features = self.vision_encoder(images)
        if self.pre_mm_projector_norm is not None:
            features = self.pre_mm_projector_norm(features)
        if self.patch_merger is not None:
            features = self.patch_merger(features, [self.vision_encoder.grid(image) for image in images])
        return self.vision_language_adapter(features)

    def embed(self, tokens: torch.Tensor, images: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Input embeddings [B, T, dim] of tokens [B, T], `[IMG]` tokens replaced by the features of `images`
        (all images of the batch, in the order their `[IMG]` runs appear, sequence 0 first)."""
        text = self.tok_embeddings(tokens)
        if images is None or len(images) == 0:
            features = text.new_zeros(0, self.args.dim)
        else:
            features = self.image_features(images)
        return splice_embeddings(text, tokens, self.vision_args.image_token_id, features)

    def forward(  # type: ignore[override]
        self,
        tokens: torch.Tensor,
        images: Sequence[torch.Tensor] | None = None,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] (with `[IMG]` placeholders) and the images they stand for -> logits [B, T, vocab]."""
        self.check_context(tokens.shape[1], int((tokens == self.vision_args.image_token_id).sum(-1).max()))
        embeddings = self.embed(tokens, images)
        return self.output(self.hidden_states(tokens, positions, cache, embeddings=embeddings))

    def check_context(self, n_tokens: int, n_image_tokens: int = 0) -> None:
        """`GenerationError` if a sequence of `n_tokens` does not fit in the model's context."""
        if self.max_seq_len is not None and n_tokens > self.max_seq_len:
            raise GenerationError(
                f"the sequence needs {n_tokens} positions ({n_image_tokens} of them image tokens) but the "
                f"model's context is {self.max_seq_len}; use fewer or smaller images (mistral_common's "
                "max_image_size), a shorter prompt or fewer new tokens"
            )


def _image_list(images: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise DataError(f"pass images as a list of [C, H, W] tensors (or one [N, C, H, W]), got "
                            f"{list(images.shape)}")
        return list(images)
    return list(images)


__all__ = [
    "PATCH_MERGE", "PatchMerger", "VisionEncoder", "VisionEncoderArgs", "VisionLanguageAdapter",
    "VisionLanguageModel", "rotary_angles_2d",
]
