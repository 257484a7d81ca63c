"""The AOT plan (raredx_jax/plan.py) against what the compiled step really uses on CPU.

How "actually uses" is measured (CPU has no device memory statistics: `Device.memory_stats()` is None): the
real train step runs in a fresh single-device subprocess with glibc's mmap threshold fixed low
(`MALLOC_MMAP_THRESHOLD_=65536`, so every XLA buffer is its own mapping and is returned to the OS when freed).
After a warm-up call, the process's peak-RSS counter is reset (`/proc/self/clear_refs` = 5) and the step runs
once more; actual per-device memory = bytes of the live JAX arrays at the call (the train state and the batch,
`jax.live_arrays()`) + the rise of peak RSS during the call (the program's temporaries and outputs). The plan's
figure comes from abstract shapes only (`build_plan`, nothing allocated). Sharding is checked separately on 8
devices: the plan's per-device parameter and optimiser bytes equal the shards a real train state holds on a device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Mid-size shape as an HF config.json (preset=hf): ~14M parameters, 16k vocabulary (the logits dominate, as in
# the real models), 4 x 128 tokens per step.
MID_HF = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=16384, hidden_size=384,
              intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=1024)


def _config(shape: str, hf_dir: str | None = None):
    sys.path.insert(0, str(ROOT))
    from configs.knowledge_sft import get_config

    c = get_config("cpu")
    c.train.batch_size, c.train.seq_len = 4, 128
    if shape == "mid":
        c.model.preset, c.model.hf_path = "hf", hf_dir
    return c


def _measure(shape: str, hf_dir: str | None) -> dict:
    """Subprocess body: the plan's peak and the measured peak of the same train step (module docstring)."""
    import gc

    import jax
    import numpy as np

    from raredx_jax.checkpoints.hf_io import init_model
    from raredx_jax.parallel.mesh import make_mesh
    from raredx_jax.plan import _model_cfg, build_plan
    from raredx_jax.training.lm import batch_sharding, make_train_step, to_global
    from raredx_jax.training.optim import make_optimizer
    from raredx_jax.training.state import abstract_params, create_train_state, split_model, train_state_shardings

    config = _config(shape, hf_dir)
    plan = build_plan(config, num_devices=1, hbm_bytes=1e12, cost=False)
    mesh = make_mesh(config.mesh)
    cfg = _model_cfg(config)
    b, t = int(config.train.batch_size), int(config.train.seq_len)
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    with jax.set_mesh(mesh):
        graphdef, params = split_model(init_model(cfg, mesh, seed=0))
        _, p_abs, p_sh = abstract_params(cfg, mesh)
        sh = train_state_shardings(tx, p_abs, p_sh, mesh)
        state = create_train_state(params, tx, 0, sh)
        del params
        step = make_train_step(graphdef, tx, schedule, sh, mesh, (b, t))
        rng = np.random.default_rng(0)
        host = {"tokens": rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32),
                "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.int32),
                "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}
        batch = to_global(host, batch_sharding(mesh, b, t))
        state, m = step(state, batch)  # compile + warm-up: every buffer of the program allocated once
        jax.block_until_ready((state, m))
        del m
        gc.collect()
        live = sum(x.nbytes for x in jax.live_arrays())

        def status(key: str) -> int:
            with open("/proc/self/status") as f:
                return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":"))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = status("VmRSS")
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        rise = status("VmHWM") - base
    ph = plan.phases[0]
    return {"planned": ph.peak, "live": live, "rise": rise, "actual": live + rise, "temp": ph.temp,
            "argument": ph.argument}


def test_planned_memory_within_15_percent_of_measured(tmp_path):
    """tiny (~4M parameters) and mid (~14M, 16k vocabulary), 4 x 128 tokens, one CPU device each (measured in one
    subprocess, one after the other: see the module docstring)."""
    hf_dir = tmp_path / "mid"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(MID_HF))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, str(hf_dir)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(results) == {"tiny", "mid"}
    for shape, r in results.items():
        # the plan's arguments are the live state + batch: equal up to a few host scalars
        assert abs(r["argument"] - r["live"]) <= 0.01 * r["live"], (shape, r)
        assert abs(r["planned"] - r["actual"]) <= 0.15 * r["actual"], (shape, r)
        assert r["temp"] > r["argument"], (shape, r)  # temporaries are most of the step: memory_analysis is tested
    assert results["mid"]["actual"] > 1.5 * results["tiny"]["actual"]


