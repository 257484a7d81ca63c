"""One-shot accelerator check: everything a short GPU/TPU lease must measure, in one command, < 8 min on one H100/H200.

    python -m benchmarks.accelerator_check --out=accel_check          # on the accelerator
    python -m benchmarks.accelerator_check --cpu-dry --out=/tmp/dry   # tiny shapes on CPU, seconds (test suite)

Writes `<out>/accelerator_check.json` and `<out>/accelerator_check.md`. Sections (each isolated: on an
accelerator every section runs in its own subprocess, so an out-of-memory or a crash in one is recorded and the
others still run; JAX and PyTorch never share the device's memory pool):

1. logits: our model vs transformers on the 0.5B shape (random weights, exported through our HF safetensors
   writer and loaded by transformers): fp32 (matmul precision "highest" on both sides; relative L2 error must be
   < 1e-4: fp32 round-off of ~5k-term dot products through 24 layers is ~1e-5) and bf16 (our bf16 vs transformers
   fp32, judged against transformers' own bf16 vs fp32 error on the same input: ours must be within 2x of it).
2. attention: each implementation (xla, dot_product = cuDNN flash on GPU, splash on TPU) on [8, 2048, 14, 64]
   bf16 with GQA (2 KV heads) and a causal mask: output vs the xla reference computed in fp32 (relative error <
   2e-2, bf16 inputs and outputs), and forward + backward time.
3. sft: the SFT train step (benchmarks/train_step.py bench_jax: lm.make_train_step, AdamW, fp32 master weights)
   at 8 x 2048 bf16 for each remat policy, tokens/s and MFU, the PyTorch step (bench_torch) in the same run, and
   the device's peak memory (`memory_stats()["peak_bytes_in_use"]`) beside the AOT plan's prediction
   (raredx_jax/plan.py, compiled for CPU in a subprocess).
4. sampler: decode tokens/s and HBM-roofline fraction at batch 1/16/64 beside HF `generate`
   (benchmarks/sampler.py `run_one`, prompt 256, 256 new tokens).
5. grpo: one GRPO step's device work on the 0.5B shape: rollout generate (16 prompts x 4 samples, prompt 256, 256
   new), the old-logprob forward (bf16: recomputed, as GRPOLearner does) and the policy update (training/grpo/
   make_logprob_fn / make_update_fn), each timed warm, with the compile time apart. Rewards are random (the
   reward model is host code; its time is not the device's).

`--cpu-dry` runs the same sections at tiny shapes in-process (the plan still in a subprocess) so the test suite
keeps the script working. Needs only jax, flax, optax, torch, transformers, safetensors (no grain, ml-collections,
tensorflow-datasets, array-record, hpo3 or tensorboardX: the accelerator image lacks them).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import numpy as np

# JAX, PyTorch and the package load inside the sections (and `main`) that use them: `main` sets the platform's
# environment first (JAX_PLATFORMS, XLA_PYTHON_CLIENT_*), which JAX reads when it loads, and on an accelerator each
# section runs in its own process with one framework.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FULL = dict(preset="qwen2.5-0.5b", logits_batch=2, logits_seq=512, attn=(8, 2048, 14, 2, 64), sft_batch=8,
            sft_seq=2048, sft_steps=5, sft_dtype="bfloat16", remats=("none", "dots", "full"),
            sampler_batches=(1, 16, 64), prompt=256, new_tokens=256, grpo_prompts=16, grpo_group=4,
            grpo_micro=16)
# Every code path once, at the smallest shapes: one remat policy, one sampler batch, fp32 train step (bf16 is
# exercised by the logits and attention sections; XLA:CPU compiles bf16 programs slowly).
DRY = dict(preset="tiny", logits_batch=2, logits_seq=32, attn=(2, 64, 8, 4, 32), sft_batch=2, sft_seq=64,
           sft_steps=2, sft_dtype="float32", remats=("dots",), sampler_batches=(1,), prompt=16, new_tokens=8,
           grpo_prompts=2, grpo_group=2, grpo_micro=0)
TINY_VOCAB = 512  # the tiny preset takes its vocabulary from the tokenizer; the check fixes one

_CHILD_ENV: dict[str, str] | None = None  # environment of the section subprocesses (set by main)

# Sections that run JAX and PyTorch on the device in one process (the rest run one framework each).
MIXED_SECTIONS = ("logits", "sampler")

# Tolerances (see the module docstring for where they come from).
FP32_REL_TOL = 1e-4
BF16_VS_HF_FACTOR = 2.0
ATTN_REL_TOL = 2e-2


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _model_cfg(s: dict, dtype: str, *, remat: str = "none", attention: str = "xla", param_dtype: str = "float32"):
    from raredx_jax.models.config import PRESETS, ModelConfig  # noqa: PLC0415 - per section (see top)

    shape = dict(PRESETS[s["preset"]])
    if s["preset"] == "tiny":
        shape["vocab_size"] = TINY_VOCAB
    return ModelConfig(**shape, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)


def _shape(s: dict) -> dict:
    from raredx_jax.models.config import PRESETS  # noqa: PLC0415 - per section (see top)

    shape = dict(PRESETS[s["preset"]])
    if s["preset"] == "tiny":
        shape["vocab_size"] = TINY_VOCAB
    return shape


def _on_accelerator() -> bool:
    import jax  # noqa: PLC0415 - per section (see top)

    return jax.default_backend() != "cpu"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _timed(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of `fn` (which must block until its result is ready)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_bytes() -> int | None:
    import jax  # noqa: PLC0415 - per section (see top)

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


# ---------------------------------------------------------------------------------------------------------------
# sections (each returns a JSON-able dict)
# ---------------------------------------------------------------------------------------------------------------


def section_logits(s: dict) -> dict:
    """fp32 and bf16 logits of our model vs transformers, same weights (exported by our HF writer)."""
    import jax  # noqa: PLC0415 - per section (see top)
    import torch  # noqa: PLC0415 - per section (see top)
    import transformers  # noqa: PLC0415 - per section (see top)

    from raredx_jax.checkpoints.hf_io import init_model, save_hf_model  # noqa: PLC0415 - per section (see top)
    from raredx_jax.parallel.mesh import single_device_mesh  # noqa: PLC0415 - per section (see top)

    mesh = single_device_mesh()
    cfg32 = _model_cfg(s, "float32")
    model = init_model(cfg32, mesh, seed=0)
    rng = np.random.default_rng(0)
    b, t = s["logits_batch"], s["logits_seq"]
    tokens = rng.integers(3, cfg32.vocab_size, (b, t)).astype(np.int32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    with jax.default_matmul_precision("highest"):
        ours32 = np.asarray(jax.jit(lambda m, x, p: m(x, p)[0])(model, tokens, positions))
    from flax import nnx  # noqa: PLC0415 - per section (see top)

    cfg16 = cfg32.replace(dtype="bfloat16")
    model16 = init_model(cfg16, mesh, seed=0)
    nnx.update(model16, nnx.state(model))  # same fp32 master weights, bf16 compute
    ours16 = np.asarray(jax.jit(lambda m, x, p: m(x, p)[0])(model16, tokens, positions))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_model(model, tmp, dtype="float32")
        del model, model16
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(dev).eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.as_tensor(tokens, dtype=torch.long, device=dev)
    with torch.no_grad():
        hf32 = hf(input_ids=ids).logits.float().cpu().numpy()
        hf16 = hf.to(torch.bfloat16)(input_ids=ids).logits.float().cpu().numpy()
    del hf
    fp32_rel = _rel(ours32, hf32)
    bf16_rel = _rel(ours16, hf32)
    hf_bf16_rel = _rel(hf16, hf32)
    return {
        "shape": f"{s['preset']} {b}x{t}", "fp32_rel_l2": fp32_rel,
        "fp32_max_abs": float(np.abs(ours32 - hf32).max()), "fp32_ok": fp32_rel < FP32_REL_TOL,
        "bf16_rel_l2_vs_hf_fp32": bf16_rel, "hf_bf16_rel_l2_vs_hf_fp32": hf_bf16_rel,
        "bf16_ok": bf16_rel <= BF16_VS_HF_FACTOR * max(hf_bf16_rel, 1e-6),
        "bf16_argmax_agreement": float((ours16.argmax(-1) == hf32.argmax(-1)).mean()),
        "torch_device": dev,
    }


def section_attention(s: dict) -> dict:
    """Each attention implementation vs the xla reference in fp32; forward + backward time."""
    import jax  # noqa: PLC0415 - per section (see top)
    import jax.numpy as jnp  # noqa: PLC0415 - per section (see top)

    from raredx_jax.models.attention import attend  # noqa: PLC0415 - per section (see top)

    b, t, h, k, d = s["attn"]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
    kk = jnp.asarray(rng.standard_normal((b, t, k, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, t, k, d)), jnp.bfloat16)
    seg = jnp.ones((b, t), jnp.int32)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(jax.jit(lambda *a: attend("xla", *a))(q.astype(jnp.float32), kk.astype(jnp.float32),
                                                              v.astype(jnp.float32), mask, seg))
    impls = ["xla", "dot_product"] + (["splash"] if jax.default_backend() == "tpu" else [])
    out = {"shape": f"B{b} T{t} H{h} K{k} D{d} bf16 causal", "backend": jax.default_backend(), "impls": {}}
    for impl in impls:
        fwd = jax.jit(lambda q, kk, v, impl=impl: attend(impl, q, kk, v, mask, seg))
        grad = jax.jit(jax.grad(lambda q, kk, v, impl=impl: attend(impl, q, kk, v, mask, seg)
                                .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        o = np.asarray(fwd(q, kk, v).astype(jnp.float32))
        jax.block_until_ready(grad(q, kk, v))
        rel = _rel(o, ref)
        t_f = _timed(lambda: fwd(q, kk, v).block_until_ready(), 5)
        t_b = _timed(lambda: jax.block_until_ready(grad(q, kk, v)), 5)
        out["impls"][impl] = {"rel_l2_vs_fp32_ref": rel, "ok": rel < ATTN_REL_TOL, "fwd_ms": t_f * 1e3,
                              "fwd_bwd_ms": t_b * 1e3}
    return out


def section_sft_remat(s: dict, remat: str) -> dict:
    """One remat policy: our SFT step (tokens/s, MFU, peak device memory)."""
    from benchmarks.train_step import bench_jax  # noqa: PLC0415 - per section (see top)
    from raredx_jax.training import metrics as M  # noqa: PLC0415 - per section (see top)

    on_acc = _on_accelerator()
    dtype = s["sft_dtype"]
    attention = "dot_product" if on_acc else "xla"
    b, t = s["sft_batch"], s["sft_seq"]
    j = bench_jax(_shape(s), b, t, dtype, remat, attention, s["sft_steps"], 2)
    cfg = j.pop("cfg")
    fpt = M.model_flops_per_token(cfg, t)
    tps = b * t / j["step_s"]
    return {"remat": remat, "attention": attention, "tokens_per_s": tps, "step_s": j["step_s"],
            "compile_s": j["compile_s"], "loss": j["loss"], "device": j["device"],
            "mfu": M.mfu(tps, fpt, j["devices"], M.device_peak_flops(j["device"], dtype)),
            "peak_bytes_in_use": _peak_bytes()}


def section_sft_torch(s: dict) -> dict:
    from benchmarks.train_step import bench_torch  # noqa: PLC0415 - per section (see top)
    from raredx_jax.training import metrics as M  # noqa: PLC0415 - per section (see top)

    b, t, dtype = s["sft_batch"], s["sft_seq"], s["sft_dtype"]
    r = bench_torch(_shape(s), b, t, dtype, s["sft_steps"], 2)
    fpt = M.model_flops_per_token(_model_cfg(s, dtype), t)
    tps = b * t / r["step_s"]
    return {"tokens_per_s": tps, "step_s": r["step_s"], "loss": r["loss"], "device": r["device"],
            "mfu": M.mfu(tps, fpt, 1, M.device_peak_flops(r["device"], dtype))}


def section_plan(s: dict, hardware: str) -> dict:
    """The AOT plan of the same SFT steps, per remat policy (CPU compile, in a CPU-only subprocess)."""
    from raredx_jax.plan import build_plan, sft_config  # noqa: PLC0415 - per section (see top)

    on_acc = os.environ.get("RAREDX_CHECK_FOR_ACCELERATOR") == "1"
    out = {}
    for remat in s["remats"]:
        c = sft_config(s["preset"], s["sft_batch"], s["sft_seq"], remat=remat,
                       attention="dot_product" if on_acc else "xla", dtype=s["sft_dtype"], hardware=hardware,
                       vocab_size=TINY_VOCAB if s["preset"] == "tiny" else 0)
        plan = build_plan(c, num_devices=1, hbm_bytes=None if hardware != "cpu" else 1e12, cost=False)
        out[remat] = {"planned_total": plan.total, "params": plan.params, "optimizer": plan.optimizer,
                      "activations": plan.activations, "hbm": plan.hbm_bytes, "fits": plan.fits}
    return out


def section_sampler(s: dict) -> dict:
    """benchmarks/sampler.py run_one at each batch (ours and HF generate in the same process, one after the other)."""

    from benchmarks.sampler import run_one  # noqa: PLC0415 - per section (see top)

    # one timed repeat in the dry run (where run_one takes the argument): the figures are not the point there
    kw = {"repeats": 1} if s is DRY and "repeats" in inspect.signature(run_one).parameters else {}
    rows = []
    for b in s["sampler_batches"]:
        r = run_one(s["preset"], b, 1, s["prompt"], s["new_tokens"], hf=True, **kw)
        d = dataclasses.asdict(r)
        d["ratio"] = r.ratio
        rows.append(d)
    return {"rows": rows}


def section_grpo(s: dict) -> dict:
    """One GRPO step's device work (module docstring, 5), warm, with the compile of the first step apart."""

    import jax  # noqa: PLC0415 - per section (see top)
    from flax import nnx  # noqa: PLC0415 - per section (see top)

    from raredx_jax.checkpoints.hf_io import init_model  # noqa: PLC0415 - per section (see top)
    from raredx_jax.parallel.mesh import make_mesh  # noqa: PLC0415 - per section (see top)
    from raredx_jax.sampling import Sampler, SamplingParams  # noqa: PLC0415 - per section (see top)
    from raredx_jax.training import grpo as g  # noqa: PLC0415 - per section (see top)
    from raredx_jax.training import rl_objectives as rlo  # noqa: PLC0415 - per section (see top)
    from raredx_jax.training.grpo import update as g_update  # noqa: PLC0415 - per section (see top)
    from raredx_jax.training.optim import make_optimizer  # noqa: PLC0415 - per section (see top)
    from raredx_jax.training.rollout import Generated, training_layout  # noqa: PLC0415 - per section (see top)
    from raredx_jax.training.state import create_train_state, split_model  # noqa: PLC0415 - per section (see top)

    on_acc = _on_accelerator()
    dtype = "bfloat16" if on_acc else "float32"
    cfg = _model_cfg(s, dtype, remat="dots" if on_acc else "none", attention="dot_product" if on_acc else "xla")
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    P, G, Lp, C = s["grpo_prompts"], s["grpo_group"], s["prompt"], s["new_tokens"]
    settings = g.GRPOSettings(steps=10, prompts_per_step=P, group_size=G, loss="dr_grpo", advantage="dr_grpo",
                              beta=0.0)
    # micro-batches of grpo_micro rows: [64, 512, 152k] fp32 logits of one pass would be 20 GB on the 0.5B shape
    layout = g.MiniBatchLayout.make(settings.rows_per_step, 0, s["grpo_micro"], 1)
    tx, _ = make_optimizer({"lr": 1e-6, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0, "b1": 0.9,
                            "b2": 0.99}, total_steps=10, lr=1e-6)
    from raredx_jax.training.state import (  # noqa: PLC0415 - per section (see top)
        abstract_params,
        train_state_shardings,
    )

    with jax.set_mesh(mesh):
        model = init_model(cfg, mesh, seed=0)
        graphdef, params = split_model(model)
        _, p_abs, p_sh = abstract_params(cfg, mesh)
        state_sh = train_state_shardings(tx, p_abs, p_sh, mesh)
        state = create_train_state(params, tx, 0, state_sh)
        nnx.update(model, state.params)
        sampler = Sampler(model)
        loss_cfg = rlo.LossConfig.from_config(dataclasses.asdict(settings), max_len=C)
        update = g.make_update_fn(graphdef, tx, state_sh, mesh, layout, Lp, C, loss_name="dr_grpo",
                                  loss_cfg=loss_cfg, temperature=1.0, with_ref=False)
        lp_fn = g.make_logprob_fn(graphdef, p_sh, mesh, layout, Lp, C, 1.0)
        rng = np.random.default_rng(0)
        prompts = rng.integers(3, cfg.vocab_size, (P, Lp)).astype(np.int32)
        sp = SamplingParams(temperature=1.0, max_new_tokens=C, max_prompt_len=Lp, batch_size=P)
        splits = []
        for it in range(2):
            t0 = time.perf_counter()
            out = sampler.generate(prompts, np.ones_like(prompts), it, sp, n=G, eos_ids=())
            gen = Generated(prompt_tokens=prompts, prompt_mask=np.ones_like(prompts),
                            tokens=np.asarray(out.tokens), logprobs=np.asarray(out.logprobs),
                            lengths=np.asarray(out.lengths), done=np.asarray(out.done))
            t1 = time.perf_counter()
            lay = training_layout(gen, G, 0)
            rewards = rng.random(P * G).astype(np.float32)
            adv = np.asarray(rlo.compute_advantages("dr_grpo", rewards, G), np.float32)
            sh = g_update.batch_shardings(mesh, layout.padded, Lp + C, C, g_update.SEQ_KEYS)
            seq_in = g_update.put_batch({k: lay[k] for k in g_update.SEQ_KEYS}, sh)
            old = np.asarray(lp_fn(state.params, seq_in))
            t2 = time.perf_counter()
            arr = {**{k: lay[k] for k in g_update.SEQ_KEYS}, "mask": lay["mask"], "old_logprobs": old,
                   "advantages": adv}
            keys = (*g_update.SEQ_KEYS, "mask", "old_logprobs", "advantages")
            batch_sh = g_update.batch_shardings(mesh, layout.padded, Lp + C, C, keys)
            state, m = update(state, g_update.put_batch(arr, batch_sh), jax.device_put(np.int32(1)))
            loss = float(m["loss"])
            nnx.update(model, state.params)
            t3 = time.perf_counter()
            splits.append({"rollout_s": t1 - t0, "logprob_s": t2 - t1, "update_s": t3 - t2, "total_s": t3 - t0,
                           "loss": loss})
    first, warm = splits
    gen_tokens = int(np.asarray(out.lengths).sum())
    return {"rows": P * G, "micro_batches": layout.accum, "prompt": Lp, "new_tokens": C, "dtype": dtype, "warm": warm,
            "first_step_s": first["total_s"], "rollout_tokens_per_s": gen_tokens / warm["rollout_s"],
            "update_tokens_per_s": layout.padded * (Lp + C) / warm["update_s"], "finite": bool(np.isfinite(loss))}


