"""LoRA and QLoRA: low-rank adapters on chosen projections of a frozen (optionally nf4/int8-quantised) base.

Why not `qwix.apply_lora_to_model` itself
-----------------------------------------
qwix's `LoraProvider` intercepts `jnp.einsum` / `lax.dot_general` inside a module's `__call__`, matches a rule
by module path and op name, then asks `flax_util.find_param(rhs)` which parameter of *the current module* the
weight operand is (by object identity, by walking unary ops back to the parameter, or by a unique shape), and
creates `<name>_lora_a/_b` beside it. Our decoder keeps every layer's weights stacked on a leading `layers` axis
(`DecoderLayers`, no `__call__` of its own) and applies them inside `lax.scan` from `Transformer.__call__`, so at
the einsum the weight is a per-layer scan slice: its identity and shape no longer match any parameter, and all
seven projections share one module path. Tried on a small Qwen2-shaped model (qwix 0.1.8): with `scan_layers=True`
qwix raises `TraceContextError` (it tries to create variables inside the scan); unrolled, it adapts only
`embed_tokens` and `lm_head` and never one projection. Making qwix see projections would mean one module per
projection per layer: a different parameter layout, another HF mapping, and no scan.

So the adapters are ours, in the model's own layout, and qwix does what it is for here, the quantisation:
* each targeted projection `W [L, in..., out...]` gets `W_lora_a [L, in..., r]` (qwix `LoraRule`'s default
  initialiser, he-uniform over the fan-in, per layer) and `W_lora_b [L, r, out...]` (zeros), stored as
  `nnx.LoRAParam` on `DecoderLayers`; being `nnx.Param` subclasses they are scanned with the weights (no change
  to the KV cache or the scan), and `nnx.LoRAParam` is the filter of what trains (`TRAINABLE`);
* the layer computes `einsum(x, W) + (alpha / r) * einsum(einsum(dropout(x), A), B)` (the low-rank path never
  forms `A @ B`: no weight-sized gradient), in `models/transformer.py::_proj`, the only hook in the model;
* QLoRA: the base projections are stored as qwix `QArray`s (`qwix.quantize`: `nf4` in blocks of
  `lora.block_size` along the input axis, or `int8` per output channel), with the layer axis kept per-channel
  so the scan slices them like any weight; each layer dequantises its own slice (`qwix.dequantize`) just
  before use, so one layer's weights exist in the compute dtype at a time.

The frozen base doubles as GRPO's reference model (the same arrays without the adapter entries: `base_only`),
checkpoints hold the adapters only, and export writes the merged model (`merged_params`) and the adapter in
PEFT's format (`write_peft_adapter`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import save_file

from raredx_jax import fileio
from raredx_jax.checkpoints import hf_io
from raredx_jax.checkpoints import orbax as orbax_io
from raredx_jax.checkpoints.hf_io import abstract_model, to_host  # to_host gathers a sharded array across hosts
from raredx_jax.checkpoints.orbax import PARAMS_ITEM, read_checkpoint_meta, read_model_config, resolve_model_checkpoint
from raredx_jax.models.transformer import Transformer
from raredx_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# einsum of each projection in models/transformer.py::_block (activations, per-layer weight)
EQUATIONS = {"q_proj": "bte,ehd->bthd", "k_proj": "bte,ekd->btkd", "v_proj": "bte,ekd->btkd",
             "o_proj": "bthd,hde->bte", "gate_proj": "bte,em->btm", "up_proj": "bte,em->btm",
             "down_proj": "btm,me->bte"}
# the module names transformers / PEFT use for each projection
HF_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"}
QUANTIZE = ("none", "int8", "nf4")
SUFFIXES = ("_lora_a", "_lora_b")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINABLE = nnx.LoRAParam  # the nnx filter of what a LoRA run trains (everything else is frozen)
_RANK = "r"  # the rank's einsum letter (unused by EQUATIONS)
# qwix.LoraRule's default `lora_a_initializer` (he_uniform) applied to each layer of a stacked [L, fan_in, r]
_A_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,))


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The `lora` config section (configs/base.py), validated."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    quantize: str = "none"
    block_size: int = 64

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"lora.{field}: {why} (got {getattr(self, field)!r})")

        if not isinstance(self.rank, int) or self.rank <= 0:
            bad("rank", "must be a positive integer")
        if not self.alpha > 0:
            bad("alpha", "must be positive")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if not self.targets or any(t not in TARGETS for t in self.targets) or len(set(self.targets)) != len(
                self.targets):
            bad("targets", f"a non-empty comma-separated subset of {','.join(TARGETS)} without repeats")
        if self.quantize not in QUANTIZE:
            bad("quantize", f"expected one of {QUANTIZE}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            bad("block_size", "must be a positive integer")

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    @classmethod
    def from_config(cls, config: Any) -> "LoraSettings | None":
        """The settings of `config.lora`, or None when LoRA is off (or the config has no lora section)."""
        c = config.get("lora", None) if hasattr(config, "get") else None
        if c is None or not bool(c.get("enabled", False)):
            return None
        kw = {f.name: c.get(f.name, f.default) for f in dataclasses.fields(cls)}  # the dataclass holds the defaults
        if isinstance(kw["targets"], str):
            kw["targets"] = tuple(t.strip() for t in kw["targets"].split(",") if t.strip())
        return cls(rank=int(kw["rank"]), alpha=float(kw["alpha"]), dropout=float(kw["dropout"]),
                   targets=tuple(kw["targets"]), quantize=str(kw["quantize"]), block_size=int(kw["block_size"]))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d


class LoraConst(nnx.Param):
    """A frozen per-layer constant the decoder block reads with its weights (adapter scale; dropout rate and key
    while training). A `Param` so that `DecoderLayers.stacked()` scans it; never trained (not a LoRAParam)."""


def _split_eq(eq: str) -> tuple[str, str, str, str, str]:
    """(x letters, w letters, out letters, contracted letters, weight output letters) of a projection."""
    ins, out = eq.split("->")
    x, w = ins.split(",")
    contract = "".join(c for c in w if c in x)
    wout = "".join(c for c in w if c not in x)
    return x, w, out, contract, wout


def lora_delta(eq: str, x: jax.Array, p: dict[str, jax.Array], name: str) -> jax.Array:
    """(alpha / r) * ((dropout(x) @ A) @ B) for projection `name` of one layer (p: that layer's weights)."""
    xs, _, out, contract, wout = _split_eq(eq)
    a, b = p[name + "_lora_a"], p[name + "_lora_b"]
    if "lora_dropout" in p:  # training: rate and key set per step by `combine(..., rng=...)`
        rate = p["lora_dropout"].astype(jnp.float32)
        key = jax.random.fold_in(jax.random.wrap_key_data(p["lora_key"]), TARGETS.index(name))
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
    low = "".join(c for c in xs if c not in contract) + _RANK
    h = jnp.einsum(f"{xs},{contract}{_RANK}->{low}", x, a)
    d = jnp.einsum(f"{low},{_RANK}{wout}->{out}", h, b)
    return d * p["lora_scale"].astype(d.dtype)


def _weight_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    return tuple(var.get_metadata().get("axes") or (None,) * var.get_value().ndim)


def adapter_shapes(model_cfg: Any, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """`{"<proj>_lora_a": shape, "<proj>_lora_b": shape}` of the stacked adapters (layers axis first)."""
    L, E, H, K, D, M = (model_cfg.num_layers, model_cfg.hidden_size, model_cfg.num_heads, model_cfg.num_kv_heads,
                        model_cfg.head_dim, model_cfg.intermediate_size)
    ins = {"q_proj": (E,), "k_proj": (E,), "v_proj": (E,), "o_proj": (H, D), "gate_proj": (E,), "up_proj": (E,),
           "down_proj": (M,)}
    outs = {"q_proj": (H, D), "k_proj": (K, D), "v_proj": (K, D), "o_proj": (E,), "gate_proj": (M,),
            "up_proj": (M,), "down_proj": (E,)}
    r = settings.rank
    shapes = {}
    for t in settings.targets:
        shapes[t + "_lora_a"] = (L, *ins[t], r)
        shapes[t + "_lora_b"] = (L, r, *outs[t])
    return shapes


def _quantize(w: jax.Array, n_in: int, settings: LoraSettings) -> Any:
    """qwix QArray of a stacked projection [L, in..., out...] (n_in input axes after the layer axis)."""
    import qwix  # noqa: PLC0415 - heavy: qwix (~1.9 s) only for a quantised (QLoRA) base

    out_axes = tuple(range(1 + n_in, w.ndim))
    if settings.quantize == "int8":  # per output channel (and per layer)
        return qwix.quantize(w, jnp.int8, channelwise_axes=(0, *out_axes))
    # nf4: blocks of block_size along the last input axis, every other input axis per channel
    last_in = n_in
    size = w.shape[last_in]
    block = settings.block_size if size % settings.block_size == 0 else size
    chan = tuple(a for a in range(w.ndim) if a != last_in)
    return qwix.quantize(w, "nf4", channelwise_axes=chan, tiled_axes={last_in: block})


def apply_lora(model: Any, settings: LoraSettings, seed: int = 0, init_adapters: bool = True) -> Any:
    """Add adapters to `model` (a Transformer) in place and return it; QLoRA also quantises the base projections.

    A is drawn from qwix's default LoRA initialiser per layer (key = seed), B is zero, so the adapted model
    computes exactly the base model's function until it trains. `init_adapters=False` leaves A at zero too (the
    base of a resumed run or an export, whose adapters come from the checkpoint: no initialiser to run).
    """
    layers = model.layers
    cfg = model.config
    shapes = adapter_shapes(cfg, settings)
    key = jax.random.key(seed)
    L = cfg.num_layers
    for i, t in enumerate(settings.targets):
        base = getattr(layers, t)
        w = base.get_value()
        axes = _weight_axes(base)
        n_in = len(_split_eq(EQUATIONS[t])[3])
        a_shape, b_shape = shapes[t + "_lora_a"], shapes[t + "_lora_b"]
        fan_in = int(np.prod(a_shape[1:-1]))
        if init_adapters:  # qwix's default A initialiser (he-uniform over the fan-in), per layer
            a = _A_INIT(jax.random.fold_in(key, i), (L, fan_in, settings.rank), jnp.float32)
            a = a.reshape(a_shape).astype(w.dtype)
        else:
            a = jnp.zeros(a_shape, w.dtype)
        b = jnp.zeros(b_shape, w.dtype)  # qwix's default B initialiser
        setattr(layers, t + "_lora_a", nnx.LoRAParam(a, axes=(axes[0], *axes[1:1 + n_in], None)))
        setattr(layers, t + "_lora_b", nnx.LoRAParam(b, axes=(axes[0], None, *axes[1 + n_in:])))
    layers.lora_scale = LoraConst(jnp.full((L,), settings.scale, jnp.float32), axes=("layers",))
    if settings.dropout > 0:
        layers.lora_dropout = LoraConst(jnp.zeros((L,), jnp.float32), axes=("layers",))  # 0 outside training
        layers.lora_key = LoraConst(jnp.zeros((L, 2), jnp.uint32), axes=("layers", None))
    if settings.quantize != "none":
        for t in TARGETS:
            var = getattr(layers, t)
            n_in = len(_split_eq(EQUATIONS[t])[3])
            setattr(layers, t, nnx.Param(_quantize(var.get_value(), n_in, settings), **var.get_metadata()))
    return model


def is_adapter_path(path: tuple[Any, ...]) -> bool:
    last = path[-1]
    name = str(getattr(last, "key", last))
    return name.endswith(SUFFIXES)


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(frozen base, adapters) of a LoRA model's pure parameter dict; no array is copied."""
    layers = dict(params["layers"])
    adapters = {k: layers.pop(k) for k in list(layers) if k.endswith(SUFFIXES)}
    base = dict(params)
    base["layers"] = layers
    return base, {"layers": adapters}


def combine(base: dict[str, Any], adapters: dict[str, Any], rng: jax.Array | None = None,
            dropout: float = 0.0) -> dict[str, Any]:
    """The full parameter dict (`nnx.merge`-able with the LoRA graphdef). With `rng` and `dropout` > 0 the
    adapters' input dropout is switched on with a fresh key per layer (training); without, it is off."""
    layers = dict(base["layers"])
    layers.update(adapters["layers"])
    if rng is not None and dropout > 0 and "lora_key" in layers:
        n = layers["lora_key"].shape[0]
        layers["lora_key"] = jax.random.key_data(jax.random.split(rng, n))
        layers["lora_dropout"] = jnp.full((n,), dropout, jnp.float32)
    out = dict(base)
    out["layers"] = layers
    return out


def base_only(base: dict[str, Any]) -> dict[str, Any]:
    """The frozen base as a plain model's parameter dict (the reference model: adapters disabled); for QLoRA
    the projections stay quantised and need `base_graphdef`."""
    out = dict(base)
    out["layers"] = {k: v for k, v in base["layers"].items() if not k.startswith("lora_")}
    return out


def abstract_lora_model(model_cfg: Any, settings: LoraSettings, mesh: jax.sharding.Mesh, rules: Any = None
                        ) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract pure params, their NamedShardings) of the adapted model; nothing is allocated.

    Shapes come from `jax.eval_shape` of the adapted model's pure dict (QLoRA: QArray nodes of codes and scales;
    `nnx.eval_shape` under `jax.set_mesh` was seen to return the projections unquantised, flax 0.12.8);
    each leaf takes the logical axes of its variable (a QArray's codes and scales those of the weight), a dim the
    mesh does not divide (e.g. nf4 block scales) replicating."""

    rules = rules or DEFAULT_RULES
    # graphdef and axes metadata from the unquantised adapted model (the same variables; QLoRA changes values only)
    plain = dataclasses.replace(settings, quantize="none")
    graphdef, meta_state = nnx.split(nnx.eval_shape(lambda: apply_lora(Transformer(model_cfg, rngs=nnx.Rngs(0)),
                                                                        plain)))
    axes = jax.tree.map(lambda v: v.get_metadata().get("axes"), meta_state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable)).to_pure_dict()
    shapes = jax.eval_shape(lambda: nnx.split(apply_lora(Transformer(model_cfg, rngs=nnx.Rngs(0)), settings))[1]
                            .to_pure_dict())

    def with_sharding(names: Any, sub: Any) -> Any:
        def one(x: Any) -> Any:
            spec = logical_to_spec(names, x.shape, mesh, rules) if names else jax.sharding.PartitionSpec()
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
        return jax.tree.map(one, sub)

    tree = jax.tree.map(with_sharding, axes, shapes, is_leaf=lambda x: isinstance(x, tuple) or x is None)
    shardings = jax.tree.map(lambda s: s.sharding, tree)
    return graphdef, tree, shardings


def trainable_params(params: dict[str, Any]) -> dict[str, Any]:
    """The trainable pytree of a LoRA model's pure params (or their ShapeDtypeStructs): the adapters only.
    With `abstract_lora_model` this is what a memory plan sizes gradients and optimiser state on."""
    return split_params(params)[1]


def count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays / ShapeDtypeStructs."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def nbytes(tree: Any) -> int:
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def init_lora_model(model: Any, settings: LoraSettings, mesh: jax.sharding.Mesh, seed: int = 0,
                    init_adapters: bool = True) -> tuple[nnx.GraphDef, dict[str, Any], dict[str, Any], Any]:
    """Adapt a loaded base model: (graphdef, base, adapters, full shardings), every array in its shards."""
    graphdef, _, shardings = abstract_lora_model(model.config, settings, mesh)
    apply_lora(model, settings, seed, init_adapters)
    _, state = nnx.split(model)
    params = jax.device_put(state.to_pure_dict(), shardings)
    base, adapters = split_params(params)
    return graphdef, base, adapters, shardings


# --- merge and export --------------------------------------------------------------------------------------------
def _dense(w: Any) -> jax.Array:
    if hasattr(w, "qvalue"):
        import qwix  # noqa: PLC0415 - heavy: qwix (~1.9 s) only for a quantised (QLoRA) base

        return qwix.dequantize(w)
    return w


def merged_params(base: dict[str, Any], adapters: dict[str, Any], settings: LoraSettings,
                  dtype: Any = jnp.float32) -> dict[str, Any]:
    """A plain model's pure params with `W + (alpha / r) A @ B` folded in (QLoRA: dequantised base first)."""
    layers = {k: _dense(v).astype(dtype) for k, v in base["layers"].items() if not k.startswith("lora_")}
    for t in settings.targets:
        a = adapters["layers"][t + "_lora_a"].astype(jnp.float32)
        b = adapters["layers"][t + "_lora_b"].astype(jnp.float32)
        _, _, _, contract, wout = _split_eq(EQUATIONS[t])
        delta = jnp.einsum(f"l{contract}{_RANK},l{_RANK}{wout}->l{contract}{wout}", a, b,
                           precision=jax.lax.Precision.HIGHEST)
        layers[t] = (layers[t].astype(jnp.float32) + settings.scale * delta).astype(dtype)
    out = {k: (v.astype(dtype) if k != "layers" else v) for k, v in base.items()}
    out["layers"] = layers
    return out


def merged_model(model_cfg: Any, base: dict[str, Any], adapters: dict[str, Any], settings: LoraSettings) -> Any:
    """A plain Transformer (no adapters) holding the merged weights in `model_cfg.param_dtype`."""

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, merged_params(base, adapters, settings, jnp.dtype(model_cfg.param_dtype)))


