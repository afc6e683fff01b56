"""Build every C++ CPU kernel ahead of the first start: `python -m pallas_kernels.prebuild`.

`make venv` runs it, so that a cold start loads the kernels instead of compiling them
(~12 CPU-s on two cores). It writes into `cpu_build.installed_dir()`, which `load_kernel`
searches before the cache.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pallas_kernels import cpu_build, linear_cpu, paged_attention_cpu, sampling_cpu

SOURCES = (paged_attention_cpu.SOURCE, linear_cpu.SOURCE, sampling_cpu.SOURCE)


def main(argv: list[str] | None = None) -> int:
    """`python -m pallas_kernels.prebuild [DIR]`: build every CPU kernel into DIR (default
    `cpu_build.installed_dir()`), two at a time; prints each library. Exit 1 if any build fails."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dir", nargs="?", type=Path, default=cpu_build.installed_dir())
    args = parser.parse_args(argv)
    compiler = cpu_build.find_compiler()
    if compiler is None:
        print("no C++ compiler found (set CXX); kernels will fall back to XLA", file=sys.stderr)
        return 1

    def build(source: Path) -> str:
        return str(cpu_build.find_or_build(compiler, source, args.dir, prebuilt=False))

    failed = 0
    with ThreadPoolExecutor(2) as pool:
        for source, future in [(s, pool.submit(build, s)) for s in SOURCES]:
            try:
                print(future.result())
            except (OSError, subprocess.CalledProcessError) as err:
                failed += 1
                detail = getattr(err, "stderr", "") or str(err)
                print(f"{source.name}: build failed: {detail[-2000:]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
