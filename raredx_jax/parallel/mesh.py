"""Device mesh from config: axes (data, fsdp, tensor); -1 takes all remaining devices."""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolve -1 entries and check the product equals the device count, naming the field on error."""
    sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {', '.join('mesh.' + a for a in free)}")
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{a}: must be a positive size or -1 (got {s})")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh.{free[0]}=-1: {num_devices} devices are not divisible by the other axes "
                             f"({fixed})")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} but there are {num_devices} "
                         f"devices (mesh.data={sizes['data']}, mesh.fsdp={sizes['fsdp']}, "
                         f"mesh.tensor={sizes['tensor']})")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over all (global) devices; tensor is the innermost axis so it stays within a host."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def single_device_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
