"""The C++ kernels' build: prebuilt libraries found before the cache, keys that follow the
source, and a clear fallback where neither a library nor a compiler exists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jpaged.paths import kernels_cache_dir
from pallas_kernels import cpu_build, paged_attention_cpu, prebuild

pytestmark = pytest.mark.skipif(
    not paged_attention_cpu.load(kernels_cache_dir()), reason="no C++ compiler on this machine"
)
ROOT = Path(__file__).resolve().parents[1]
LOAD = (
    "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
    "from jpaged.paths import kernels_cache_dir\n"
    "from pallas_kernels import paged_attention_cpu\n"
    "sys.exit(0 if paged_attention_cpu.load(kernels_cache_dir()) else 3)\n"
)


def built_library(source: Path) -> Path:
    """Where this process found `source`'s library: prebuilt, or in the cache."""
    name = cpu_build.library_name(source)
    for directory in (cpu_build.installed_dir(), kernels_cache_dir()):
        if (directory / name).exists():
            return directory / name
    raise AssertionError(f"{name} is neither prebuilt nor cached")


def run_load(tmp_path: Path, kernels_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        CXX=str(tmp_path / "no-such-compiler"),  # any build attempt fails
        JPAGED_CACHE_DIR=str(tmp_path / "cache"),
        JPAGED_KERNELS_DIR=str(kernels_dir),
        PYTHONPATH=str(ROOT),
    )
    return subprocess.run(
        [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120
    )


def test_prebuilt_library_loads_without_a_compiler(tmp_path):
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    library = built_library(paged_attention_cpu.SOURCE)
    shutil.copy(library, prebuilt / library.name)
    done = run_load(tmp_path, prebuilt)
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing built or cached


def test_no_library_and_no_compiler_falls_back_with_a_warning(tmp_path):
    done = run_load(tmp_path, tmp_path / "empty")
    assert done.returncode == 3, done.stderr
    assert "paged_attention_cpu.cc unavailable" in done.stderr
    assert "no-such-compiler" in done.stderr


def test_library_name_follows_the_source(tmp_path):
    source = tmp_path / paged_attention_cpu.SOURCE.name
    shutil.copy(paged_attention_cpu.SOURCE, source)
    for header in paged_attention_cpu.SOURCE.parent.glob("*.h"):  # every header is in the key
        shutil.copy(header, tmp_path)
    assert cpu_build.library_name(source) == cpu_build.library_name(paged_attention_cpu.SOURCE)
    source.write_text(source.read_text() + "\n// changed\n")
    assert cpu_build.library_name(source) != cpu_build.library_name(paged_attention_cpu.SOURCE)
    (tmp_path / "cpu_kernels.h").write_text("// changed header\n")
    changed_header = cpu_build.library_name(source)
    assert changed_header.startswith("paged_attention_cpu-") and changed_header.endswith(".so")
    assert changed_header != cpu_build.library_name(paged_attention_cpu.SOURCE)


def test_prebuild_keeps_libraries_already_built(tmp_path, monkeypatch, capsys):
    sources = prebuild.SOURCES
    for source in sources:
        library = built_library(source)
        shutil.copy(library, tmp_path / library.name)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert prebuild.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / cpu_build.library_name(s)) for s in sources]


def test_prebuild_reports_a_failed_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert prebuild.main([str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert all(f"{s.name}: build failed" in err for s in prebuild.SOURCES)
