"""The package's one native CPU kernel: the W8A8 linear of `models.quant`, built at first use.

`csrc/w8a8_linear.c` (its header comment says what it computes) is compiled by the system C compiler (`$CC`,
else `cc`, `gcc` or `clang`) with `-O3 -march=native -fopenmp` into a cache directory
(`$TRAMONTANE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/tramontane/kernels`, else `~/.cache/tramontane/kernels`),
in a folder whose name hashes the source, the compiler, the flags and this CPU's feature flags, so a cache
shared between machines never hands one a binary built for another. The build takes about a second; the folder
is written atomically (`files.write_dir_atomic`), so processes building at once cannot load half a file.
It is loaded with ctypes, which releases the GIL during the call (the server's threads keep running).

OpenMP: the library asks for `libgomp.so.1`, the soname of the runtime torch already loaded, so the dynamic
loader hands it torch's copy and the kernel's threads are torch's threads, not a second pool competing with
them. Its thread count is `torch.get_num_threads()`.

Why a kernel of its own: at one row (decoding) fbgemm's linear is as fast on the same bytes, but every call
through it costs about 50 us of torch bookkeeping (the row's range, the op's dispatch, reshapes), and a decode
step makes dozens of calls. One ctypes call quantizes the rows and multiplies them in 10-25 us less than that
for the small layers. The results are bit-identical to fbgemm's (integer sums, the same rounding), so a model
gives the same tokens with or without the kernel.

When there is no compiler, the build fails, or `TRAMONTANE_NATIVE_KERNELS=0`, `w8a8_kernel()` is None and W8A8
runs through fbgemm as before; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from tramontane.files import write_dir_atomic

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "w8a8_linear.c"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11")
OPENMP_FLAG = "-fopenmp"
BUILD_TIMEOUT_S = 120
DISABLE_ENV = "TRAMONTANE_NATIVE_KERNELS"


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("TRAMONTANE_KERNEL_CACHE"):
        return Path(os.environ["TRAMONTANE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tramontane" / "kernels"


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    """This CPU's feature flags as the kernel's -march=native sees them (the x86 'flags' line, the Arm
    'Features' line), for the cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(compiler: str, flags: tuple[str, ...], directory: Path) -> Path:
    """Compile the kernel with `flags` (or reuse an earlier build with the same key); returns the library's
    path. Raises RuntimeError with the compiler's message when it fails."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:20]
    library = directory / f"w8a8_linear-{key}" / "w8a8_linear.so"
    if library.exists():
        return library

    def compile_into(folder: Path) -> None:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(folder / library.name), "-lm"],
                                capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")

    write_dir_atomic(library.parent, compile_into)
    return library


class W8A8Kernel:
    """The loaded library: `linear(x, qweight, wscale, colsum)` -> x W^T, see csrc/w8a8_linear.c."""

    def __init__(self, path: Path, threaded: bool) -> None:
        self.path, self.threaded = path, threaded
        self._lib = ctypes.CDLL(str(path))  # CDLL (not PyDLL): the GIL is released during calls
        fn = self._lib.tramontane_w8a8_linear
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._fn = fn
        self.avx2 = bool(self._lib.tramontane_w8a8_has_avx2())

    def __deepcopy__(self, memo: dict[int, Any]) -> W8A8Kernel:
        return self  # a loaded library without state: copies of a layer share it

    def __reduce__(self) -> tuple[Any, ...]:
        return W8A8Kernel, (self.path, self.threaded)

    def linear(self, x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
               colsum: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 contiguous CPU; qweight [N, K] int8, wscale [N] float32, colsum [N] int32, all
        contiguous -> [M, N] float32."""
        rows, width = x.shape
        out_features = qweight.shape[0]
        out = torch.empty(rows, out_features)
        if rows:
            code = self._fn(x.data_ptr(), rows, width, qweight.data_ptr(), out_features, wscale.data_ptr(),
                            colsum.data_ptr(), out.data_ptr(), torch.get_num_threads() if self.threaded else 1)
            if code:
                raise MemoryError(f"the W8A8 kernel could not allocate its {rows}x{width} work buffer")
        return out


def load(compiler: str | None = None, flags: tuple[str, ...] = FLAGS, directory: Path | None = None) -> W8A8Kernel:
    """Build (or reuse) and load the kernel; with OpenMP when the compiler has it, without otherwise.
    Raises RuntimeError when no compiler is found or the build fails."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    directory = directory or cache_dir()
    try:
        return W8A8Kernel(build(compiler, (*flags, OPENMP_FLAG), directory), threaded=True)
    except RuntimeError as threaded_error:
        logger.info("building the W8A8 kernel with OpenMP failed (%s); building it single-threaded",
                    threaded_error)
        return W8A8Kernel(build(compiler, flags, directory), threaded=False)


@functools.cache
def w8a8_kernel() -> W8A8Kernel | None:
    """The W8A8 kernel of this process, built on first call; None when it is disabled or cannot be built (the
    reason is logged once), and W8A8 then runs through fbgemm."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        kernel = load()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        logger.warning("the native W8A8 kernel is not available (%s); W8A8 layers run through fbgemm", error)
        return None
    logger.info("native W8A8 kernel: %s (%s, %s)", kernel.path, "AVX2" if kernel.avx2 else "portable C",
                "OpenMP" if kernel.threaded else "one thread")
    return kernel


def describe() -> dict[str, Any]:
    """What the benchmarks record about the kernel."""
    kernel = w8a8_kernel()
    if kernel is None:
        return {"native_w8a8": None}
    return {"native_w8a8": {"avx2": kernel.avx2, "openmp": kernel.threaded}}