def test_plan_shards_state_like_the_trainer():
    """8 devices: the plan's per-device parameter + optimiser bytes equal a real train state's shards on device 0."""
    import jax

    from raredx_jax.checkpoints.hf_io import init_model
    from raredx_jax.parallel.mesh import make_mesh
    from raredx_jax.plan import _model_cfg, build_plan
    from raredx_jax.training.optim import make_optimizer
    from raredx_jax.training.state import abstract_params, create_train_state, split_model, train_state_shardings

    assert jax.device_count() == 8, "tests/run.sh forces 8 host devices"
    config = _config("tiny")
    config.train.batch_size, config.train.seq_len = 8, 64
    plan = build_plan(config, hbm_bytes=1e12, cost=False)
    assert plan.fits
    assert plan.num_devices == 8 and plan.mesh["fsdp"] == 8
    mesh = make_mesh(config.mesh)
    cfg = _model_cfg(config)
    tx, _ = make_optimizer(config.optim, int(config.train.steps))
    with jax.set_mesh(mesh):
        _, params = split_model(init_model(cfg, mesh, seed=0))
        _, p_abs, p_sh = abstract_params(cfg, mesh)
        state = create_train_state(params, tx, 0, train_state_shardings(tx, p_abs, p_sh, mesh))
    dev0 = jax.devices()[0]

    def on_dev0(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev0)

    assert plan.params == on_dev0(state.params)
    assert plan.optimizer == on_dev0(state.opt_state)
    total_params = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert plan.params < total_params / 4  # really sharded (embedding and matrices over fsdp)
    assert plan.trainable_params == plan.num_params == cfg.num_params()


def test_plan_refuses_over_hbm_and_names_the_knob():
    """The CLI: a plan over the budget exits 4 with one line naming remat / micro batch (activations dominate)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "raredx_jax.plan", "--config=configs/knowledge_sft.py", "--devices=1",
            "--config.train.batch_size=4", "--config.train.seq_len=128", "--hbm_gib=0.02", "--nocost"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 4, out.stderr[-2000:]
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("plan: error:")]
    assert len(err) == 1, out.stderr
    assert "--config.model.remat=full" in err[0] and "grad_accum" in err[0], err[0]
    assert "DOES NOT FIT" in out.stdout and "activations/temps" in out.stdout


def test_knob_for_state_bound_plan_is_fsdp_or_lora():
    """A plan whose parameters + optimiser dominate (7B on one 80 GB GPU) names fsdp and LoRA, from the numbers:
    113 GiB of state next to 20 GiB of activations in 74.5 GiB needs 113 / (74.5 - 20) -> 3 devices."""
    from raredx_jax.plan import Phase, Plan, suggest_knob

    gib = 1 << 30
    plan = Plan(stage="knowledge_sft", target="gpu1", preset="qwen2.5-7b", num_devices=1,
                mesh={"data": 1, "fsdp": 1, "tensor": 1}, trainable="full", num_params=7_600_000_000,
                trainable_params=7_600_000_000, accelerator=None, hbm_bytes=80e9, params=28 * gib,
                optimizer=57 * gib, gradients=28 * gib, reference=0, kv_cache=0,
                phases=[Phase("train_step", argument=85 * gib, output=85 * gib, alias=85 * gib, temp=48 * gib,
                              extra_persistent=0)])
    assert not plan.fits
    knob = suggest_knob(plan)
    assert "fsdp" in knob and "LoRA" in knob and ">= 3 devices" in knob, knob
    plan.trainable = "lora (r=8, q_proj)"  # already LoRA: the frozen base is the state to shrink
    knob = suggest_knob(plan)
    assert "--config.lora.quantize=nf4" in knob and "lora.enabled" not in knob, knob


def test_grpo_plan_has_every_phase_and_the_kv_cache():
    """GRPO (tiny, cpu target): rollout generate, reference forward and update compiled; the reference is a second
    copy of the parameters (beta > 0) and the sampler's KV cache stays allocated through the update."""
    sys.path.insert(0, str(ROOT))
    from configs.rl_curriculum import get_config
    from raredx_jax.plan import build_plan

    c = get_config("cpu")
    c.sampling.max_prompt_len, c.sampling.max_new_tokens = 64, 16
    plan = build_plan(c, num_devices=2, hbm_bytes=1e12, cost=False)
    names = [p.name for p in plan.phases]
    assert names == ["rollout_generate", "logprob", "update"], names
    assert plan.reference == plan.params > 0
    assert plan.kv_cache > 0
    update = plan.phases[-1]
    assert update.extra_persistent >= plan.reference + plan.kv_cache
    assert plan.total == max(p.peak for p in plan.phases)


