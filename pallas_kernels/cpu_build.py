"""Build and register the C++ XLA FFI kernels of the CPU backends.

Each kernel is one C++ source (plus the shared `cpu_kernels.h`) compiled on first use with the system compiler (`$CXX`, else
`g++`, `-O3 -march=native`) into `build_dir`, keyed by the source, flags, compiler, jaxlib and
CPU, so later processes only load it. A failed build is logged and reported as False, so the
callers can fall back to plain XLA.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_building: dict[str, threading.Thread] = {}


def cpu_flags() -> str:
    """The `flags` line of /proc/cpuinfo (or the processor name where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str, source: Path, build_dir: Path) -> Path:
    import jaxlib

    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # cpu_kernels.h
    key = hashlib.sha256(
        "\0".join(
            [source.read_text(), *headers, " ".join(FLAGS), version, jaxlib.__version__,
             cpu_flags()]
        ).encode()
    ).hexdigest()[:16]  # fmt: skip
    out = build_dir / f"{source.stem}-{key}.so"
    if out.exists():
        return out
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


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build_in_background(sources: list[Path], build_dir: Path) -> None:
    """Start compiling `sources` in threads (the compiler runs outside the GIL), so a cold
    start overlaps the builds with loading the model; `load_kernel` waits for them."""
    compiler = _compiler()
    if compiler is None:
        return

    def build(source: Path) -> None:
        try:
            _build(compiler, source, Path(build_dir))
        except (OSError, subprocess.CalledProcessError):
            pass  # load_kernel builds again and reports the error

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
        compiler = _compiler()
        lib = None
        try:
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set CXX)")
            lib = ctypes.CDLL(str(_build(compiler, source, Path(build_dir))))
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


def is_loaded(source: Path) -> bool:
    """Whether `load_kernel(source, ...)` has succeeded in this process."""
    return _loaded.get(str(source)) is not None
