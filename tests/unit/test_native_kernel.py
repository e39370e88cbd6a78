"""The native W8A8 kernel (`models.native`, csrc/w8a8_linear.c) against fbgemm's quantized linear on the same
int8 weights and the same activation ranges: bit for bit, for every shape, row count, range, thread count and
instruction set, and a whole model's logits."""

from __future__ import annotations

import copy
import math
import os
import platform
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import random_model, tiny_args
import tramontane.models.quant as quant
from tramontane.models import native
from tramontane.models.quant import HAS_DYNAMIC_INT8, Int8Linear, QuantConfig, _dynamic_int8_linear, quantize_model

pytestmark = pytest.mark.skipif(not HAS_DYNAMIC_INT8, reason="torch's fbgemm quantized engine (the oracle) is missing")


@pytest.fixture(scope="module")
def kernel() -> native.W8A8Kernel:
    loaded = native.w8a8_kernel()
    if loaded is None:
        if os.environ.get("CI"):
            pytest.fail("the native W8A8 kernel did not build: CI installs gcc (.ci/run)")
        pytest.skip("no C compiler here: the native W8A8 kernel cannot be built")
    return loaded


def _layer(out_f: int, in_f: int, seed: int) -> tuple[Int8Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A W8A8 layer packed for fbgemm (whether or not the native kernel is there), and the native kernel's
    operands for the same weight: (qweight, float32 row scales, int32 row sums)."""
    torch.manual_seed(seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant, "w8a8_kernel", lambda: None)
        layer = Int8Linear.from_float(nn.Linear(in_f, out_f, bias=False), dynamic_activations=True)
    assert layer.w8a8_kernel == "fbgemm"
    q = layer.values().contiguous()
    return layer, q, layer.scales.float().contiguous(), q.sum(dim=1, dtype=torch.int32)


def _inputs(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of many ranges: ordinary, 1e3 and 1e-3 times wider, tiny (1e-30), zero, exactly on the range grid,
    and rows of exact half steps (where rounding x / scale and fma(x, 1 / scale, zp) disagree)."""
    x = torch.randn(rows, width, generator=gen) * 2.0 ** torch.randint(-8, 9, (rows, 1), generator=gen)
    if rows > 1:
        x[1] *= 1e3
    if rows > 2:
        x[2] = torch.randn(width, generator=gen) * 1e-30
    if rows > 3:
        x[3] = 0.0
    if rows > 4:
        bound = math.ldexp(1.4142136573791504, 3)
        scale = torch.tensor(2 * bound / 127, dtype=torch.float32)
        x[4] = (torch.randint(-63, 63, (width,), generator=gen) + 0.5) * scale
        x[4, 0] = bound
    return x


@pytest.mark.parametrize("out_f, in_f", [(96, 128), (33, 100), (256, 64), (7, 31), (512, 768)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17, 64])
def test_native_kernel_equals_fbgemm_bit_for_bit(kernel, out_f, in_f, rows):
    layer, q, wscale, colsum = _layer(out_f, in_f, seed=out_f + rows)
    gen = torch.Generator().manual_seed(rows * 1000 + in_f)
    for _ in range(3):
        x = _inputs(rows, in_f, gen)
        expected = _dynamic_int8_linear(x, layer.fbgemm, out_f)
        assert torch.equal(kernel.linear(x, q, wscale, colsum), expected)


def test_native_kernel_results_do_not_depend_on_threads_or_batch(kernel):
    layer, q, wscale, colsum = _layer(300, 320, seed=1)
    x = _inputs(24, 320, torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(kernel.linear(x, q, wscale, colsum))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(out, outs[0]) for out in outs)
    alone = torch.cat([kernel.linear(x[i:i + 1].contiguous(), q, wscale, colsum) for i in range(24)])
    assert torch.equal(alone, outs[0])
    assert kernel.linear(x[:0], q, wscale, colsum).shape == (0, 300)


def test_portable_build_equals_the_vector_build(kernel, tmp_path):
    """The plain-C path (built without AVX2) gives the same bits as fbgemm and as the AVX2 path."""
    flags = tuple(f for f in native.FLAGS if not f.startswith("-march"))
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ("-mno-avx2",)
    portable = native.load(flags=flags, directory=tmp_path)
    assert not portable.avx2
    layer, q, wscale, colsum = _layer(70, 96, seed=3)
    x = _inputs(9, 96, torch.Generator().manual_seed(4))
    expected = _dynamic_int8_linear(x, layer.fbgemm, 70)
    assert torch.equal(portable.linear(x, q, wscale, colsum), expected)
    assert torch.equal(kernel.linear(x, q, wscale, colsum), expected)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_kernel_shares_torchs_openmp_runtime(kernel):
    """The kernel's OpenMP threads are torch's: its `libgomp.so.1` resolves to the copy torch loaded, so the
    process holds one runtime of that name, not a second pool. (Wheels that bundle a renamed copy, such as
    sentencepiece's libgomp-<hash>.so, are another name and not counted.)"""
    if not kernel.threaded:
        pytest.skip("the kernel was built without OpenMP")
    maps = Path("/proc/self/maps").read_text().splitlines()
    paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    gomps = {path for path in paths if Path(path).name.startswith("libgomp.so")}
    assert len(gomps) == 1, gomps
    assert any(str(kernel.path) == path for path in paths)  # the kernel is mapped, i.e. loaded


def test_build_reuses_the_cache_and_reports_compiler_errors(kernel, tmp_path):
    first = native.build(native.find_compiler() or "cc", native.FLAGS, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(native.find_compiler() or "cc", native.FLAGS, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="failed"):
        native.build(native.find_compiler() or "cc", ("-fno-such-flag-here",), tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == [first.parent.name]  # nothing half-written is left


def test_disabled_kernel_falls_back_to_fbgemm(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native.w8a8_kernel.cache_clear()
    try:
        assert native.w8a8_kernel() is None
        layer = Int8Linear.from_float(nn.Linear(64, 32, bias=False), dynamic_activations=True)
        assert layer.w8a8_kernel == "fbgemm" and layer.qweight is None
    finally:
        native.w8a8_kernel.cache_clear()


def test_whole_model_logits_equal_with_either_kernel(kernel, monkeypatch):
    """A W8A8 model (head and embeddings int8 too) gives identical logits through the native kernel and
    through fbgemm, at prefill and at one-token steps."""
    base = random_model(tiny_args(), seed=5)
    config = QuantConfig("int8", activations="int8", output=True)
    fast = quantize_model(copy.deepcopy(base), config).eval()
    assert fast.layers[0].attention.wq.w8a8_kernel == "native"
    monkeypatch.setattr(quant, "w8a8_kernel", lambda: None)
    slow = quantize_model(copy.deepcopy(base), config).eval()
    assert slow.layers[0].attention.wq.w8a8_kernel == "fbgemm"
    tokens = torch.randint(0, tiny_args().vocab_size, (2, 19), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(fast(tokens), slow(tokens))
        assert torch.equal(fast(tokens[:1, :1]), slow(tokens[:1, :1]))