def _lora_expected(cfg, rank: int, block: int) -> dict:
    """From the shapes alone: rank-r adapters on the seven projections (A [L, in, r], B [L, r, out]); the
    projections' weight count and their int8 (per output channel) / nf4 (blocks of `block` along the last input
    axis, the whole axis when it does not divide) scale counts."""
    L, E, H, K, D, M = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size)
    # projection: (input dims, output dims)
    proj = {"q": ((E,), (H, D)), "k": ((E,), (K, D)), "v": ((E,), (K, D)), "o": ((H, D), (E,)),
            "gate": ((E,), (M,)), "up": ((E,), (M,)), "down": ((M,), (E,))}
    prod = lambda dims: int(np.prod(dims))  # noqa: E731
    adapters = sum(L * rank * (prod(i) + prod(o)) for i, o in proj.values())
    weights = sum(L * prod(i) * prod(o) for i, o in proj.values())
    int8_scales = sum(L * prod(o) for i, o in proj.values())
    nf4_scales = sum(L * prod(i) * prod(o) // (block if i[-1] % block == 0 else i[-1]) for i, o in proj.values())
    return dict(adapters=adapters, weights=weights, int8_scales=int8_scales, nf4_scales=nf4_scales)


def test_lora_plan_trains_the_adapters_only():
    """LoRA / QLoRA SFT on one device (tiny, 2 x 64): the plan's trainable count is the real adapters' count and
    the shapes' (r x (in + out) per projection per layer); AdamW's two fp32 moments and the fp32 gradients shrink
    from N to the adapters (the optimiser's few scalars aside, exactly); the frozen base is counted once; QLoRA
    stores the projections as int8 codes + one fp32 scale per output channel, or nf4 codes (4 bits, packed) + one
    fp32 scale per block."""
    import jax

    from raredx_jax import lora
    from raredx_jax.checkpoints.hf_io import init_model
    from raredx_jax.parallel.mesh import make_mesh
    from raredx_jax.plan import _model_cfg, build_plan

    config = _config("tiny")
    config.train.batch_size, config.train.seq_len = 2, 64
    cfg = _model_cfg(config)
    full = build_plan(config, num_devices=1, hbm_bytes=1e12, cost=False)
    config.lora.enabled = True
    plans = {}
    for q in ("none", "int8", "nf4"):
        config.lora.quantize = q
        plans[q] = build_plan(config, num_devices=1, hbm_bytes=1e12, cost=False)
    settings = lora.LoraSettings.from_config(config)
    exp = _lora_expected(cfg, settings.rank, settings.block_size)
    n, n_lora = cfg.num_params(), exp["adapters"]

    mesh = make_mesh(config.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh):
        _, base, adapters, _ = lora.init_lora_model(init_model(cfg, mesh, seed=0),
                                                    lora.LoraSettings(rank=settings.rank), mesh)
    L = cfg.num_layers  # the base also holds the per-layer adapter scale alpha / r (`lora.LoraConst`)
    assert lora.count(adapters) == n_lora and lora.count(base) == n + L

    lo = plans["none"]
    assert lo.trainable.startswith("lora") and full.trainable == "full"
    assert lo.trainable_params == n_lora and full.trainable_params == n
    assert 10 < n / n_lora < 40  # tiny: 4.0M parameters, 0.16M adapter parameters at r=8
    # fp32 moments: 8 bytes per trained parameter, plus the same handful of optimiser scalars in both
    assert full.optimizer - 8 * n == lo.optimizer - 8 * n_lora
    assert 0 <= full.optimizer - 8 * n < 64
    assert abs(full.optimizer / lo.optimizer - n / n_lora) < 0.01 * n / n_lora
    assert full.gradients == 4 * n and lo.gradients == 4 * n_lora
    # the frozen base once (not as a reference), plus the adapters; the real arrays hold the same bytes
    assert lo.params == full.params + 4 * n_lora + 4 * L == lora.nbytes(base) + lora.nbytes(adapters)
    assert lo.reference == 0 and lo.phases[0].argument >= lo.params + lo.optimizer

    w = exp["weights"]  # fp32 projection weights -> codes + fp32 scales; the rest of the base unchanged
    assert plans["int8"].params == lo.params - 4 * w + w + 4 * exp["int8_scales"]
    assert plans["nf4"].params == lo.params - 4 * w + w // 2 + 4 * exp["nf4_scales"]
    assert plans["nf4"].params < plans["int8"].params < lo.params / 2
    for q in ("int8", "nf4"):
        p = plans[q]
        assert p.trainable.startswith(f"qlora-{q}") and p.trainable_params == n_lora
        assert p.optimizer == lo.optimizer and p.gradients == lo.gradients


def test_lora_grpo_plan_uses_the_frozen_base_as_reference():
    """LoRA GRPO (tiny, beta > 0, 2 devices): no reference copy (the frozen base is the reference), so the update
    keeps only the sampler's KV cache beside its arguments; the optimiser holds the adapters' moments only."""
    sys.path.insert(0, str(ROOT))
    from configs.rl_curriculum import get_config
    from raredx_jax import lora
    from raredx_jax.plan import _model_cfg, build_plan

    c = get_config("cpu")
    c.sampling.max_prompt_len, c.sampling.max_new_tokens = 32, 8
    c.lora.enabled = True
    assert c.grpo.beta > 0
    plan = build_plan(c, num_devices=2, hbm_bytes=1e12, cost=False)
    exp = _lora_expected(_model_cfg(c), lora.LoraSettings.from_config(c).rank, 64)
    assert [p.name for p in plan.phases] == ["rollout_generate", "logprob", "update"]
    assert plan.trainable_params == exp["adapters"]
    assert plan.reference == 0 and plan.kv_cache > 0
    update = plan.phases[-1]
    assert update.extra_persistent == plan.kv_cache
    assert update.argument >= plan.params + plan.optimizer
    assert 0 <= plan.optimizer - 2 * plan.gradients < 64  # two moments of the adapters (+ a few scalars)
    assert plan.gradients < plan.params / 10


if __name__ == "__main__":
    out = {}
    for name in ("tiny", "mid"):
        out[name] = _measure(name, sys.argv[1])
    print(json.dumps(out))


def test_evaluate_plan_is_the_greedy_generate():
    """Evaluation: one greedy generate of sampling.batch_size prompts padded to eval.max_prompt_len; no optimiser."""
    sys.path.insert(0, str(ROOT))
    from configs.evaluate import get_config
    from raredx_jax.plan import build_plan

    c = get_config("cpu")
    c.sampling.batch_size, c.sampling.max_new_tokens, c.eval.max_prompt_len = 4, 8, 32
    plan = build_plan(c, num_devices=2, hbm_bytes=1e12, cost=False)
    assert [p.name for p in plan.phases] == ["eval_generate"]
    assert plan.optimizer == plan.gradients == plan.reference == 0 and plan.kv_cache > 0 and plan.params > 0


def test_every_accelerator_target_has_a_cited_spec():
    """The plan's HBM budget and roofline peaks: every shipped accelerator target maps to a spec with its source."""
    from raredx_jax import hardware

    for name in hardware.known_targets():
        acc = hardware.target_accelerator(name)
        if name == "cpu":
            assert acc is None
            continue
        assert acc is not None, name
        assert acc["hbm_bytes"] > 1e10 and acc["peak_flops"] > 1e14 and acc["hbm_bandwidth"] > 1e11, acc
        assert "docs" in acc["source"] or "datasheet" in acc["source"], acc
        assert hardware.target_num_devices(name) >= 1
