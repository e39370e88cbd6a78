"""Pixtral vision: the network (`network`), its checkpoints (`checkpoint`) and image pre-processing
(`preprocess`, by mistral_common only). Generation with images is `tramontane.generation.multimodal`.

Checkpoints: consolidated (`params.json` with a `vision_encoder` section) and Hugging Face LLaVA / Mistral3
(`save_pretrained` directories), see `load_vision_language_model`.
"""

from tramontane.models.vision.checkpoint import (
    args_from_hf_vision_config,
    consolidated_to_hf_vision,
    hf_to_consolidated_vision,
    hf_vision_names,
    load_vision_language_model,
)
from tramontane.models.vision.network import (
    PATCH_MERGE,
    PatchMerger,
    VisionEncoder,
    VisionEncoderArgs,
    VisionLanguageAdapter,
    VisionLanguageModel,
    rotary_angles_2d,
)
from tramontane.models.vision.preprocess import (
    check_tokenizer,
    encode_image,
    encode_image_chat,
    encode_image_prompt,
    image_message,
    load_image,
)

__all__ = [
    "PATCH_MERGE", "PatchMerger", "VisionEncoder", "VisionEncoderArgs", "VisionLanguageAdapter",
    "VisionLanguageModel", "args_from_hf_vision_config", "check_tokenizer", "consolidated_to_hf_vision",
    "encode_image", "encode_image_chat", "encode_image_prompt", "hf_to_consolidated_vision", "hf_vision_names",
    "image_message", "load_image", "load_vision_language_model", "rotary_angles_2d",
]
