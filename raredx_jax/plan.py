"""Will it fit? Ahead-of-time memory and time plan of a stage on a hardware target, from a CPU host.

    python -m raredx_jax.plan --config=configs/knowledge_sft.py:h100x8 --config.model.preset=qwen2.5-7b
    python -m raredx_jax.plan --config=configs/rl_curriculum.py:gpu1 --config.model.preset=qwen2.5-0.5b

Like maxtext's `train_compile.py`: the stage's *real* jitted step functions (the ones the trainers call:
`training/lm.py:make_train_step`; GRPO's rollout generate `sampling/sampler.py:generate_jit`, its teacher-forced
logprob `training/grpo/:make_logprob_fn` and update `make_update_fn`; the evaluation generate) are lowered
from `jax.ShapeDtypeStruct` inputs carrying the target's shardings and compiled, nothing allocated. The host
platform is forced to the target's device count (`--xla_force_host_platform_device_count`, set before JAX
starts: `main` re-executes itself with it), so the SPMD partitioning is the target's mesh.

Per device it reports parameters, optimiser state, gradients, reference model, KV cache and XLA's
activations / temporaries (`compiled.memory_analysis()`); the stage's peak is the largest phase (the buffers a
phase's program needs plus the persistent buffers that live across phases: the train state, the GRPO
reference, the sampler's kept KV cache). A plan over the target's HBM is refused (exit 4, one line naming the
knob that helps: remat policy, fsdp, micro batch, LoRA).

Time: XLA's `cost_analysis()` FLOPs and bytes of the partitioned program, turned into a roofline step time
max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) and the MFU that time would mean (peaks: `hardware.ACCELERATORS`).
HloCostAnalysis counts a `while` loop's body once, so the layer scan would be counted as one layer: the cost is
taken from the same step compiled with 1 and 2 unrolled layers and extrapolated linearly to L layers (exact for
a stack of identical layers). Decode steps (a `while` loop of up to max_new_tokens) use the analytic decode
roofline instead (weights + KV cache read once per step), labelled as such.

What CPU compilation cannot see: the target's own compiler (XLA:GPU / XLA:TPU fuse and schedule differently),
and the flash-attention kernels (cuDNN, splash) which do not exist on CPU: attention compiles as the XLA
reference, which materialises the [B, H, T, S] scores, so activations are an upper bound for those kernels (the
plan prints the size of one layer's scores). Collectives are not timed (the roofline is per device).

Trainable parameters are pluggable (`TRAINABLE`, `--trainable=`, `register_trainable`): "full" trains every
parameter; "lora" (chosen by itself when `lora.enabled=True`) plans LoRA / QLoRA as the trainers run it
(raredx_jax/lora.py): the real LoRA step functions take the frozen base as an extra argument, the base is counted
once (QLoRA: int8 / nf4 codes + scales, nf4 packed two per byte) and is GRPO's reference (0 extra bytes), and
optimiser state and gradients cover the adapters only.

Exit status: 0 the plan fits; 4 it does not (one line `plan: error: ...` naming the knob); 2 a bad config.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Callable

import numpy as np
from absl import flags

from raredx_jax import hardware

# JAX, Flax, the models and the trainers are imported in the functions that use them: `python -m raredx_jax.plan`
# re-executes itself with the target's device count before JAX starts (`_force_devices`), and importing them here
# would cost that first process ~1.6 s for nothing. `raredx_jax.train` defines its absl flags when imported.
# benchmarks/accelerator_check.py imports this module on an image without ml_collections.

GiB = float(1 << 30)
EXIT_DOES_NOT_FIT = 4
_DEVICES_ENV = "RAREDX_PLAN_DEVICES"


# ---------------------------------------------------------------------------------------------------------------
# trainable-parameter sets (pluggable)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainSetup:
    """What a trainer trains, from abstract shapes only: the model's graphdef, the trainable parameters (the
    TrainState's, with shardings), the optimiser, the abstract TrainState and how many parameters are trainable.

    A parameter-efficient set (LoRA) also gives the frozen weights the step takes as its extra argument
    (`frozen_abs` / `frozen_sh`, as `lm.make_train_step(frozen_sh=...)` and `grpo.make_update_fn(frozen_sh=...)`
    expect; they double as GRPO's reference, so no reference copy is planned) and `model_params_abs`, the full
    parameter tree the sampler and the logprob forward run (default: the trainable parameters)."""

    name: str
    graphdef: Any
    params_abs: Any
    param_sh: Any
    tx: Any
    schedule: Any
    state_sh: Any
    state_abs: Any
    trainable_params: int
    frozen_abs: Any = None
    frozen_sh: Any = None
    lora_dropout: float = 0.0
    model_params_abs: Any = None

    @property
    def frozen_bytes_per_device(self) -> int:
        return 0 if self.frozen_abs is None else _per_device_bytes(self.frozen_abs)

    @property
    def step_kwargs(self) -> dict[str, Any]:
        return {} if self.frozen_sh is None else {"frozen_sh": self.frozen_sh, "lora_dropout": self.lora_dropout}

    @property
    def extra_args(self) -> tuple[Any, ...]:
        return () if self.frozen_abs is None else (self.frozen_abs,)

    @property
    def full_params_abs(self) -> Any:
        return self.params_abs if self.model_params_abs is None else self.model_params_abs


def full_finetune(model_cfg: Any, mesh: Any, opt_cfg: Any, total_steps: int, lr: float | None = None, *,
                  config: Any = None) -> TrainSetup:
    """Every parameter trained (the trainers' default): AdamW moments for all of them."""
    from raredx_jax.training.optim import make_optimizer  # noqa: PLC0415 - after the re-exec (see top)
    from raredx_jax.training.state import (  # noqa: PLC0415 - after the re-exec (see top)
        abstract_params,
        abstract_train_state,
        train_state_shardings,
    )

    tx, schedule = make_optimizer(opt_cfg, total_steps, lr=lr)
    graphdef, params_abs, param_sh = abstract_params(model_cfg, mesh)
    state_sh = train_state_shardings(tx, params_abs, param_sh, mesh)
    state_abs = abstract_train_state(tx, params_abs, state_sh)
    import jax  # noqa: PLC0415 - after the re-exec (see top)

    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params_abs))
    return TrainSetup("full", graphdef, params_abs, param_sh, tx, schedule, state_sh, state_abs, n)


