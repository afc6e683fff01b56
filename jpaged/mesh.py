"""Mesh config: `tensor_parallel_size` / `mesh={"dp": D, "tp": T}` -> a `jax.sharding.Mesh`.

Every mesh jpaged builds has the axes `MESH_AXES` = ("dp", "tp") (named once, in
`models.sharding`); a tensor-parallel engine runs on a (1, T) mesh, and a dp=D, tp=T mesh
is D such sub-meshes (`replica_meshes`), one per data-parallel replica.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.sharding import DP_AXIS, MESH_AXES, TP_AXIS

MeshSpec = Mapping[str, int] | str | None


def parse_mesh(value: MeshSpec) -> dict[str, int]:
    """`"dp=2,tp=4"` or `{"dp": 2, "tp": 4}` -> {"dp": 2, "tp": 4}; missing axes are 1.

    Raises ValueError naming `mesh` for unknown axes, repeated axes or sizes < 1.
    """
    if value is None:
        return {DP_AXIS: 1, TP_AXIS: 1}
    if isinstance(value, str):
        items: list[tuple[str, Any]] = []
        for part in value.split(","):
            name, sep, size = part.partition("=")
            if not sep or not size.strip().isdigit():
                raise ValueError(f"mesh must look like dp=2,tp=4, got {value!r}")
            items.append((name.strip(), int(size)))
        if len({n for n, _ in items}) != len(items):
            raise ValueError(f"mesh names an axis twice, got {value!r}")
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise ValueError(f"mesh must be a dict or a string like dp=2,tp=4, got {value!r}")
    out = {DP_AXIS: 1, TP_AXIS: 1}
    for name, size in items:
        if name not in out:
            raise ValueError(f"mesh axis {name!r} is unknown (axes: {', '.join(MESH_AXES)})")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh axis {name} must be an int >= 1, got {size!r}")
        out[name] = size
    return out


def mesh_shape(tensor_parallel_size: int, mesh: MeshSpec) -> tuple[int, int]:
    """(dp, tp) from the two options; ValueError when they disagree on tp."""
    axes = parse_mesh(mesh)
    tp = axes[TP_AXIS]
    if tensor_parallel_size != 1 and mesh is not None and tp != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} disagrees with mesh tp={tp}")
    return axes[DP_AXIS], max(tp, tensor_parallel_size)


def build_mesh(dp: int, tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (dp, tp) mesh over the first dp * tp devices (all processes' devices under
    `jax.distributed`); tp devices of a replica are adjacent in `jax.devices()` order.

    Raises ValueError naming `mesh` when there are too few devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if dp * tp > len(devices):
        raise ValueError(
            f"mesh dp={dp},tp={tp} needs {dp * tp} devices but {len(devices)} are visible "
            "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts)"
        )
    grid = np.empty((dp, tp), dtype=object)
    for i, device in enumerate(devices[: dp * tp]):
        grid[i // tp, i % tp] = device
    return Mesh(grid, MESH_AXES)


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """The (1, tp) sub-mesh of each data-parallel replica, same axis names."""
    return [Mesh(mesh.devices[d : d + 1], MESH_AXES) for d in range(mesh.devices.shape[0])]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_global(tree: Any, mesh: Mesh) -> Any:
    """Host numpy leaves -> replicated global arrays (needed when the mesh spans processes;
    every process passes the same values)."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx]), tree
    )
