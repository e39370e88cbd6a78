"""One W8A8 layer call: the native kernel (`models.native`) against fbgemm's path and float32 `F.linear`.

For the layer shapes of the generation benchmark's ~100M Mistral config (768 -> 768, 768 -> 2560, 2560 -> 768,
and the 768 -> 32768 head), at 1, 16 and 128 rows: microseconds per call of
- `F.linear` on the float32 weight (the anchor: what an unquantized model does),
- fbgemm's W8A8 path as `Int8Linear` runs it without the native kernel (`_dynamic_int8_linear`: the rows'
  ranges, then `quantized::linear_with_input_q_dq_qweight_dq_output_fp32`),
- the native kernel on the same int8 weight (`Int8Linear.forward` with the kernel).
Each timing cycles through enough copies of the layer (at least 64 MB) that the weights come from memory,
not the cache, as in a whole model; the minimum over rounds of the mean per call is kept (the machine is
noisy). Outputs are checked bit-identical first. Ends with one JSON line: native's speedup over fbgemm's path
and over F.linear per shape and row count.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/w8a8_kernel.py [--threads 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import tramontane.models.quant as quant
from tramontane.models.native import describe, w8a8_kernel

SHAPES = [(768, 768), (2560, 768), (768, 2560), (32768, 768)]  # (out, in)
ROWS = (1, 16, 128)
MIN_BYTES = 64_000_000


def per_call_us(calls: list[Callable[[], torch.Tensor]], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - start) / len(calls))
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if w8a8_kernel() is None:
        raise SystemExit("the native W8A8 kernel could not be built here (see the warning above)")
    print(f"machine: {platform.machine()}, {args.threads} threads, kernel {describe()}; microseconds per call "
          f"(min over {args.rounds} rounds)")
    print(f"{'layer (out x in)':<18}{'rows':>6}{'fp32 F.linear':>15}{'fbgemm path':>13}{'native':>9}"
          f"{'native / fbgemm':>17}")
    ratios: dict[str, dict[str, float]] = {"native_vs_fbgemm_path": {}, "native_vs_fp32": {}}
    with torch.no_grad():
        for out_f, in_f in SHAPES:
            copies = max(1, MIN_BYTES // (out_f * in_f))
            dense = [nn.Linear(in_f, out_f, bias=False) for _ in range(copies)]
            native = [quant.Int8Linear.from_float(d, dynamic_activations=True).eval() for d in dense]
            with _without_native():
                packed = [quant.Int8Linear.from_float(d, dynamic_activations=True).eval() for d in dense]
            assert native[0].w8a8_kernel == "native" and packed[0].w8a8_kernel == "fbgemm"
            weights = [d.weight.detach() for d in dense]
            del dense
            for rows in ROWS:
                x = torch.randn(rows, in_f)
                assert torch.equal(native[0](x), packed[0](x))
                us = {
                    "fp32": per_call_us([lambda w=w: F.linear(x, w) for w in weights], args.rounds),
                    "fbgemm": per_call_us([lambda m=m: m(x) for m in packed], args.rounds),
                    "native": per_call_us([lambda m=m: m(x) for m in native], args.rounds),
                }
                key = f"{out_f}x{in_f}@{rows}"
                ratios["native_vs_fbgemm_path"][key] = round(us["fbgemm"] / us["native"], 3)
                ratios["native_vs_fp32"][key] = round(us["fp32"] / us["native"], 3)
                print(f"{out_f} x {in_f:<10}{rows:>6}{us['fp32']:>15.1f}{us['fbgemm']:>13.1f}{us['native']:>9.1f}"
                      f"{us['fbgemm'] / us['native']:>16.2f}x", flush=True)
    print(json.dumps(ratios))


class _without_native:
    """Build layers as they are built where the native kernel is missing (fbgemm's packing)."""

    def __enter__(self) -> None:
        self.saved = quant.w8a8_kernel
        quant.w8a8_kernel = lambda: None  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        quant.w8a8_kernel = self.saved  # type: ignore[assignment]


if __name__ == "__main__":
    main()
