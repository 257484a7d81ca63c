"""Hardware targets: one file per machine shape in `configs/hardware/`, composable with any stage config.

A stage config is loaded as `--config=configs/<stage>.py:<hardware>`; ml_collections passes `<hardware>` to
the stage's `get_config(hardware)`, which calls `configs/base.py:get_config(hardware)`, which ends with
`apply_hardware(c, c.hardware)`. Each target module defines `apply(config) -> None` that sets what depends on
the machine and nothing else: the mesh shape, dtypes, remat, the attention kernel, batch sizes / sequence
length, and how `jax.distributed` starts; `set_target(config, ...)` below sets all of these, so a target
states only its own values. Stage semantics (learning rates, steps, datasets) stay in the stage.

Optional module attributes, used by tests and `describe()`: `DESCRIPTION` (one line) and `NUM_DEVICES`
(JAX devices of the full target, e.g. 64 for a v5p-128 slice; None when it varies, as on CPU).

`--config.hardware=...` on the command line does NOT re-apply a target (overrides run after get_config):
pick the target with the `:name` suffix. A path to a `.py` file works as a name, for site-specific targets.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
from pathlib import Path
from types import ModuleType

#: Folder of the shipped targets (the repo's `configs/hardware/`; raredx_jax is installed editable).
HARDWARE_DIR = Path(__file__).resolve().parent.parent / "configs" / "hardware"

#: Mesh axes in the order the mesh is built (outer to inner: data-parallel replicas, FSDP, tensor).
MESH_AXES = ("data", "fsdp", "tensor")

_CACHE: dict[str, ModuleType] = {}


def known_targets() -> list[str]:
    """Names of the shipped hardware targets (files in configs/hardware/, without `.py`)."""
    if not HARDWARE_DIR.is_dir():
        return []
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.py") if not p.stem.startswith("_"))


def _resolve_path(name: str) -> Path:
    if name.endswith(".py") or os.sep in name or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"hardware target file {str(path)!r} (config.hardware) does not exist")
        return path.resolve()
    normalised = name.strip().lower().replace("-", "_")
    path = HARDWARE_DIR / f"{normalised}.py"
    if normalised.startswith("_") or not path.is_file():
        known = known_targets()
        close = difflib.get_close_matches(normalised, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown hardware target {name!r} (config.hardware, set by --config=configs/<stage>.py:<target>). "
            f"Known targets: {', '.join(known) or '(none found in ' + str(HARDWARE_DIR) + ')'}.{hint} "
            "A path to a .py file defining apply(config) also works."
        )
    return path


def load_target(name: str) -> ModuleType:
    """The module of a hardware target (cached). ValueError listing the known names on a typo."""
    path = _resolve_path(name)
    key = str(path)
    if key not in _CACHE:
        spec = importlib.util.spec_from_file_location(f"raredx_hardware_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "apply", None)):
            raise ValueError(f"hardware target {name!r} ({path}) must define apply(config) -> None")
        _CACHE[key] = module
    return _CACHE[key]


def apply_hardware(config, name: str) -> None:
    """Apply hardware target `name` (e.g. "h100x8") to `config` in place and record it in config.hardware."""
    if not name:
        name = "cpu"
    module = load_target(name)
    module.apply(config)
    path = Path(module.__file__).resolve()
    # canonical name ("TPU-v5p-128" -> "tpu_v5p_128"); a target given as a file keeps its path
    config.hardware = path.stem if path.parent == HARDWARE_DIR else str(path)
    resolve_mesh_shape(config.mesh, num_devices=None)  # fail early on a malformed mesh (e.g. two -1)


def set_target(config, *, remat: str, attention: str, initialize: str, data: int = 1, fsdp: int = -1,
               tensor: int = 1, dtype: str = "bfloat16", seq_len: int | None = None, batch_size: int | None = None,
               sampling_batch_size: int | None = None) -> None:
    """What a target's `apply(config)` sets: the mesh (default: everything on fsdp), compute dtype (default
    bfloat16; master weights always float32), remat, attention kernel, `distributed.initialize` and, where given,
    the batch scale: `seq_len` (train.seq_len; model.max_seq_len raised to it), train and sampling batch sizes."""
    config.mesh.data = data
    config.mesh.fsdp = fsdp
    config.mesh.tensor = tensor
    config.model.dtype = dtype
    config.model.param_dtype = "float32"
    config.model.remat = remat
    config.model.attention = attention
    if seq_len is not None:
        config.model.max_seq_len = max(int(config.model.max_seq_len), seq_len)
        config.train.seq_len = seq_len
    if batch_size is not None:
        config.train.batch_size = batch_size
    if sampling_batch_size is not None:
        config.sampling.batch_size = sampling_batch_size
    config.distributed.initialize = initialize


def resolve_mesh_shape(mesh, num_devices: int | None) -> dict[str, int]:
    """Mesh axis sizes for `num_devices` devices; at most one axis is -1 (= all remaining devices).

    `mesh` is a ConfigDict/mapping with `data`, `fsdp`, `tensor`. With num_devices=None only the form is
    checked (-1 is returned as is). ValueError naming the field when the shape cannot fit the devices.
    """
    sizes = {axis: int(mesh[axis]) for axis in MESH_AXES}
    bad = [f"mesh.{a}={s}" for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh sizes must be positive or -1 (= rest of the devices): {', '.join(bad)}")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {', '.join('mesh.' + a for a in rest)} = -1")
    if num_devices is None:
        return sizes
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {sizes} does not fit {num_devices} devices: the fixed axes multiply to {fixed}, "
                f"which does not divide {num_devices} (set mesh.{rest[0]} or the fixed axes explicitly)"
            )
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh {sizes} has {fixed} devices but {num_devices} are available")
    return sizes


def check_batch_sizes(config, num_devices: int) -> None:
    """Global batch sizes must split evenly over the batch-sharded axes (data x fsdp). ValueError otherwise."""
    sizes = resolve_mesh_shape(config.mesh, num_devices)
    shards = sizes["data"] * sizes["fsdp"]
    for field, value in (("train.batch_size", config.train.batch_size),
                         ("sampling.batch_size", config.sampling.batch_size)):
        if value % shards:
            raise ValueError(
                f"{field}={value} does not split over data x fsdp = {shards} devices "
                f"(mesh {sizes} on {num_devices} devices); use a multiple of {shards}"
            )


def describe(name: str) -> str:
    module = load_target(name)
    return getattr(module, "DESCRIPTION", name)


# --- accelerator specs for the AOT plan (raredx_jax/plan.py) ------------------------------------------------------
# One row per chip: HBM capacity per JAX device, dense bf16 peak FLOP/s and peak HBM bandwidth, each from the
# vendor's own spec page (named in `source`). The plan compares per-device memory with `hbm_bytes` and turns
# XLA's FLOPs / bytes into a roofline step time with `peak_flops` / `hbm_bandwidth`.
ACCELERATORS: dict[str, dict[str, object]] = {
    "h100-sxm": dict(
        name="NVIDIA H100 SXM5 80 GB", hbm_bytes=80e9, peak_flops=989e12, hbm_bandwidth=3.35e12,
        source="NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): SXM5 80 GB HBM3, "
               "3.35 TB/s, BF16 1,979 TFLOPS with sparsity = 989 dense"),
    "h200": dict(
        name="NVIDIA H200 SXM 141 GB", hbm_bytes=141e9, peak_flops=989e12, hbm_bandwidth=4.8e12,
        source="NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): 141 GB HBM3e, 4.8 TB/s, BF16 1,979 "
               "TFLOPS with sparsity = 989 dense"),
    "tpu-v5p": dict(
        name="TPU v5p chip", hbm_bytes=95e9, peak_flops=459e12, hbm_bandwidth=2.765e12,
        source="Google Cloud TPU v5p docs (cloud.google.com/tpu/docs/v5p): 95 GB HBM2e, 2,765 GB/s, 459 bf16 "
               "TFLOPS per chip"),
    "tpu-v6e": dict(
        name="TPU v6e (Trillium) chip", hbm_bytes=32e9, peak_flops=918e12, hbm_bandwidth=1.64e12,
        source="Google Cloud TPU v6e docs (cloud.google.com/tpu/docs/v6e): 32 GB HBM, 1,640 GB/s, 918 bf16 "
               "TFLOPS per chip"),
}

#: The chip each shipped target is planned for (gpu1 is sized for 40-80 GB cards; it is planned as one H100).
TARGET_ACCELERATORS: dict[str, str | None] = {
    "cpu": None, "gpu1": "h100-sxm", "h100x8": "h100-sxm", "tpu_v5p_128": "tpu-v5p", "tpu_v6e_256": "tpu-v6e",
}


def target_accelerator(name: str) -> dict[str, object] | None:
    """The ACCELERATORS row a target is planned for: the target module's `ACCELERATOR` attribute if it has one,
    else TARGET_ACCELERATORS; None for CPU (the plan then needs an explicit memory budget)."""
    module = load_target(name)
    key = getattr(module, "ACCELERATOR", None) or TARGET_ACCELERATORS.get(Path(module.__file__).stem)
    return None if key is None else {"key": key, **ACCELERATORS[key]}


def target_num_devices(name: str) -> int | None:
    """JAX devices of the target (`NUM_DEVICES`; per host for multi-host GPU targets); None when it varies."""
    return getattr(load_target(name), "NUM_DEVICES", None)
