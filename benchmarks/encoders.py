"""Encoder throughput: tramontane's Pixtral vision encoder against transformers' `PixtralVisionModel` (sdpa),
and (`--encoder audio`) Voxtral's log-mel features and audio encoder + adapter against transformers'.

Both run the same random mid-size Pixtral config with the same weights (saved once by transformers as a
LLaVA checkpoint and loaded by tramontane's vision loader), in float32 on 2 threads, over one call holding
several images of different sizes (block-diagonal attention). The outputs are checked to agree first.

    .venv/bin/python benchmarks/encoders.py [--repeats 5] [--encoder vision|audio]

The last line printed is one JSON object with images/s of both and the ratio (tramontane / transformers,
higher is better). The audio run (a random mid-size Voxtral encoder, 60 s of audio = two 30-s chunks, same
weights through `save_pretrained`) reports audio seconds per second for each stage the same way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

VISION = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
              image_size=1024, patch_size=16, hidden_act="silu")
TEXT = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=None)
IMAGE_SIZES = [(512, 512), (384, 256), (256, 512), (128, 128)]  # 2432 patches in one sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--encoder", choices=["vision", "audio"], default="vision")
    cli = parser.parse_args()
    if cli.encoder == "audio":
        print(json.dumps(bench_audio(cli.repeats)))
        return

    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig, PixtralVisionConfig

    from tramontane.models.vision import load_vision_language_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=PixtralVisionConfig(**VISION), text_config=MistralConfig(**TEXT),
                         image_token_index=10, vision_feature_layer=-1, vision_feature_select_strategy="full")
    with tempfile.TemporaryDirectory() as tmp:
        LlavaForConditionalGeneration(config).save_pretrained(tmp)
        ours = load_vision_language_model(Path(tmp)).vision_encoder.eval()
        theirs = LlavaForConditionalGeneration.from_pretrained(tmp).model.vision_tower.eval()

    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h, w, generator=gen) for h, w in IMAGE_SIZES]
    pixels = torch.zeros(len(images), 3, max(h for h, _ in IMAGE_SIZES), max(w for _, w in IMAGE_SIZES))
    for k, image in enumerate(images):
        pixels[k, :, : image.shape[1], : image.shape[2]] = image
    sizes = torch.tensor(IMAGE_SIZES)

    runs = {"tramontane": lambda: ours(images),
            "transformers": lambda: theirs(pixels, image_sizes=sizes).last_hidden_state[0]}
    with torch.no_grad():
        diff = (runs["tramontane"]() - runs["transformers"]()).abs().max().item()
        if diff > 1e-3:
            raise SystemExit(f"outputs differ by {diff}: not the same network")
        results = {}
        for name, run in runs.items():
            times = []
            for _ in range(cli.repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            results[name] = len(images) / statistics.median(times)
            print(f"{name:>12}: {results[name]:.2f} images/s (median of {cli.repeats})")
    print(json.dumps({
        "benchmark": "pixtral_vision_encoder", "images": IMAGE_SIZES, "config": VISION, "threads": 2,
        "machine": platform.processor() or platform.machine(), "max_abs_diff": diff,
        "images_per_s": results,
        "ratio_tramontane_over_transformers": results["tramontane"] / results["transformers"],
    }))


AUDIO = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
             num_mel_bins=128, max_source_positions=1500)  # intermediate = 4 * hidden (transformers' adapter)
AUDIO_TEXT = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)
AUDIO_SECONDS = 60.0  # two 30-s chunks


def bench_audio(repeats: int) -> dict:
    """Voxtral's audio path: log-mel features (ours vs WhisperFeatureExtractor) and encoder + adapter (ours vs
    `VoxtralForConditionalGeneration.get_audio_features`), in audio seconds per second."""
    import numpy as np
    import torch
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import sinusoids

    from tramontane.models.audio import audio_features, load_voxtral

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = VoxtralConfig(audio_config=dict(model_type="voxtral_encoder", **AUDIO),
                           text_config=dict(model_type="llama", **AUDIO_TEXT), audio_token_id=24)
    with tempfile.TemporaryDirectory() as tmp:
        model = VoxtralForConditionalGeneration(config).eval()
        with torch.no_grad():  # what released checkpoints store; a fresh model holds random numbers
            model.model.audio_tower.embed_positions.weight.copy_(sinusoids(1500, AUDIO["hidden_size"]))
        model.save_pretrained(tmp)
        ours = load_voxtral(Path(tmp))
        theirs = VoxtralForConditionalGeneration.from_pretrained(tmp).eval()

    t = np.arange(int(AUDIO_SECONDS * 16_000)) / 16_000
    wave = (0.3 * np.sin(2 * np.pi * (100 * t + 30 * t**2))
            + 0.05 * np.random.default_rng(0).standard_normal(t.shape)).astype(np.float32)
    extractor = WhisperFeatureExtractor(feature_size=128)

    def hf_features() -> torch.Tensor:
        out = extractor(wave, sampling_rate=16_000, padding=True, truncation=False,
                        pad_to_multiple_of=480_000, return_tensors="pt")["input_features"]
        return out.reshape(128, -1, 3000).transpose(0, 1)

    features = hf_features()
    runs = {
        "features": {"tramontane": lambda: audio_features(wave, ours.audio_args),
                     "transformers": hf_features},
        "encoder": {"tramontane": lambda: ours.embed_audio(features),
                    "transformers": lambda: theirs.get_audio_features(features).pooler_output},
    }
    results: dict = {}
    with torch.no_grad():
        for stage, pair in runs.items():
            diff = (pair["tramontane"]() - pair["transformers"]()).abs().max().item()
            if diff > 1e-3:
                raise SystemExit(f"audio {stage} outputs differ by {diff}: not the same computation")
            results[stage] = {"max_abs_diff": diff}
            for name, run in pair.items():
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                results[stage][name] = AUDIO_SECONDS / statistics.median(times)
                print(f"audio {stage:>8} {name:>12}: {results[stage][name]:.1f} audio-s/s "
                      f"(median of {repeats})")
            results[stage]["ratio"] = results[stage]["tramontane"] / results[stage]["transformers"]
    return {"benchmark": "voxtral_audio", "audio_seconds": AUDIO_SECONDS, "config": AUDIO, "threads": 2,
            "machine": platform.processor() or platform.machine(), "audio_seconds_per_s": results}


if __name__ == "__main__":
    main()
