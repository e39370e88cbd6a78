"""Pixtral vision: the ViT encoder, the vision-language adapter and the model that reads images in its prompt.

The encoder (mistral-inference `vision_encoder.py`) embeds each image (C, H, W) at its own size with a
patch convolution, concatenates the patches of all images into one sequence, and runs pre-norm transformer
blocks identical to the text ones (`TransformerBlock`, SiLU-gated FFN) with two differences:
- 2D rotary embeddings: a patch's row turns the even-indexed frequencies, its column the odd-indexed ones;
- block-diagonal attention: a patch sees every patch of its own image and nothing else (no causal mask).
The adapter (GELU MLP) maps each patch feature to one text embedding, which replaces one `[IMG]` token.
Mistral Small 3.1 (`mm_projector_id: "patch_merge"`) first RMS-normalises the features and merges each 2x2
block of patches into one token.

Images are pre-processed by mistral_common only (`encode_image`, `encode_image_prompt`), never here.
Checkpoints: consolidated (`params.json` with a `vision_encoder` section) and Hugging Face LLaVA / Mistral3
(`save_pretrained` directories), see `load_vision_language_model`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tramontane.errors import CheckpointError, ConfigError, DataError, GenerationError, TokenizerError
from tramontane.generation import Completion, SamplingParams
from tramontane.models.args import ModelArgs
from tramontane.models.cache import KVCache
from tramontane.models.checkpoint import (
    assign_weights,
    args_from_hf_config,
    hf_names,
    permute_from_hf,
    permute_to_hf,
    read_json_object,
    resolve_dtype,
    scan_tensors,
    weight_files,
)
from tramontane.models.layers import AttentionContext, RMSNorm
from tramontane.models.multimodal import generate_with_embeddings, splice_embeddings
from tramontane.models.rope import inverse_frequencies
from tramontane.models.transformer import Transformer, TransformerBlock

if TYPE_CHECKING:
    from PIL.Image import Image

    from tramontane.tokenizer import Tokenizer

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
        for layer in self.transformer["layers"]:
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


@torch.no_grad()
def generate_with_images(
    model: VisionLanguageModel,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[torch.Tensor]],
    params: SamplingParams | None = None,
    eos_id: int | None = None,
    chunk_size: int | None = None,
) -> list[Completion]:
    """Generate a continuation of each prompt; `images[i]` are the images of `prompts[i]`, in order.

    The prefill reads the spliced embeddings; decoding is `generation.generate`'s.
    """
    params = params or SamplingParams()
    if len(images) != len(prompts):
        raise GenerationError(f"got {len(prompts)} prompt(s) but {len(images)} image list(s); pass one "
                              "(possibly empty) list of images per prompt")
    image_id, vocab = model.vision_args.image_token_id, model.args.vocab_size
    embeddings = []
    for row, (prompt, prompt_images) in enumerate(zip(prompts, images)):
        if any(not 0 <= t < vocab for t in prompt):
            raise GenerationError(f"prompt {row} holds token ids outside the vocabulary [0, {vocab})")
        model.check_context(len(prompt) + params.max_tokens, sum(1 for t in prompt if t == image_id))
        tokens = torch.as_tensor(list(prompt), dtype=torch.long, device=model.device)[None]
        embeddings.append(model.embed(tokens, prompt_images)[0])
    return generate_with_embeddings(model, prompts, embeddings, params, eos_id, chunk_size)


# ---------------------------------------------------------------------------- pre-processing (mistral_common)


def load_image(source: Image | str | os.PathLike[str]) -> Image:
    """A PIL image, as given or read from a file path (`DataError` if it cannot be read)."""
    try:
        from PIL import Image as PILImage, UnidentifiedImageError
    except ImportError:  # pragma: no cover - pillow comes with mistral_common[image]
        raise ImportError("images need pillow and opencv: pip install 'tramontane[multimodal]'") from None
    if isinstance(source, PILImage.Image):
        return source
    path = Path(source)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        image = PILImage.open(path)
        image.load()  # decode now, so that a truncated file fails here and not in the tokenizer
    except (UnidentifiedImageError, OSError, ValueError, PILImage.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}); give a PNG, JPEG, WebP or "
                        "other file that PIL can open") from None
    return image


def _image_encoder(tokenizer: Tokenizer) -> Any:
    encoder = tokenizer.mistral.instruct_tokenizer.image_encoder
    if encoder is None:
        raise TokenizerError(f"{tokenizer!r} cannot encode images (no image config); use a multimodal "
                             "tokenizer, e.g. Tokenizer.builtin('v3-tekken-mm') or a Pixtral tekken.json")
    return encoder


def check_tokenizer(tokenizer: Tokenizer, vision_args: VisionEncoderArgs) -> None:
    """`ConfigError` unless the tokenizer cuts images as the model expects (patch, merge, special ids)."""
    encoder = _image_encoder(tokenizer)
    config, ids = encoder.image_config, encoder.special_ids
    ours = {"patch size": vision_args.patch_size, "spatial merge size": vision_args.spatial_merge_size,
            "[IMG] id": vision_args.image_token_id, "[IMG_BREAK] id": vision_args.image_break_token_id,
            "[IMG_END] id": vision_args.image_end_token_id}
    theirs = {"patch size": config.image_patch_size, "spatial merge size": config.spatial_merge_size,
              "[IMG] id": ids.img, "[IMG_BREAK] id": ids.img_break, "[IMG_END] id": ids.img_end}
    wrong = [f"{k}: tokenizer {theirs[k]}, model {v}"
             for k, v in ours.items() if v is not None and theirs[k] != v]
    if wrong:
        raise ConfigError(f"the tokenizer's image settings do not match the model ({'; '.join(wrong)}); "
                          "use the tokenizer file shipped with the checkpoint")


def encode_image(
    tokenizer: Tokenizer, image: Image | str | os.PathLike[str]
) -> tuple[list[int], torch.Tensor]:
    """One image through mistral_common's `ImageEncoder`: its `[IMG]`/`[IMG_BREAK]`/`[IMG_END]` tokens and
    the resized, normalised pixels [C, H, W] (float32)."""
    from mistral_common.protocol.instruct.chunk import ImageChunk

    encoding = _image_encoder(tokenizer)(ImageChunk(image=load_image(image)))
    return list(encoding.tokens), torch.from_numpy(np.ascontiguousarray(encoding.image))


def encode_image_prompt(
    tokenizer: Tokenizer,
    text: str,
    images: Sequence[Image | str | os.PathLike[str]],
    vision_args: VisionEncoderArgs | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """A one-turn user chat (the images, then `text`) through the tokenizer's chat template: prompt ids and
    the image tensors [C, H, W] in prompt order. With `vision_args`, the tokenizer is checked against them."""
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage

    _image_encoder(tokenizer)
    if vision_args is not None:
        check_tokenizer(tokenizer, vision_args)
    content = [ImageChunk(image=load_image(image)) for image in images] + [TextChunk(text=text)]
    tokenized = tokenizer.encode_chat_full([UserMessage(content=content)])
    return list(tokenized.tokens), [torch.from_numpy(np.ascontiguousarray(a)) for a in tokenized.images]


# ---------------------------------------------------------------------------------------- HF names <-> ours


def hf_vision_names(args: ModelArgs, vision_args: VisionEncoderArgs) -> dict[str, str]:
    """Consolidated name -> the name HF `save_pretrained` writes for LLaVA (Pixtral) / Mistral3."""
    names = {"vision_encoder.patch_conv.weight": "vision_tower.patch_conv.weight",
             "vision_encoder.ln_pre.weight": "vision_tower.ln_pre.weight"}
    for i in range(vision_args.num_hidden_layers):
        c, h = f"vision_encoder.transformer.layers.{i}.", f"vision_tower.transformer.layers.{i}."
        names |= {c + f"attention.w{x}.weight": h + f"attention.{x}_proj.weight" for x in "qkvo"}
        names |= {c + f"feed_forward.{w}.weight": h + f"feed_forward.{p}.weight"
                  for w, p in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))}
        names |= {c + f"{n}.weight": h + f"{n}.weight" for n in ("attention_norm", "ffn_norm")}
    params = ("weight", "bias") if vision_args.adapter_bias else ("weight",)
    for ours, theirs in (("w_in", "linear_1"), ("w_out", "linear_2")):
        names |= {f"vision_language_adapter.{ours}.{p}": f"multi_modal_projector.{theirs}.{p}"
                  for p in params}
    if vision_args.add_pre_mm_projector_layer_norm:
        names["pre_mm_projector_norm.weight"] = "multi_modal_projector.norm.weight"
    if vision_args.patch_merger:
        names["patch_merger.merging_layer.weight"] = "multi_modal_projector.patch_merger.merging_layer.weight"
    for ours, theirs in hf_names(args).items():  # MistralForCausalLM names, under language_model.
        names[ours] = "language_model." + theirs
    return names


# transformers 5.x runtime prefixes (a raw `state_dict()`) -> the on-disk ones `save_pretrained` writes
_HF_RUNTIME_PREFIXES = (("model.vision_tower.", "vision_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector."),
                        ("model.language_model.", "language_model.model."),
                        ("lm_head.", "language_model.lm_head."))


def _hf_disk_name(name: str) -> str:
    for runtime, disk in _HF_RUNTIME_PREFIXES:
        if name.startswith(runtime):
            return disk + name[len(runtime):]
    return name


def _rotary_heads(name: str, args: ModelArgs, vision_args: VisionEncoderArgs) -> int | None:
    """Heads whose rows the HF conversion permuted, for a consolidated name (None: not wq/wk)."""
    if name.startswith("vision_encoder.") and name.endswith(("attention.wq.weight", "attention.wk.weight")):
        return vision_args.num_attention_heads
    if name.startswith("layers.") and name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.startswith("layers.") and name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def _permutable(tensor: torch.Tensor, heads: int) -> bool:
    return tensor.ndim == 2 and tensor.shape[0] % (2 * heads) == 0


def _consolidated_names(
    hf_keys: Sequence[str], args: ModelArgs, vision_args: VisionEncoderArgs
) -> dict[str, str]:
    """HF key (on-disk or 5.x runtime spelling) -> consolidated name; `CheckpointError` for unknown keys."""
    ours = {disk: name for name, disk in hf_vision_names(args, vision_args).items()}
    out, unknown, seen = {}, [], {}
    for key in hf_keys:
        name = ours.get(_hf_disk_name(key))
        if name is None:
            unknown.append(key)
        elif name in seen:
            raise CheckpointError(f"HF tensors {seen[name]!r} and {key!r} both hold {name!r}")
        else:
            out[key], seen[name] = name, key
    if unknown:
        raise CheckpointError(f"unexpected tensor(s) for this LLaVA/Mistral3 config: {sorted(unknown)[:10]}"
                              + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return out


def hf_to_consolidated_vision(
    state_dict: dict[str, torch.Tensor], args: ModelArgs, vision_args: VisionEncoderArgs
) -> dict[str, torch.Tensor]:
    """HF LLaVA / Mistral3 tensors (on-disk or transformers 5.x runtime names) -> consolidated names, with the
    rows of the vision and text wq/wk permuted back to adjacent rotary pairs."""
    out = {}
    for key, name in _consolidated_names(list(state_dict), args, vision_args).items():
        tensor, heads = state_dict[key], _rotary_heads(name, args, vision_args)
        out[name] = permute_from_hf(tensor, heads) if heads and _permutable(tensor, heads) else tensor
    return out


def consolidated_to_hf_vision(
    state_dict: dict[str, torch.Tensor], args: ModelArgs, vision_args: VisionEncoderArgs
) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_consolidated_vision`, writing the names `save_pretrained` uses (a tied output head
    is not written, as transformers does not)."""
    names = hf_vision_names(args, vision_args)
    if args.tied_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "output.weight"}
    unknown = sorted(set(state_dict) - set(names))
    if unknown:
        raise CheckpointError(f"tensor(s) with no HF LLaVA/Mistral3 name: {unknown[:10]}")
    out = {}
    for name, tensor in state_dict.items():
        heads = _rotary_heads(name, args, vision_args)
        out[names[name]] = permute_to_hf(tensor, heads) if heads and _permutable(tensor, heads) else tensor
    return out


