"""Generation: the prefill/decode loop over any `Transformer`, and the multimodal prompts that feed it.

`text` holds the loop (chunked prefill into the rolling KV cache, sampling, stop conditions) and is what this
package exports; `multimodal` turns images (Pixtral) and audio (Voxtral) into the prompt embeddings the loop
reads. Generation sits above `tramontane.models`: it imports the networks, they never import it.
"""

from tramontane.generation.text import (
    Completion,
    SamplingParams,
    decode_steps,
    generate,
    sample_next,
    sampling_problems,
)

__all__ = ["Completion", "SamplingParams", "decode_steps", "generate", "sample_next", "sampling_problems"]