def lora_settings(config: Any) -> Any:
    """The LoRA settings a plan uses: `config.lora` (`lora.LoraSettings.from_config`); with `--trainable=lora` on a
    config whose LoRA is off (or that has no lora section), that section's values (or the defaults) as if enabled."""
    from raredx_jax import lora  # noqa: PLC0415 - after the re-exec (see top)

    settings = lora.LoraSettings.from_config(config) if config is not None else None
    if settings is not None:
        return settings
    section = config.get("lora", None) if config is not None and hasattr(config, "get") else None
    if section is None:
        return lora.LoraSettings()
    return lora.LoraSettings.from_config({"lora": {**dict(section), "enabled": True}})


def lora_finetune(model_cfg: Any, mesh: Any, opt_cfg: Any, total_steps: int, lr: float | None = None, *,
                  config: Any = None) -> TrainSetup:
    """LoRA / QLoRA as the trainers run it (`sft.train`, `grpo.GRPOLearner`): the model adapted by
    `lora.abstract_lora_model`, the TrainState holding the adapters only (`lora.trainable_params`: AdamW moments
    and gradients for them alone), the frozen base (QLoRA: int8 / nf4 `QArray`s) the step's extra argument, counted
    once; it is also GRPO's reference model (no second copy)."""
    from raredx_jax import lora  # noqa: PLC0415 - after the re-exec (see top)
    from raredx_jax.training.optim import make_optimizer  # noqa: PLC0415 - after the re-exec (see top)
    from raredx_jax.training.state import (  # noqa: PLC0415 - after the re-exec (see top)
        abstract_train_state,
        train_state_shardings,
    )

    settings = lora_settings(config)
    tx, schedule = make_optimizer(opt_cfg, total_steps, lr=lr)
    graphdef, full_abs, full_sh = lora.abstract_lora_model(model_cfg, settings, mesh)
    base_abs, params_abs = lora.split_params(full_abs)
    base_sh, param_sh = lora.split_params(full_sh)
    state_sh = train_state_shardings(tx, params_abs, param_sh, mesh)
    state_abs = abstract_train_state(tx, params_abs, state_sh)
    name = "lora" if settings.quantize == "none" else f"qlora-{settings.quantize}"
    return TrainSetup(f"{name} (r={settings.rank}, {','.join(settings.targets)})", graphdef, params_abs, param_sh,
                      tx, schedule, state_sh, state_abs, lora.count(params_abs), frozen_abs=base_abs,
                      frozen_sh=base_sh, lora_dropout=settings.dropout, model_params_abs=full_abs)


#: name -> builder(model_cfg, mesh, opt_cfg, total_steps, lr, *, config) -> TrainSetup (config: the stage config,
#: e.g. for adapter settings). `register_trainable` adds more.
TRAINABLE: dict[str, Callable[..., TrainSetup]] = {"full": full_finetune, "lora": lora_finetune}


def register_trainable(name: str, builder: Callable[..., TrainSetup]) -> None:
    TRAINABLE[name] = builder


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
    """One compiled program of the stage and its per-device memory (bytes) and cost."""

    name: str
    argument: int
    output: int
    alias: int
    temp: int
    extra_persistent: int  # persistent buffers alive during this phase but not its arguments
    flops: float | None = None  # per device, per call
    bytes_accessed: float | None = None
    time_s: float | None = None  # roofline time of one call (compute bound for compiled training programs)
    time_upper_s: float | None = None  # with the bytes XLA:CPU counts (it fuses less than XLA:GPU/TPU): upper bound
    tokens: int = 0  # tokens of one call (per device), for the MFU
    model_flops: float | None = None  # 6N + 12LHDT per token x tokens (per device), training phases only
    note: str = ""

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.extra_persistent