# --------------------------------------------------------------------------------------------------- loading


_HF_PIXTRAL_DEFAULTS: dict[str, Any] = {  # transformers' PixtralVisionConfig defaults, for absent keys
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 1024, "patch_size": 16, "hidden_act": "gelu", "rope_theta": 10_000.0,
}
_HF_VLM_TYPES = {"llava": "LlavaForConditionalGeneration", "mistral3": "Mistral3ForConditionalGeneration"}
_FLOAT_TAGS = ("F32", "BF16", "F16", "F64")


def args_from_hf_vision_config(config: dict[str, Any]) -> tuple[ModelArgs, VisionEncoderArgs]:
    """Text and vision args from a LLaVA (Pixtral) or Mistral3 `config.json`. Whether the output head is tied
    to the embeddings is left to the loader, which also looks at the tensors (as transformers does)."""
    model_type = config.get("model_type")
    if model_type not in _HF_VLM_TYPES:
        raise ConfigError(f"config.json model_type {model_type!r} is not a supported vision-language model "
                          f"(supported: {sorted(_HF_VLM_TYPES.values())})")
    vision = dict(config.get("vision_config") or {})
    if vision.get("model_type", "pixtral") != "pixtral":
        raise ConfigError(f"vision_config model_type {vision.get('model_type')!r} is not supported "
                          "(only pixtral)")
    if config.get("vision_feature_layer", -1) != -1:
        raise ConfigError(f"vision_feature_layer {config['vision_feature_layer']!r} is not supported (only "
                          "-1, the last layer, as Pixtral and Mistral Small 3.1 use)")
    if model_type == "llava" and config.get("vision_feature_select_strategy", "default") != "full":
        raise ConfigError("a Pixtral LLaVA config needs vision_feature_select_strategy 'full' (it has no "
                          f"class token to drop), got "
                          f"{config.get('vision_feature_select_strategy', 'default')!r}")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"projector_hidden_act {config['projector_hidden_act']!r} is not supported "
                          "(only gelu)")

    def get(key: str) -> Any:
        if key in vision:
            return vision[key]
        logger.warning("config.json vision_config has no %r; using transformers' default %r",
                       key, _HF_PIXTRAL_DEFAULTS[key])
        return _HF_PIXTRAL_DEFAULTS[key]

    if get("hidden_act") != "silu":
        logger.warning("config.json vision_config.hidden_act is %r, but Pixtral's vision FFN is SiLU-gated "
                       "(mistral-inference); tramontane uses SiLU, so outputs differ from transformers' with "
                       "this config", get("hidden_act"))
    rope = vision.get("rope_parameters") or {}
    theta = rope.get("rope_theta", vision.get("rope_theta", _HF_PIXTRAL_DEFAULTS["rope_theta"]))
    patch_merge = model_type == "mistral3"
    vision_args = VisionEncoderArgs(
        hidden_size=get("hidden_size"), num_channels=get("num_channels"), image_size=_side(get("image_size")),
        patch_size=_side(get("patch_size")), intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"), num_attention_heads=get("num_attention_heads"),
        rope_theta=float(theta),
        image_token_id=config.get("image_token_index", config.get("image_token_id", 10)),
        adapter_bias=bool(config.get("multimodal_projector_bias", not patch_merge)),
        spatial_merge_size=config.get("spatial_merge_size", 2) if patch_merge else 1,
        add_pre_mm_projector_layer_norm=patch_merge, mm_projector_id=PATCH_MERGE if patch_merge else "",
    )
    if vision.get("head_dim") not in (None, vision_args.head_dim):
        raise ConfigError(f"vision_config head_dim {vision['head_dim']} != hidden_size / num_attention_heads")
    text = dict(config.get("text_config") or {})
    text.setdefault("model_type", "mistral")
    if "num_attention_heads" not in text:  # older LLaVA configs only list what differs from MistralConfig
        logger.warning("config.json text_config has no 'num_attention_heads'; using transformers' default 32")
        text["num_attention_heads"] = 32
    return args_from_hf_config(text), vision_args


