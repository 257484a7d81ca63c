"""Logical-axis sharding: parameters and activations name their axes; a rules table maps names to mesh axes.

One table serves every placement (maxtext style). A dimension that the mapped mesh axes do not divide is
replicated instead (e.g. 2 KV heads over tensor=4), so the same model runs on any mesh.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("cache_len", None),
)


def _axis_size(mesh: jax.sharding.Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for one array; each mesh axis is used at most once, non-divisible dims replicate."""
    table = dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for i, name in enumerate(logical):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"no sharding rule for logical axis {name!r}; known: {sorted(table)}")
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(n for n in names if n in mesh.shape and n not in used and mesh.shape[n] > 1)
        if names and shape is not None and shape[i] % _axis_size(mesh, names):
            names = ()
        used.update(names)
        out.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*out)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Any:
    """NamedShardings for an nnx.State whose Variables carry `axes` metadata (logical names)."""

    def one(var: Any) -> Any:
        axes = var.get_metadata().get("axes")
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if axes is None:
            return var.replace(NamedSharding(mesh, PartitionSpec()))
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules)))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical: Sequence[str | None],
              rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> jax.Array:
    """with_sharding_constraint by logical names under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh, rules))
