"""What one core's AMX does on this machine: TDPBF16PS on resident tiles, tile loads, both.

    .venv/bin/python benchmarks/amx_peak.py [--iters 2000000] [--rounds 3]

Compiles a small C++ loop with g++ (-march=native) and runs it. Per iteration: four
TDPBF16PS into four accumulators (the 2 x 2 blocking of linear_cpu.cc's AMX kernel), four
1 KB tile loads from L1, or both. The "both" figure is what a GEMM whose operands sit in L1
could reach at best; compare the prefill linears' TFLOP/s (benchmarks/linear_cpu.py).
Prints one JSON line per (round, mode); needs a CPU with AMX-BF16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
struct alignas(64) Cfg { uint8_t palette, start, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
alignas(64) uint16_t tiles[4][512];
int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return 2;
  Cfg cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
  for (auto& t : tiles) for (auto& v : t) v = 0x3f80;
  const long n = std::atol(argv[1]);
  const char* names[3] = {"tdp_only", "loads_only", "both"};
  for (int mode = 0; mode < 3; ++mode) {
    _tile_loadd(4, tiles[0], 64); _tile_loadd(5, tiles[1], 64);
    _tile_loadd(6, tiles[2], 64); _tile_loadd(7, tiles[3], 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; ++i) {
      if (mode != 1) {
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      if (mode != 0) {
        _tile_loadd(4, tiles[0], 64); _tile_loadd(5, tiles[1], 64);
        _tile_loadd(6, tiles[2], 64); _tile_loadd(7, tiles[3], 64);
      }
    }
    _tile_stored(0, tiles[0], 64);  // keep the accumulators live
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s %.6f\n", names[mode], s);
  }
  _tile_release();
  return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "amx_peak.cc", Path(tmp) / "amx_peak"
        src.write_text(SOURCE)
        subprocess.run(["g++", "-O2", "-march=native", "-o", str(exe), str(src)], check=True)
        for r in range(args.rounds):
            run = subprocess.run([str(exe), str(args.iters)], capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"amx_peak failed (rc {run.returncode}): no AMX here?")
            for line in run.stdout.split("\n"):
                if not line:
                    continue
                mode, seconds = line.split()
                s = float(seconds)
                tdps = 0 if mode == "loads_only" else 4 * args.iters
                print(json.dumps({
                    "bench": "amx_peak", "round": r, "mode": mode,
                    "ns_per_iter": round(s / args.iters * 1e9, 1),
                    "tflop_s_one_core": round(tdps * 2 * 16 * 16 * 32 / s / 1e12, 2),
                    "cmd": " ".join([".venv/bin/python", *sys.argv]),
                }))  # fmt: skip


if __name__ == "__main__":
    main()
