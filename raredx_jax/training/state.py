"""The train state every trainer checkpoints: step, fp32 master parameters, optimiser state and RNG key.

Parameters are the model's pure parameter dict (`nnx.state(model, nnx.Param).to_pure_dict()`, the layout
`checkpoints/orbax.py` stores), so optax and orbax see plain pytrees and `nnx.merge(graphdef, params)` rebuilds
the module inside the jitted step. Shardings: parameters follow the logical-axis rules, optimiser moments
follow their parameter (`optax.tree_map_params`), counters / step / RNG are replicated. The state is created
directly in its shards (jit with out_shardings) and donated to the train step.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from raredx_jax.models.transformer import Transformer
from raredx_jax.parallel.sharding import DEFAULT_RULES, state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimiser steps taken
    params: Any  # pure dict of arrays (param_dtype, e.g. fp32 master weights)
    opt_state: Any  # optax state; moments shaped and sharded like params
    rng: jax.Array  # uint32 [2]: raw key data (jax.random.wrap_key_data), folded with the step when used

    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def split_model(model: Transformer) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, pure parameter dict). The model must hold parameters only (ours does)."""
    graphdef, state = nnx.split(model)
    return graphdef, state.to_pure_dict()


def abstract_params(cfg: Any, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params as ShapeDtypeStructs with shardings, param shardings) without allocating anything."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules).to_pure_dict()
    shapes = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state.to_pure_dict(),
                          shardings)
    return graphdef, shapes, shardings


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def train_state_shardings(tx: optax.GradientTransformation, params_abstract: Any, param_shardings: Any,
                          mesh: jax.sharding.Mesh) -> TrainState:
    """A TrainState of NamedShardings: optimiser leaves shaped like a parameter take its sharding."""
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    rep = replicated(mesh)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_shardings,
                                          transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)


def abstract_train_state(tx: optax.GradientTransformation, params_abstract: Any,
                         shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the whole state: the restore target."""
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                      params=jax.tree.map(sds, params_abstract, shardings.params),
                      opt_state=jax.tree.map(sds, opt_abstract, shardings.opt_state),
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shardings.rng))


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int,
                       shardings: TrainState) -> TrainState:
    """Fresh state around (already sharded) params; optimiser state is created directly in its shards.

    `params` is consumed (donated): the state holds them from now on.
    """
    def make(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          rng=jax.random.key_data(jax.random.key(seed)))

    return jax.jit(make, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0)(params)


def cast_params(params: Any, param_shardings: Any, dtype: str) -> Any:
    """Params in the master-weight dtype (e.g. a bf16 HF checkpoint trained with fp32 master weights)."""
    dt = jnp.dtype(dtype)
    if all(x.dtype == dt for x in jax.tree.leaves(params)):
        return params
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dt), p), out_shardings=param_shardings)(params)
