"""Build and register the C++ XLA FFI kernels of the CPU backends.

Each kernel is one C++ source (plus the shared `cpu_kernels.h`) compiled with the system
compiler (`$CXX`, else `g++`, `-O3 -march=native`), keyed by the source, flags, jaxlib and CPU.
Installing builds them ahead (`python -m pallas_kernels.prebuild`, run by `make venv`) into
`installed_dir()`; a kernel not found there is compiled on first use into the caller's
`build_dir` (the cache), so later processes only load it. A failed build is logged and
reported as False, so the callers can fall back to plain XLA.
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
import sys
import tempfile
import threading
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_building: dict[str, threading.Thread] = {}


@functools.cache
def cpu_flags() -> str:
    """The `flags` line of /proc/cpuinfo (or the processor name where there is none); read
    once per process."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_fma_simd() -> bool:
    """Whether the CPU has the vector FMA paths every kernel has: AVX-512F, or AVX2 + FMA."""
    flags = set(cpu_flags().split())
    return "avx512f" in flags or {"avx2", "fma"} <= flags


def installed_dir() -> Path:
    """Where installing puts the prebuilt kernels: `$JPAGED_KERNELS_DIR`, else
    `<sys.prefix>/share/jpaged/kernels` (inside the virtual environment)."""
    explicit = os.environ.get("JPAGED_KERNELS_DIR")
    return Path(explicit) if explicit else Path(sys.prefix) / "share" / "jpaged" / "kernels"


def library_name(source: Path) -> str:
    """`<stem>-<key>.so`, the key hashing what the library depends on: the source and headers,
    the flags, jaxlib (the FFI ABI) and the CPU (`-march=native`)."""
    import jaxlib

    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # cpu_kernels.h
    parts = [source.read_text(), *headers, " ".join(FLAGS), jaxlib.__version__, cpu_flags()]
    return f"{source.stem}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"


def find_or_build(
    compiler: str | None, source: Path, build_dir: Path, *, prebuilt: bool = True
) -> Path:
    """The library of `source`: prebuilt (unless `prebuilt` is False), else in `build_dir`,
    else compiled there. RuntimeError with no compiler, CalledProcessError on a failed build."""
    name = library_name(source)
    for out in ([installed_dir() / name] if prebuilt else []) + [build_dir / name]:
        if out.exists():
            return out
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX) and no prebuilt kernel")
    return compile_kernel(compiler, source, build_dir / name)


def compile_kernel(compiler: str, source: Path, out: Path) -> Path:
    """Compile `source` into the shared library `out` (atomically); CalledProcessError on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        subprocess.run(
            [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(tmp_out)],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(tmp_out, out)  # atomic: concurrent builders never see a partial file
    return out


def find_compiler() -> str | None:
    """`$CXX`, else `g++`, else `c++` on the PATH; None where there is none."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build_in_background(sources: list[Path], build_dir: Path) -> None:
    """Start compiling `sources` in threads (the compiler runs outside the GIL), so a cold
    start overlaps the builds with loading the model; `load_kernel` waits for them."""
    compiler = find_compiler()

    def build(source: Path) -> None:
        try:
            find_or_build(compiler, source, Path(build_dir))
        except (OSError, RuntimeError, subprocess.CalledProcessError):
            pass  # load_kernel tries again and reports the error

    with _lock:
        for source in sources:
            if str(source) not in _loaded and str(source) not in _building:
                thread = threading.Thread(target=build, args=(source,), daemon=True)
                _building[str(source)] = thread
                thread.start()


def load_kernel(source: Path, targets: dict[str, str], build_dir: Path) -> bool:
    """Build `source` (once per machine) and register its handlers with XLA.

    targets: FFI target name -> exported handler symbol. Returns False (and logs why) where
    no C++ compiler or no working build exists; the answer is remembered per source.
    """
    building = _building.get(str(source))
    if building is not None:
        building.join()
    with _lock:
        if str(source) in _loaded:
            return _loaded[str(source)] is not None
        lib = None
        try:
            lib = ctypes.CDLL(str(find_or_build(find_compiler(), source, Path(build_dir))))
            for target, symbol in targets.items():
                jax.ffi.register_ffi_target(
                    target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                )
        except (OSError, RuntimeError, AttributeError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            logger.warning("C++ kernel %s unavailable: %s", source.name, detail[-2000:])
            lib = None
        _loaded[str(source)] = lib  # keeps the library loaded
        return lib is not None


def loaded_library(source: Path) -> ctypes.CDLL | None:
    """The library `load_kernel(source, ...)` loaded in this process, or None."""
    return _loaded.get(str(source))


def is_loaded(source: Path) -> bool:
    """Whether `load_kernel(source, ...)` has succeeded in this process."""
    return _loaded.get(str(source)) is not None