def _side(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"non-square vision size {value} is not supported")
        value = value[0]
    return value


def _hf_tied(config: dict[str, Any]) -> bool:
    """What transformers decides from the config alone (top level wins; LLaVA falls back to the text
    config)."""
    if config.get("tie_word_embeddings") is not None:
        return bool(config["tie_word_embeddings"])
    if config["model_type"] == "mistral3":
        return True
    return bool((config.get("text_config") or {}).get("tie_word_embeddings", False))


def load_vision_language_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
) -> VisionLanguageModel:
    """Load a consolidated (`params.json` with `vision_encoder` + `consolidated*.safetensors`) or HF LLaVA /
    Mistral3 (`config.json` + `model*.safetensors`) directory. Every tensor name and shape is checked before
    any data is read; `CheckpointError` lists all missing, unexpected and mis-shaped tensors."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    target_dtype = resolve_dtype(dtype)
    if (path / "params.json").is_file():
        fmt = "consolidated"
        params = read_json_object(path / "params.json")
        if "vision_encoder" not in params:
            raise CheckpointError(f"{path / 'params.json'} has no 'vision_encoder' section: a text-only "
                                  "checkpoint, load it with tramontane.models.checkpoint.load_model")
        vision_args = VisionEncoderArgs.from_params(params["vision_encoder"])
        args = ModelArgs.from_params({k: v for k, v in params.items() if k != "vision_encoder"})
    elif (path / "config.json").is_file():
        fmt = "hf"
        config = read_json_object(path / "config.json")
        args, vision_args = args_from_hf_vision_config(config)
    else:
        raise CheckpointError(f"{path} has neither params.json (consolidated) nor config.json (Hugging Face)")
    entries = scan_tensors(weight_files(path, fmt))  # headers only
    quantized = sorted(k for k, e in entries.items() if e.dtype not in _FLOAT_TAGS)
    if quantized:
        raise CheckpointError(f"{path} holds non-float tensors ({quantized[:5]}...): quantized checkpoints "
                              "are not supported")
    if fmt == "hf":
        names = _consolidated_names(list(entries), args, vision_args)
        tied = _hf_tied(config) and "output.weight" not in names.values()
        args = replace(args, tied_embeddings=tied)
    else:
        names = {k: k for k in entries}
    with torch.device("meta"):
        model = VisionLanguageModel(args, vision_args, max_seq_len)
    def rotary_heads(name: str) -> int | None:
        return _rotary_heads(name, args, vision_args)

    return assign_weights(model, entries, names, rotary_heads=rotary_heads if fmt == "hf" else None,
                          dtype=target_dtype, device=device, what=str(path))


__all__ = [
    "PATCH_MERGE", "PatchMerger", "VisionEncoder", "VisionEncoderArgs", "VisionLanguageAdapter",
    "VisionLanguageModel", "args_from_hf_vision_config", "check_tokenizer", "consolidated_to_hf_vision",
    "encode_image", "encode_image_prompt", "generate_with_images", "hf_to_consolidated_vision",
    "hf_vision_names", "load_image", "load_vision_language_model", "rotary_angles_2d",
]