@dataclasses.dataclass
class Plan:
    stage: str
    target: str
    preset: str
    num_devices: int
    mesh: dict[str, int]
    trainable: str
    num_params: int
    trainable_params: int
    accelerator: dict[str, Any] | None
    hbm_bytes: float
    params: int
    optimizer: int
    gradients: int
    reference: int
    kv_cache: int
    phases: list[Phase]
    scores_bytes: int = 0  # one layer's materialised attention scores (absent with a flash kernel)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.peak)

    @property
    def total(self) -> int:
        return self.peak_phase.peak

    @property
    def activations(self) -> int:
        """Temporaries of the peak phase other than the gradients (activations, logits, XLA scratch)."""
        p = self.peak_phase
        return max(p.temp - (self.gradients if p.name in TRAIN_PHASES else 0), 0)

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm_bytes

    def knob(self) -> str:
        return suggest_knob(self)

    def mfu(self, phase: Phase, upper: bool = False) -> float | None:
        """Model FLOPs utilisation the roofline time of `phase` would mean (upper=True: the bytes-bound time)."""
        t = phase.time_upper_s if upper else phase.time_s
        if not (self.accelerator and phase.model_flops and t):
            return None
        return phase.model_flops / (t * float(self.accelerator["peak_flops"]))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(total=self.total, activations=self.activations, fits=self.fits, peak_phase=self.peak_phase.name)
        return d


TRAIN_PHASES = ("train_step", "update")