def peft_tensors(model_cfg: Any, adapters: dict[str, Any], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The adapter under PEFT's names and layouts: `lora_A.weight [r, in]`, `lora_B.weight [out, r]` per module,
    `in`/`out` flattened in the order the HF weight flattens them (checkpoints/hf_io.py)."""

    out = {}
    for key, value in adapters["layers"].items():
        t, which = key[: -len("_lora_a")], key[-1]
        arr = np.asarray(to_host(value), np.float32)
        for i in range(model_cfg.num_layers):
            w = arr[i]
            if which == "a":  # [in..., r] -> [r, in]
                mat = w.reshape(-1, w.shape[-1]).T
                name = "lora_A"
            else:  # [r, out...] -> [out, r]
                mat = w.reshape(w.shape[0], -1).T
                name = "lora_B"
            out[f"base_model.model.model.layers.{i}.{HF_MODULES[t]}.{name}.weight"] = np.ascontiguousarray(
                mat.astype(dtype))
    return out


def write_peft_adapter(out_dir: str, model_cfg: Any, adapters: dict[str, Any], settings: LoraSettings,
                       base_model: str = "", dtype: str = "float32", overwrite: bool = False) -> str:
    """`adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads onto the
    transformers model of the base; written as a unit (`fileio.atomic_directory`)."""

    np_dtype = {"float32": np.float32, "bfloat16": None, "float16": np.float16}[dtype]
    if np_dtype is None:
        np_dtype = ml_dtypes.bfloat16
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted(settings.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = peft_tensors(model_cfg, adapters, np_dtype)
    if jax.process_index() != 0:
        return out_dir
    with fileio.atomic_directory(out_dir, overwrite, what="PEFT adapter directory") as tmp:
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return out_dir


# --- the frozen base of a run, and adapter checkpoints -----------------------------------------------------------
def _numerics(config: Any) -> dict[str, Any]:
    m = config.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention, remat=m.remat,
                scan_layers=bool(m.scan_layers))


def base_source(config: Any) -> dict[str, Any]:
    """Where a LoRA run's frozen base comes from (recorded in every checkpoint: the adapters mean nothing
    without it): an earlier stage's checkpoint, an HF directory, or a fresh preset init with its seed."""

    if config.model.init_from:
        return {"kind": "orbax", "path": resolve_model_checkpoint(config.model.init_from)}
    if config.model.hf_path:
        return {"kind": "hf", "path": os.path.abspath(config.model.hf_path)}
    return {"kind": "fresh", "preset": str(config.model.preset), "seed": int(config.seed)}


def checkpoint_meta(config: Any, settings: LoraSettings) -> dict[str, Any]:
    return {"settings": settings.to_json(), "base": base_source(config)}


def load_base_model(source: dict[str, Any], mesh: jax.sharding.Mesh, model_cfg: Any, **numerics: Any) -> Any:
    """The base model named by `base_source` (a plain Transformer, in its shards)."""

    if source["kind"] == "orbax":
        return orbax_io.load_model(source["path"], mesh, **numerics)
    if source["kind"] == "hf":
        return hf_io.load_hf_model(source["path"], mesh, cfg=model_cfg, progress=False)
    return hf_io.init_model(model_cfg, mesh, seed=int(source["seed"]))


def check_run_mode(step_dir: str | None, settings: LoraSettings | None) -> None:
    """Before a resume: refuse to mix a LoRA checkpoint (adapters only) with a full fine-tune, either way, or
    with other LoRA settings (restoring would fail on the shapes and quarantine a good checkpoint)."""

    if step_dir is None:
        return
    saved = read_checkpoint_meta(step_dir).get("lora")
    if saved is None and settings is not None:
        raise ValueError(f"{step_dir}: this run was trained without LoRA (full parameters) but lora.enabled=True; "
                         "use a new run_dir, or set lora.enabled=False to resume it")
    if saved is not None and settings is None:
        raise ValueError(f"{step_dir}: this run trains LoRA adapters ({saved['settings']}) but lora.enabled=False; "
                         "set --config.lora.enabled=True (and the same lora settings) to resume it")
    if saved is not None and saved["settings"] != settings.to_json():
        diff = sorted(k for k in saved["settings"] if saved["settings"][k] != settings.to_json().get(k))
        raise ValueError(f"{step_dir}: lora.{', lora.'.join(diff)} differ from the checkpoint's "
                         f"({saved['settings']}); resume with the same lora settings or use a new run_dir")


def resume_base(config: Any, meta: dict[str, Any], step_dir: str, mesh: jax.sharding.Mesh, model_cfg: Any,
                settings: LoraSettings) -> dict[str, Any]:
    """The frozen base of a resumed LoRA run, rebuilt from the source its checkpoint records (and refused when
    the config now names another base: the saved adapters were trained on that one)."""
    saved = meta.get("lora") or {}
    source = saved.get("base")
    if source is None:
        raise ValueError(f"{step_dir}: checkpoint holds no LoRA base record (meta 'lora'); cannot resume adapters")
    now = base_source(config)
    if now != source:
        raise ValueError(f"{step_dir}: the adapters were trained on base {source} but the config now names {now} "
                         "(model.init_from / model.hf_path / seed); use the same base or a new run_dir")
    model = load_base_model(source, mesh, model_cfg, **_numerics(config))
    _, base, _, _ = init_lora_model(model, settings, mesh, init_adapters=False)
    return base


def load_adapter_checkpoint(step_dir: str, mesh: jax.sharding.Mesh, with_base: bool = True, **numerics: Any
                            ) -> tuple[Any, LoraSettings, dict[str, Any] | None, dict[str, Any]]:
    """(model_cfg, settings, frozen base (None unless `with_base`), adapters) of a LoRA trainer step directory."""

    meta = read_checkpoint_meta(step_dir).get("lora")
    if meta is None:
        raise ValueError(f"{step_dir}: not a LoRA checkpoint (its meta has no 'lora' record)")
    s = dict(meta["settings"])
    settings = LoraSettings(**{**s, "targets": tuple(s["targets"])})
    model_cfg = read_model_config(step_dir, **numerics)
    _, full_abs, shardings = abstract_lora_model(model_cfg, settings, mesh)
    target = trainable_params(full_abs)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(step_dir, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
    adapters = restored[PARAMS_ITEM]
    if not with_base:
        return model_cfg, settings, None, adapters
    model = load_base_model(meta["base"], mesh, model_cfg, **numerics)
    _, base, _, _ = init_lora_model(model, settings, mesh, init_adapters=False)
    return model_cfg, settings, base, adapters


def update_key(state: Any) -> jax.Array:
    """A dropout key unique to one optimiser update: the state's key folded with optax's update count (several
    GRPO mini-batch updates share one `state.step`)."""
    counts = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
              if "count" in jax.tree_util.keystr(path)]
    return jax.random.fold_in(jax.random.fold_in(state.key(), state.step), counts[0] if counts else 0)


def load_merged_model(step_dir: str, mesh: jax.sharding.Mesh, **numerics: Any) -> Any:
    """A LoRA step directory as a plain model with the adapters merged into its base (what `orbax.load_model`
    returns for one, so RERS, evaluation, diagnosis, export and the next stage's `init_from` take LoRA runs)."""
    model_cfg, settings, base, adapters = load_adapter_checkpoint(step_dir, mesh, **numerics)
    model = merged_model(model_cfg, base, adapters, settings)

    _, _, shardings = abstract_model(model_cfg, mesh)
    nnx.update(model, jax.device_put(nnx.state(model).to_pure_dict(), shardings.to_pure_dict()))
    return model


def is_lora_checkpoint(step_dir: str) -> bool:
    return "lora" in read_checkpoint_meta(step_dir)


def export_adapter(step_dir: str, out_dir: str, mesh: jax.sharding.Mesh, *, overwrite: bool = False) -> str:
    """Write a LoRA step's adapter in PEFT's format; `base_model_name_or_path` names the base it was trained on
    (an HF directory, or our checkpoint of it: export that too for `PeftModel.from_pretrained`). A QLoRA adapter was
    trained on the quantised base: on the full-precision base it is close, not identical."""

    meta = read_meta(step_dir)
    src = meta["base"]
    # an earlier adapter export (these two files and nothing else) is replaced without being told to
    overwrite = overwrite or (os.path.isdir(out_dir) and set(os.listdir(out_dir)) <= set(PEFT_FILES))
    fileio.check_destination(step_dir, out_dir, overwrite, what="lora.adapter_dir",
                             overwrite_hint="set export.overwrite=True to replace it")
    model_cfg, settings, _, adapters = load_adapter_checkpoint(step_dir, mesh, with_base=False)
    base_name = src.get("path") or f"{src.get('preset')} (fresh init, seed {src.get('seed')})"
    return write_peft_adapter(out_dir, model_cfg, adapters, settings, base_model=base_name, overwrite=True)


def read_meta(step_dir: str) -> dict[str, Any]:
    return read_checkpoint_meta(step_dir)["lora"]