# ---------------------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------------------


def _sections(s: dict, hardware: str) -> list[tuple[str, Callable[[], dict], str]]:
    """(name, fn, where) with where = 'device' (subprocess on an accelerator) or 'cpu' (always a CPU subprocess)."""
    out = [("logits", lambda: section_logits(s), "device"), ("attention", lambda: section_attention(s), "device")]
    out.append(("plan", lambda: section_plan(s, hardware), "cpu"))
    for r in s["remats"]:
        out.append((f"sft_{r}", lambda r=r: section_sft_remat(s, r), "device"))
    out += [("sft_torch", lambda: section_sft_torch(s), "device"), ("sampler", lambda: section_sampler(s), "device"),
            ("grpo", lambda: section_grpo(s), "device")]
    return out


def _run_section(name: str, fn: Callable[[], dict], where: str, *, isolate: bool, dry: bool, hardware: str,
                 timeout: float) -> dict:
    t0 = time.time()
    if where == "cpu" or isolate:
        base = _CHILD_ENV if _CHILD_ENV is not None else os.environ
        env = dict(base, PYTHONPATH=ROOT + os.pathsep + base.get("PYTHONPATH", ""))
        if where == "cpu":
            env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                       RAREDX_CHECK_FOR_ACCELERATOR="0" if dry else "1")
        elif name in MIXED_SECTIONS:  # JAX and PyTorch in one process: JAX must not take the GPU's memory up front
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        else:
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # what the plan budgets (hardware notes)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "section.json")
            cmd = [sys.executable, "-m", "benchmarks.accelerator_check", f"--section={name}", f"--section_out={path}",
                   f"--hardware={hardware}"] + (["--cpu-dry"] if dry else [])
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            except subprocess.TimeoutExpired:
                return {"error": f"timed out after {timeout:.0f} s", "seconds": round(time.time() - t0, 1)}
            if proc.returncode != 0 or not os.path.exists(path):
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                return {"error": " | ".join(tail) or f"exit {proc.returncode}", "seconds": round(time.time() - t0, 1)}
            with open(path, encoding="utf-8") as f:
                res = json.load(f)
    else:
        try:
            res = fn()
        except Exception as e:  # recorded in the report; the other sections still run
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _fmt(x: Any, spec: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def markdown(report: dict) -> str:
    r = report["sections"]
    L = [f"# Accelerator check ({report['mode']})", "",
         f"Device: {report['device']} ({report['backend']}), JAX {report['jax']}, {report['when']}; "
         f"{report['seconds']:.0f} s in all.", ""]

    def err(name: str) -> bool:
        if name not in r:
            L.append(f"- {name}: not run (--only)")
            return True
        if "error" in r[name]:
            L.append(f"- **{name}: error** {r.get(name, {}).get('error', 'not run')}")
            return True
        return False

    L.append("## Logits vs transformers")
    if not err("logits"):
        x = r["logits"]
        L += [f"{x['shape']}: fp32 relative L2 {x['fp32_rel_l2']:.2e} (max abs {x['fp32_max_abs']:.2e}; "
              f"{'ok' if x['fp32_ok'] else 'FAIL'} < {FP32_REL_TOL}); bf16 {x['bf16_rel_l2_vs_hf_fp32']:.2e} vs "
              f"transformers' own bf16 {x['hf_bf16_rel_l2_vs_hf_fp32']:.2e} ({'ok' if x['bf16_ok'] else 'FAIL'}, "
              f"argmax agreement {x['bf16_argmax_agreement']:.1%})"]
    L += ["", "## Attention implementations"]
    if not err("attention"):
        x = r["attention"]
        L += [f"{x['shape']} on {x['backend']}:", "", "| impl | rel. error vs fp32 xla | fwd ms | fwd+bwd ms |",
              "|---|---|---|---|"]
        for k, v in x["impls"].items():
            L.append(f"| {k} | {v['rel_l2_vs_fp32_ref']:.2e} ({'ok' if v['ok'] else 'FAIL'}) | {v['fwd_ms']:.2f} | "
                     f"{v['fwd_bwd_ms']:.2f} |")
    L += ["", "## SFT train step", "", "| step | tokens/s | MFU | step ms | peak memory | planned | plan error |",
          "|---|---|---|---|---|---|---|"]
    for name, sec in r.items():
        if not name.startswith("sft_"):
            continue
        if "error" in sec:
            L.append(f"| {name} | error: {sec['error'][:120]} | | | | | |")
            continue
        plan = r.get("plan", {}).get(name[4:], {})
        planned = plan.get("planned_total")
        peak = sec.get("peak_bytes_in_use")
        perr = f"{(planned - peak) / peak:+.0%}" if planned and peak else "n/a"
        gib = lambda v: "n/a" if not v else f"{v / 2**30:.2f} GiB"  # noqa: E731
        L.append(f"| {'jax remat=' + sec['remat'] if 'remat' in sec else 'pytorch'} | {_fmt(sec['tokens_per_s'])} | "
                 f"{_pct(sec.get('mfu'))} | {sec['step_s'] * 1e3:.1f} | {gib(peak)} | {gib(planned)} | {perr} |")
    L += ["", "## Sampler decode vs HF generate"]
    if not err("sampler"):
        L += ["", "| batch | ours decode tok/s | HF decode tok/s | ratio | HBM roofline |", "|---|---|---|---|---|"]
        for x in r["sampler"]["rows"]:
            ratio = "n/a" if x["ratio"] is None else f"{x['ratio']:.1f}x"
            L.append(f"| {x['batch']} | {_fmt(x['ours_decode_tok_s'])} | {_fmt(x['hf_decode_tok_s'])} | {ratio} | "
                     f"{_pct(x['roofline_fraction'])} |")
    L += ["", "## One GRPO step"]
    if not err("grpo"):
        x = r["grpo"]
        w = x["warm"]
        L.append(f"{x['rows']} rows, prompt {x['prompt']} + {x['new_tokens']} new, {x['dtype']}: warm step "
                 f"{w['total_s']:.2f} s = rollout {w['rollout_s']:.2f} s + old-logprob {w['logprob_s']:.2f} s + "
                 f"update {w['update_s']:.2f} s (first step with compiles {x['first_step_s']:.1f} s); rollout "
                 f"{_fmt(x['rollout_tokens_per_s'])} tokens/s, update {_fmt(x['update_tokens_per_s'])} tokens/s")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="accelerator_check", help="folder for accelerator_check.json / .md")
    ap.add_argument("--cpu-dry", dest="cpu_dry", action="store_true", help="tiny shapes on CPU (seconds)")
    ap.add_argument("--hardware", default="", help="target the plan compares against (default gpu1; cpu for dry)")
    ap.add_argument("--only", default="", help="comma-separated section names (default: all)")
    ap.add_argument("--isolate", action="store_true", help="run every section in its own process (the default on "
                    "an accelerator; with --cpu-dry it checks that path on CPU)")
    ap.add_argument("--section", default="", help=argparse.SUPPRESS)
    ap.add_argument("--section_out", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.cpu_dry:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    s = DRY if a.cpu_dry else FULL
    hardware = a.hardware or ("cpu" if a.cpu_dry else "gpu1")
    sections = _sections(s, hardware)
    if a.section:  # child process: run one section, write its JSON
        fn = dict((n, f) for n, f, _ in sections)[a.section]
        res = fn()
        with open(a.section_out, "w", encoding="utf-8") as f:
            json.dump(res, f, default=float)
        return 0

    global _CHILD_ENV
    _CHILD_ENV = dict(os.environ)  # the sections' processes start from the caller's environment
    # this orchestrating process only reads the device's name: it must not take the GPU's memory from the sections
    if not a.cpu_dry:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax  # noqa: PLC0415 - per section (see top)

    t0 = time.time()
    isolate = a.isolate or (not a.cpu_dry and jax.default_backend() != "cpu")
    only = {x for x in a.only.split(",") if x}
    report = {"mode": "cpu-dry" if a.cpu_dry else "full", "device": jax.devices()[0].device_kind,
              "backend": jax.default_backend(), "jax": jax.__version__, "hardware": hardware,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shapes": s, "sections": {}}
    budget = 8 * 60 - 20
    for name, fn, where in sections:
        if only and name not in only:
            continue
        left = budget - (time.time() - t0)
        if left < 10 and not a.cpu_dry:
            report["sections"][name] = {"error": "skipped: the 8-minute budget is spent"}
            continue
        res = _run_section(name, fn, where, isolate=isolate, dry=a.cpu_dry, hardware=hardware,
                           timeout=max(left, 10) if not a.cpu_dry else 600)
        report["sections"][name] = res
        print(f"[accelerator_check] {name}: {'error: ' + res['error'] if 'error' in res else 'ok'} "
              f"({res['seconds']} s)", flush=True)
    report["seconds"] = time.time() - t0
    os.makedirs(a.out, exist_ok=True)
    for fname, text in (("accelerator_check.json", json.dumps(report, indent=2, default=float)),
                        ("accelerator_check.md", markdown(report))):
        tmp = os.path.join(a.out, fname + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(a.out, fname))
    print(markdown(report), flush=True)
    errors = [n for n, r in report["sections"].items() if "error" in r]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