def _gib(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x / GiB:.2f} GiB" if abs(x) >= GiB / 4 else f"{x / (1 << 20):.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def format_plan(plan: Plan) -> str:
    """The human-readable report (per device)."""
    acc = plan.accelerator
    lines = [
        f"plan: stage {plan.stage} on {plan.target} ({plan.num_devices} devices, mesh {plan.mesh}), model "
        f"{plan.preset} {plan.num_params / 1e9:.3f}B params, trainable={plan.trainable} "
        f"({_count(plan.trainable_params)} trainable)",
        f"  per device{' (' + acc['name'] + ')' if acc else ''}:",
        f"    parameters            {_gib(plan.params)}",
        f"    optimiser state       {_gib(plan.optimizer)}",
        f"    gradients             {_gib(plan.gradients)}",
        f"    reference model       {_gib(plan.reference)}",
        f"    KV cache              {_gib(plan.kv_cache)}",
        f"    activations/temps     {_gib(plan.activations)}  (XLA memory_analysis of {plan.peak_phase.name})",
        f"    total (peak phase)    {_gib(plan.total)}  of {_gib(plan.hbm_bytes)} HBM "
        f"-> {'fits' if plan.fits else 'DOES NOT FIT'} ({plan.total / plan.hbm_bytes:.0%})",
    ]
    if plan.scores_bytes:
        lines.append(f"    (one layer's XLA-reference attention scores: {_gib(plan.scores_bytes)}; a flash kernel "
                     "(cuDNN / splash) does not hold them)")
    lines.append("  phases (per device, one call):")
    for p in plan.phases:
        t = f"{p.time_s * 1e3:.1f} ms" if p.time_s is not None else "n/a"
        mfu = f", MFU {plan.mfu(p):.0%}" if plan.mfu(p) is not None else ""
        if p.time_upper_s is not None and p.time_upper_s > p.time_s:
            mfu += f"; with XLA:CPU's byte count {p.time_upper_s * 1e3:.1f} ms"
            mfu += f", MFU {plan.mfu(p, upper=True):.0%}" if plan.mfu(p, upper=True) is not None else ""
        fl = f"{p.flops / 1e12:.2f} TFLOP" if p.flops is not None else "n/a"
        by = _gib(p.bytes_accessed) if p.bytes_accessed is not None else "n/a"
        lines.append(f"    {p.name:<16} peak {_gib(p.peak)} (args {_gib(p.argument)}, temps {_gib(p.temp)}); "
                     f"{fl}, {by} accessed; roofline {t}{mfu}{' [' + p.note + ']' if p.note else ''}")
    for n in plan.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def suggest_knob(plan: Plan) -> str:
    """The settings that reduce the parts of the peak that do not fit, largest first, with the numbers that motivate
    them: the train state (-> fsdp over more devices, LoRA), activations (-> remat, micro batches), the KV cache
    (-> sampling batch, release_kv_cache)."""
    p = plan.peak_phase
    over = plan.total - plan.hbm_bytes
    state = plan.params + plan.optimizer + (plan.gradients if p.name in TRAIN_PHASES else 0)
    acts, kv, hbm = plan.activations, plan.kv_cache, plan.hbm_bytes
    parts = []
    fsdp = plan.mesh.get("fsdp", 1)
    need = math.ceil(fsdp * state / max(hbm - acts - kv, 1)) if hbm > acts + kv else None
    if plan.trainable == "full":
        lora = "LoRA, adapters only (--config.lora.enabled=True)"
    elif plan.trainable.startswith("lora"):  # the frozen base is most of the state: quantise it
        lora = "QLoRA, a 4- or 8-bit frozen base (--config.lora.quantize=nf4 or int8)"
    else:
        lora = "fewer --config.lora.targets"
    parts.append((state, f"parameters + optimiser + gradients take {_gib(state)} per device: shard them over more "
                         f"devices (fsdp; --config.mesh.fsdp, a larger target"
                         f"{f', >= {need} devices' if need else ''}) or {lora}"))
    micro = ("--config.grpo.micro_batch_size (fewer rows per forward/backward)" if plan.stage == "grpo"
             else "--config.train.grad_accum (micro batches)")
    parts.append((acts, f"activations take {_gib(acts)} per device in {p.name}: --config.model.remat=full (or dots), "
                        f"or {micro}"))
    parts.append((kv, f"the KV cache takes {_gib(kv)} per device: lower sampling.batch_size or "
                      "sampling.max_new_tokens, or set grpo.release_kv_cache=True"))
    parts.sort(key=lambda x: -x[0])
    # the largest part, and every other part that alone would not fit beside the rest
    tips = [parts[0][1]] + [t for size, t in parts[1:] if size > 0 and (size >= hbm / 2 or size >= over)]
    return f"over by {_gib(over)}; " + "; also ".join(tips)


# ---------------------------------------------------------------------------------------------------------------
# building the plan
# ---------------------------------------------------------------------------------------------------------------


def _per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard, device 0).
    Sub-byte dtypes (QLoRA's nf4 codes, uint4) count packed, two per byte, as XLA:GPU / XLA:TPU store them."""
    import jax  # noqa: PLC0415 - after the re-exec (see top)

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += -(-int(math.prod(shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8)
    return total


def _sds(shape: tuple[int, ...], dtype: Any, sharding: Any) -> Any:
    import jax  # noqa: PLC0415 - after the re-exec (see top)

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _phase(name: str, compiled: Any, extra: int, note: str = "") -> Phase:
    ma = compiled.memory_analysis()
    return Phase(name, int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes),
                 int(ma.temp_size_in_bytes), int(extra), note=note)


def _cost(compiled: Any) -> tuple[float, float]:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def _layer_extrapolated_cost(build: Callable[[Any], Any], model_cfg: Any) -> tuple[float, float]:
    """(FLOPs, bytes) of `build(cfg)` (-> a Compiled) at cfg.num_layers, from 1- and 2-layer unrolled compiles."""
    c1 = _cost(build(model_cfg.replace(num_layers=1, scan_layers=False)))
    c2 = _cost(build(model_cfg.replace(num_layers=2, scan_layers=False)))
    n = model_cfg.num_layers
    return tuple(a + (n - 1) * (b - a) for a, b in zip(c1, c2))  # type: ignore[return-value]


def _roofline(phase: Phase, acc: dict[str, Any] | None) -> None:
    """Compute-bound time from XLA's FLOPs; the bytes XLA:CPU counts give an upper bound (CPU fusion is weaker
    than GPU/TPU fusion, so its byte count overstates the traffic of the target's program)."""
    if acc is None or phase.flops is None or phase.bytes_accessed is None:
        return
    phase.time_s = phase.flops / float(acc["peak_flops"])
    phase.time_upper_s = max(phase.time_s, phase.bytes_accessed / float(acc["hbm_bandwidth"]))


def _scores_bytes(cfg: Any, rows_per_device: int, q_len: int, k_len: int) -> int:
    """One layer's XLA-reference attention scores (fp32) + probabilities (compute dtype), per device."""

    n = rows_per_device * cfg.num_heads * q_len * k_len
    return n * 4 + n * np.dtype(cfg.dtype).itemsize


def _model_cfg(config: Any) -> Any:
    from raredx_jax.models.config import model_config_from  # noqa: PLC0415 - after the re-exec (see top)

    vocab = int(config.tokenizer.vocab_size) if config.model.preset == "tiny" else None
    return model_config_from(config, vocab)


def _make_mesh(config: Any, num_devices: int | None) -> Any:
    import jax  # noqa: PLC0415 - after the re-exec (see top)

    from raredx_jax.parallel.mesh import make_mesh  # noqa: PLC0415 - after the re-exec (see top)

    have = jax.device_count()
    n = num_devices or have
    if n > have:
        raise ValueError(f"the plan needs {n} devices but this process has {have}: run it as "
                         "`python -m raredx_jax.plan ...` (which forces the host platform to the target's count)")
    return make_mesh(config.mesh, jax.devices()[:n])


def build_plan(config: Any, *, num_devices: int | None = None, hbm_bytes: float | None = None,
               trainable: str = "full", cost: bool = True) -> Plan:
    """The plan of `config` (a resolved stage config) on `num_devices` of this process's devices."""
    import jax  # noqa: PLC0415 - after the re-exec (see top)

    lora_cfg = config.get("lora", None)
    if lora_cfg is not None and bool(lora_cfg.get("enabled", False)) and trainable == "full":
        trainable = "lora"  # the trainers train the adapters only when lora.enabled
    if trainable not in TRAINABLE:
        raise ValueError(f"--trainable={trainable!r}: known sets {sorted(TRAINABLE)}")
    stage = config.stage
    if stage not in STAGE_PLANS:
        raise ValueError(f"config.stage={stage!r}: the plan covers {', '.join(sorted(STAGE_PLANS))}")
    acc = hardware.target_accelerator(config.hardware) if config.hardware else None
    if hbm_bytes is None:
        if acc is None:
            raise ValueError(f"target {config.hardware!r} has no accelerator spec (hardware.ACCELERATORS): give the "
                             "memory budget per device with --hbm_gib")
        hbm_bytes = float(acc["hbm_bytes"])
    mesh = _make_mesh(config, num_devices)
    model_cfg = _model_cfg(config)
    with jax.set_mesh(mesh):
        plan = STAGE_PLANS[stage](config, model_cfg, mesh, acc, trainable, cost)
    plan.hbm_bytes = float(hbm_bytes)
    plan.target = config.hardware
    if config.model.remat == "none" and plan.stage in ("knowledge_sft", "sft", "grpo"):
        plan.notes.append("model.remat=none keeps every layer's activations for the backward pass")
    if acc is not None and acc["key"].startswith("h"):
        plan.notes.append("GPU: JAX preallocates 75% of HBM by default; set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 to "
                          "use the budget planned here")
    if config.model.get("init_from", ""):
        plan.notes.append(f"model.init_from={config.model.init_from!r} is not read: the plan sizes model.preset "
                          f"{config.model.preset!r} (or model.hf_path's config.json); set it to the checkpoint's model")
    if config.model.attention != "xla":
        plan.notes.append(f"attention={config.model.attention} compiles as the XLA reference on CPU: activations "
                          "are an upper bound for the flash kernel")
    return plan


def train_flops_per_token(model_cfg: Any, seq: int, setup: TrainSetup) -> float:
    """Model FLOPs per trained token: 6N + 12LHDT (`metrics.model_flops_per_token`); with a frozen base (LoRA) its
    weights get no gradient, so 2 of the 6 FLOPs per frozen parameter (the weight-gradient matmul) are not done,
    and the adapters (on top of the base's N) cost 6 each: 4 N + 6 N_adapters + 12LHDT (attention's backward is
    unchanged)."""
    from raredx_jax.training import metrics as metrics_lib  # noqa: PLC0415 - after the re-exec (see top)

    full = metrics_lib.model_flops_per_token(model_cfg, seq)
    if setup.frozen_abs is None:
        return full
    return full - 2.0 * model_cfg.num_params() + 6.0 * setup.trainable_params


def _base_plan(config: Any, model_cfg: Any, mesh: Any, acc: Any, setup: TrainSetup, stage: str) -> Plan:
    return Plan(stage=stage, target=config.hardware, preset=config.model.preset, num_devices=mesh.size,
                mesh=dict(mesh.shape), trainable=setup.name, num_params=model_cfg.num_params(),
                trainable_params=setup.trainable_params, accelerator=acc, hbm_bytes=0.0,
                params=_per_device_bytes(setup.state_abs.params) + setup.frozen_bytes_per_device,
                optimizer=_per_device_bytes(setup.state_abs.opt_state),
                gradients=_per_device_bytes(setup.state_abs.params), reference=0, kv_cache=0, phases=[])


def plan_sft(config: Any, model_cfg: Any, mesh: Any, acc: Any, trainable: str, cost: bool) -> Plan:
    """SFT / knowledge SFT: the trainer's `make_train_step`, one optimiser step of train.batch_size x seq_len."""
    import jax.numpy as jnp  # noqa: PLC0415 - after the re-exec (see top)

    from raredx_jax.training.lm import (  # noqa: PLC0415 - after the re-exec (see top)
        BATCH_KEYS,
        batch_sharding,
        check_batch,
        make_train_step,
    )

    tc = config.train
    b, t, accum = int(tc.batch_size), int(tc.seq_len), int(tc.get("grad_accum", 1))
    check_batch(mesh, b, accum)
    b_sh = batch_sharding(mesh, b, t)
    batch = {k: _sds((b, t), jnp.int32, b_sh) for k in BATCH_KEYS}

    def build(cfg: Any) -> tuple[Any, TrainSetup]:
        setup = TRAINABLE[trainable](cfg, mesh, config.optim, int(tc.steps), config=config)
        step = make_train_step(setup.graphdef, setup.tx, setup.schedule, setup.state_sh, mesh, (b, t),
                               grad_accum=accum, **setup.step_kwargs)
        return step.lower(setup.state_abs, batch, *setup.extra_args).compile(), setup

    compiled, setup = build(model_cfg)
    plan = _base_plan(config, model_cfg, mesh, acc, setup, config.stage)
    ph = _phase("train_step", compiled, 0)  # frozen weights (LoRA) are an argument of the step
    ph.tokens = b * t // mesh.size
    ph.model_flops = train_flops_per_token(model_cfg, t, setup) * ph.tokens
    if cost:
        ph.flops, ph.bytes_accessed = _layer_extrapolated_cost(lambda c: build(c)[0], model_cfg)
        _roofline(ph, acc)
    plan.phases.append(ph)
    shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    plan.scores_bytes = _scores_bytes(model_cfg, b // accum // shards, t, t)
    return plan


def _abstract_model_state(setup: TrainSetup) -> Any:
    """The nnx.State the sampler splits off the live model (the train state's parameters), as abstract values."""
    from flax import nnx  # noqa: PLC0415 - after the re-exec (see top)

    state = nnx.state(nnx.merge(setup.graphdef, setup.full_params_abs))
    nnx.replace_by_pure_dict(state, setup.full_params_abs)
    return state


def _lower_generate(model_cfg: Any, mesh: Any, state_abs: Any, graphdef: Any, prompts: int, n: int,
                    prompt_len: int, max_new: int, temperature: float, top_k: int, top_p: float) -> tuple[Any, Any]:
    """(compiled generate, abstract KV cache) exactly as `Sampler.generate` calls the jitted generate."""
    import jax  # noqa: PLC0415 - after the re-exec (see top)
    import jax.numpy as jnp  # noqa: PLC0415 - after the re-exec (see top)
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415 - after the re-exec (see top)

    from raredx_jax.models.transformer import KVCache  # noqa: PLC0415 - after the re-exec (see top)
    from raredx_jax.parallel.sharding import logical_to_spec  # noqa: PLC0415 - after the re-exec (see top)
    from raredx_jax.sampling import sampler as smp  # noqa: PLC0415 - after the re-exec (see top)

    rows, max_len = prompts * n, prompt_len + max_new
    shapes = jax.eval_shape(lambda: KVCache.init(model_cfg, rows, max_len, model_cfg.dtype))
    if hasattr(KVCache, "shardings"):
        shardings = KVCache.shardings(model_cfg, rows, max_len, mesh)
    else:  # the stacked [L, B, S, K, D] layout
        named = lambda axes, shape: NamedSharding(mesh, logical_to_spec(axes, shape, mesh))  # noqa: E731
        shardings = KVCache(k=named(smp.CACHE_AXES, shapes.k.shape), v=named(smp.CACHE_AXES, shapes.v.shape),
                            valid=named(smp.VALID_AXES, (rows, max_len)),
                            index=NamedSharding(mesh, PartitionSpec()))
    cache = jax.tree.map(lambda x, sh: _sds(x.shape, x.dtype, sh), shapes, shardings)
    row = lambda shape, dt, logical: _sds(shape, dt, NamedSharding(mesh, logical_to_spec(logical, shape, mesh)))  # noqa
    key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.split(jax.random.key(0), rows))).shape
    args = (row((prompts, prompt_len), jnp.int32, smp.ROW_AXES), row((prompts, prompt_len), jnp.int32, smp.ROW_AXES),
            row((prompts,), jnp.bool_, ("batch",)), row(key_shape, jnp.uint32, smp.ROW_AXES),
            row((1,), jnp.int32, (None,)), row((1, 1), jnp.int32, (None, None)))
    spec = smp.SampleSpec(n=int(n), max_new=int(max_new), temperature=float(temperature), top_k=int(top_k),
                     top_p=float(top_p), pad_id=0)
    compiled = smp.generate_jit.lower(graphdef, state_abs, cache, *args, spec=spec).compile()
    return compiled, cache


def _decode_roofline(ph: Phase, model_cfg: Any, acc: Any, params_bytes: int, cache: Any, rows_dev: int,
                     prompt_len: int, max_new: int) -> None:
    """Analytic rollout time: prefill FLOPs at peak + max_new decode steps, each reading the device's weights and
    its KV cache at the mean filled length (the decode loop is a while loop XLA's cost analysis counts once)."""
    if acc is None:
        return
    kv_bytes = _per_device_bytes(cache) * (prompt_len + max_new / 2) / (prompt_len + max_new)  # mean filled
    step_bytes = params_bytes + kv_bytes
    step_flops = 2.0 * model_cfg.num_params() * rows_dev
    prefill_flops = 2.0 * model_cfg.num_params() * rows_dev * prompt_len
    t_step = max(step_bytes / float(acc["hbm_bandwidth"]), step_flops / float(acc["peak_flops"]))
    ph.flops = prefill_flops + max_new * step_flops
    ph.bytes_accessed = max_new * step_bytes
    ph.time_s = prefill_flops / float(acc["peak_flops"]) + max_new * t_step
    ph.tokens = rows_dev * max_new
    ph.note = (f"analytic decode roofline: {rows_dev * max_new / ph.time_s:,.0f} tokens/s per device, "
               f"{t_step * 1e3:.2f} ms/step")


def plan_grpo(config: Any, model_cfg: Any, mesh: Any, acc: Any, trainable: str, cost: bool) -> Plan:
    """GRPO: rollout generate (prompts_per_step x group_size rows in sampling.batch_size chunks, prompts padded to
    sampling.max_prompt_len), the old-logprob / reference forward and the mini-batch update, as GRPOLearner runs
    them."""
    import jax  # noqa: PLC0415 - after the re-exec (see top)
    import jax.numpy as jnp  # noqa: PLC0415 - after the re-exec (see top)

    from raredx_jax.sampling.sampler import SamplingParams  # noqa: PLC0415 - after the re-exec (see top)
    from raredx_jax.training import grpo as g  # noqa: PLC0415 - after the re-exec (see top)
    from raredx_jax.training import rl_objectives as rlo  # noqa: PLC0415 - after the re-exec (see top)
    from raredx_jax.training.grpo import update as g_update  # noqa: PLC0415 - after the re-exec (see top)

    s = g.GRPOSettings.from_config(config)
    sp = SamplingParams.from_config(config.sampling)
    shards = int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
    layout = g.MiniBatchLayout.make(s.rows_per_step, s.minibatch_size, s.micro_batch_size, shards)
    updates = s.epochs_per_step * layout.num
    opt_cfg = config.optim
    prompt_len, comp = int(sp.max_prompt_len), int(sp.max_new_tokens)
    seq = prompt_len + comp
    loss_cfg = rlo.LossConfig.from_config(dataclasses.asdict(s), max_len=s.max_len or comp)
    with_ref = s.beta > 0
    low_precision = jnp.dtype(model_cfg.dtype) != jnp.float32
    recompute = s.old_logprobs == "recompute" or (s.old_logprobs == "auto" and low_precision)

    def setup_for(cfg: Any) -> TrainSetup:
        return TRAINABLE[trainable](cfg, mesh, opt_cfg, s.steps * updates, config=config)

    def mb(keys: tuple[str, ...]) -> dict[str, Any]:
        sh = g_update.batch_shardings(mesh, layout.padded, seq, comp, keys)
        out = {}
        for k in keys:
            if k in g_update.SEQ_KEYS:
                out[k] = _sds((layout.padded, seq), jnp.int32, sh[k])
            elif k == "advantages":
                out[k] = _sds((layout.padded,), jnp.float32, sh[k])
            else:
                out[k] = _sds((layout.padded, comp), jnp.float32, sh[k])
        return out

    upd_keys = (*g_update.SEQ_KEYS, "mask", "old_logprobs", "advantages") + (("ref_logprobs",) if with_ref else ())

    def build_update(cfg: Any) -> Any:
        st = setup_for(cfg)
        fn = g.make_update_fn(st.graphdef, st.tx, st.state_sh, mesh, layout, prompt_len, comp, loss_name=s.loss,
                              loss_cfg=loss_cfg, temperature=sp.temperature, with_ref=with_ref, **st.step_kwargs)
        inc = _sds((), jnp.int32, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        return fn.lower(st.state_abs, mb(upd_keys), inc, *st.extra_args).compile()

    def build_logprob(cfg: Any) -> Any:
        st = setup_for(cfg)
        full = st.full_params_abs
        fn = g.make_logprob_fn(st.graphdef, jax.tree.map(lambda x: x.sharding, full), mesh, layout, prompt_len, comp,
                               sp.temperature)
        return fn.lower(full, mb(g_update.SEQ_KEYS)).compile()

    setup = setup_for(model_cfg)
    plan = _base_plan(config, model_cfg, mesh, acc, setup, "grpo")
    params_b, opt_b = plan.params, plan.optimizer
    other_state = _per_device_bytes(setup.state_abs) - _per_device_bytes(setup.state_abs.params) - opt_b
    # beta > 0: a second copy of the policy weights, unless the frozen base (LoRA) is the reference
    plan.reference = params_b if with_ref and setup.frozen_abs is None else 0

    chunk = max(1, min(int(sp.batch_size), s.prompts_per_step))
    gen, cache = _lower_generate(model_cfg, mesh, _abstract_model_state(setup), setup.graphdef, chunk, s.group_size,
                                 prompt_len, comp, sp.temperature, sp.top_k, sp.top_p)
    plan.kv_cache = _per_device_bytes(cache)
    kept = 0 if s.release_kv_cache else plan.kv_cache
    n_chunks = -(-s.prompts_per_step // chunk)
    ph = _phase("rollout_generate", gen, opt_b + other_state + plan.reference,
                note=f"x{n_chunks} calls" if n_chunks > 1 else "")
    rows_dev = max(chunk * s.group_size // shards, 1)
    _decode_roofline(ph, model_cfg, acc, params_b, cache, rows_dev, prompt_len, comp)
    plan.phases.append(ph)

    tokens_dev = layout.padded * seq // mesh.size
    if recompute or with_ref:
        lp = _phase("logprob", build_logprob(model_cfg), opt_b + other_state + plan.reference + kept,
                    note=" + ".join(n for n, on in (("old-logprob", recompute), ("reference", with_ref)) if on)
                    + " forward per step" + ("; lowered with the adapters on (the reference forward runs the "
                                             "frozen base alone: no more memory)" if setup.frozen_abs is not None
                                             else ""))
        lp.tokens = tokens_dev
        if cost:
            lp.flops, lp.bytes_accessed = _layer_extrapolated_cost(build_logprob, model_cfg)
            _roofline(lp, acc)
        plan.phases.append(lp)
    up = _phase("update", build_update(model_cfg), plan.reference + kept,
                note=f"x{updates} per step" if updates > 1 else "")
    up.tokens = tokens_dev
    up.model_flops = train_flops_per_token(model_cfg, seq, setup) * tokens_dev
    if cost:
        up.flops, up.bytes_accessed = _layer_extrapolated_cost(build_update, model_cfg)
        _roofline(up, acc)
    plan.phases.append(up)
    plan.scores_bytes = _scores_bytes(model_cfg, layout.padded // layout.accum // shards, seq, seq)
    if not s.release_kv_cache:
        plan.notes.append("the sampler keeps its KV cache across the update (grpo.release_kv_cache=False)")
    return plan


def plan_evaluate(config: Any, model_cfg: Any, mesh: Any, acc: Any, trainable: str, cost: bool) -> Plan:
    """Evaluation: greedy generate of sampling.batch_size prompts padded to eval.max_prompt_len (the longest
    bucket), sampling.max_new_tokens each, from the checkpoint's parameters (param_dtype)."""
    from raredx_jax.training.state import abstract_params  # noqa: PLC0415 - after the re-exec (see top)

    graphdef, params_abs, param_sh = abstract_params(model_cfg, mesh)
    setup = TrainSetup("inference", graphdef, params_abs, param_sh, None, None, None, None,
                       trainable_params=0)
    sp = config.sampling
    prompts = int(sp.batch_size)
    shards = int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
    prompts = -(-prompts // shards) * shards
    prompt_len, max_new = int(config.eval.get("max_prompt_len", 1024)), int(sp.max_new_tokens)
    gen, cache = _lower_generate(model_cfg, mesh, _abstract_model_state(setup), graphdef, prompts, 1, prompt_len,
                                 max_new, 0.0, 0, 1.0)
    params_b = _per_device_bytes(params_abs)
    plan = Plan(stage="evaluate", target=config.hardware, preset=config.model.preset, num_devices=mesh.size,
                mesh=dict(mesh.shape), trainable="inference", num_params=model_cfg.num_params(), trainable_params=0,
                accelerator=acc, hbm_bytes=0.0, params=params_b, optimizer=0, gradients=0, reference=0,
                kv_cache=_per_device_bytes(cache), phases=[])
    ph = _phase("eval_generate", gen, 0)
    _decode_roofline(ph, model_cfg, acc, params_b, cache, max(prompts // shards, 1), prompt_len, max_new)
    plan.phases.append(ph)
    return plan


STAGE_PLANS: dict[str, Callable[..., Plan]] = {
    "knowledge_sft": plan_sft, "sft": plan_sft, "grpo": plan_grpo, "evaluate": plan_evaluate,
}


class Namespace(dict):
    """A nested dict read like a ConfigDict (`c.optim.lr`, `c["mesh"]`, `.get`): what `build_plan` reads, for
    callers without ml_collections (the accelerator image has none; benchmarks/accelerator_check.py)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def sft_config(preset: str, batch: int, seq: int, *, remat: str, attention: str, dtype: str = "bfloat16",
               hardware: str = "gpu1", vocab_size: int = 0) -> Namespace:
    """The fields of a knowledge-SFT config that the SFT plan reads, with the trainers' optimiser defaults (the
    optimiser's hyper-parameters do not change its memory)."""
    ns = lambda **kw: Namespace(kw)  # noqa: E731
    return ns(stage="knowledge_sft", hardware=hardware,
              model=ns(preset=preset, hf_path="", init_from="", dtype=dtype, param_dtype="float32", remat=remat,
                       scan_layers=True, attention=attention, vocab_size=vocab_size, max_seq_len=seq),
              mesh=ns(data=1, fsdp=-1, tensor=1), tokenizer=ns(vocab_size=vocab_size or 2048),
              train=ns(batch_size=batch, seq_len=seq, grad_accum=1, steps=1000),
              optim=ns(lr=1e-4, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.01, b1=0.9,
                       b2=0.95, grad_clip=1.0))


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _argv_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv[1:], 1):
        for prefix in (f"--{name}=", f"-{name}="):
            if a.startswith(prefix):
                return a[len(prefix):]
        if a in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def requested_devices(argv: list[str]) -> int:
    """--devices, else the target's NUM_DEVICES (from --config=...:target), else 1."""

    explicit = _argv_value(argv, "devices")
    if explicit:
        return int(explicit)
    cfg = _argv_value(argv, "config") or ""
    target = cfg.split(".py:", 1)[1] if ".py:" in cfg else "cpu"
    try:
        return int(hardware.target_num_devices(target) or 1)
    except ValueError:
        return 1  # the config loader reports the unknown target with its own message


def _force_devices(argv: list[str]) -> None:
    """Re-execute with the host platform forced to the target's device count (must happen before JAX starts)."""
    n = requested_devices(argv)
    if os.environ.get(_DEVICES_ENV) == str(n):
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_DEVICES_ENV: str(n)},
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n}".strip())
    os.execve(sys.executable, [sys.executable, "-m", "raredx_jax.plan", *argv[1:]], env)


def main(argv: list[str]) -> None:
    from raredx_jax.train import one_line  # noqa: PLC0415 - raredx_jax.train defines absl flags on import

    fail = _fail
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]} (use --config.x=y to override fields)")
    config = flags.FLAGS["config"].value
    if config is None:
        fail("--config is required, e.g. --config=configs/knowledge_sft.py:h100x8")
    F = flags.FLAGS
    try:
        plan = build_plan(config, num_devices=F.devices or None,
                          hbm_bytes=F.hbm_gib * GiB if F.hbm_gib else None, trainable=F.trainable, cost=F.cost)
    except ValueError as e:
        if os.environ.get("RAREDX_TRACEBACK"):
            raise
        print(f"plan: error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_plan(plan), flush=True)
    if F.json:
        tmp = f"{F.json}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(plan.as_dict(), f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, F.json)  # atomic: a reader sees the old file or the new one
    if not plan.fits:
        print(f"plan: error: {plan.stage} on {plan.target} needs {_gib(plan.total)} per device but the device has "
              f"{_gib(plan.hbm_bytes)}: {plan.knob()}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DOES_NOT_FIT)


def _define_flags() -> None:
    from ml_collections import config_flags  # noqa: PLC0415 - the accelerator image has no ml_collections

    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "Stage config file with a hardware target, e.g. "
                                        "configs/knowledge_sft.py:h100x8", lock_config=True)
    flags.DEFINE_integer("devices", 0, "devices to plan for (default: the target's NUM_DEVICES; 1 for cpu)")
    flags.DEFINE_float("hbm_gib", 0.0, "memory budget per device in GiB (default: the target's accelerator HBM)")
    flags.DEFINE_string("trainable", "full", f"trainable-parameter set: {', '.join(sorted(TRAINABLE))}")
    flags.DEFINE_bool("cost", True, "also compile 1- and 2-layer variants for the FLOPs / bytes roofline")
    flags.DEFINE_string("json", "", "also write the plan as JSON to this file")


def _fail(message: Any, code: int = 2) -> None:
    from raredx_jax.train import one_line  # noqa: PLC0415 - raredx_jax.train defines absl flags on import

    print(f"plan: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    _force_devices(sys.argv)
    from absl import app

    from raredx_jax import train

    train.fail = _fail  # the training CLI's flag / config-override errors (one line, exit 2), named as ours
    _define_flags()
    app.run(main, flags_parser=train.parse_flags)
