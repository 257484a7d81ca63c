"""Training-step throughput and MFU: our jitted SFT step vs a transformers (PyTorch) step of the same shape.

  python -m benchmarks.train_step                       # GPU: tiny + qwen2.5-0.5b, batch 8 x 2048, bf16
  python -m benchmarks.train_step --quick               # CPU: reduced shapes (minutes on 2 cores), fp32

Both sides run one optimiser step per iteration on the same random batch: forward, next-token cross-entropy
over every position, backward, global-norm clipping and AdamW, with fp32 master weights and compute in
`--dtype` (JAX: model.dtype, PyTorch: torch.autocast). Timing excludes compilation / the first steps
(`--warmup`), synchronises the device after every timed step, and reports the median step. MFU uses
6N + 12 L H D T FLOPs per token (raredx_jax/training/metrics.py) and the device's dense peak; on CPU the peak
is unknown and MFU is printed as n/a.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np

from raredx_jax.checkpoints.hf_io import init_model
from raredx_jax.models.config import PRESETS, ModelConfig, to_hf_config
from raredx_jax.parallel.mesh import make_mesh
from raredx_jax.training import metrics as M
from raredx_jax.training.lm import batch_sharding, make_train_step, to_global
from raredx_jax.training.optim import make_optimizer
from raredx_jax.training.state import abstract_params, create_train_state, split_model, train_state_shardings


def _shape(preset: str, layers: int | None, vocab: int | None):
    shape = dict(PRESETS[preset])
    if layers:
        shape["num_layers"] = layers
    if vocab:
        shape["vocab_size"] = vocab
    return shape


def _batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, seq), dtype=np.int32)
    return {"tokens": tokens, "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "loss_mask": np.ones((batch, seq), np.int32)}


def bench_jax(shape: dict, batch: int, seq: int, dtype: str, remat: str, attention: str, steps: int,
              warmup: int) -> dict:
    cfg = ModelConfig(**shape, dtype=dtype, param_dtype="float32", remat=remat, attention=attention,
                      scan_layers=True)
    # plain dicts, not ml_collections: the accelerator image has no ml-collections (benchmarks/accelerator_check.py)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    train = dict(lr=1e-4, steps=1000, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.01,
                 b1=0.9, b2=0.95, grad_clip=1.0)
    tx, schedule = make_optimizer(train, total_steps=1000, lr=1e-4)
    with jax.set_mesh(mesh):
        graphdef, params = split_model(init_model(cfg, mesh, seed=0))
        _, p_abs, p_sh = abstract_params(cfg, mesh)
        shardings = train_state_shardings(tx, p_abs, p_sh, mesh)
        state = create_train_state(params, tx, 0, shardings)
        step = make_train_step(graphdef, tx, schedule, shardings, mesh, (batch, seq))
        b = to_global(_batch(batch, seq, cfg.vocab_size), batch_sharding(mesh, batch, seq))
        t0 = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            state, m = step(state, b)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = step(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    return {"impl": "jax", "step_s": statistics.median(times), "compile_s": compile_s,
            "loss": float(m["loss"]), "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "num_params": cfg.num_params(), "cfg": cfg}


def bench_torch(shape: dict, batch: int, seq: int, dtype: str, steps: int, warmup: int) -> dict:
    import torch  # noqa: PLC0415 - optional: torch, the PyTorch side only
    import transformers  # noqa: PLC0415 - optional: torch, the PyTorch side only

    cfg = ModelConfig(**shape)
    hf = to_hf_config(cfg, torch_dtype="float32")
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32,
                                                          attn_implementation="sdpa").to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=dev == "cuda")
    ids = torch.as_tensor(_batch(batch, seq, cfg.vocab_size)["tokens"], dtype=torch.long, device=dev)
    amp = dtype != "float32"
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)

    def one():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev, dtype=amp_dtype, enabled=amp):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return out.loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(max(warmup, 1)):
        loss = one()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = one()
        sync()
        times.append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return {"impl": "torch", "step_s": statistics.median(times), "loss": float(loss.detach()), "device": name,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,qwen2.5-0.5b")
    p.add_argument("--batch", type=int, default=None, help="default 8; --quick: 4 (tiny) / 1 (larger presets)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (GPU) / 256 (--quick)")
    p.add_argument("--dtype", default=None, help="compute dtype; default bfloat16 (GPU/TPU), float32 (--quick)")
    p.add_argument("--remat", default=None, help="none|dots|full; default dots for 0.5B on GPU, none otherwise")
    p.add_argument("--attention", default=None, help="xla|dot_product|splash; default dot_product on GPU")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (--quick: 2 for qwen2.5-0.5b)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 / 3 with --quick)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="reduced CPU shapes")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--torch_threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    a = p.parse_args(argv)

    on_cpu = jax.default_backend() == "cpu"
    quick = a.quick
    dtype = a.dtype or ("float32" if quick or on_cpu else "bfloat16")
    steps = a.steps or (3 if quick else 10)
    attention = a.attention or ("xla" if on_cpu else "dot_product")
    rows = []
    for preset in [x.strip() for x in a.presets.split(",") if x.strip()]:
        big = preset != "tiny"
        # --quick: tiny 4 x 256; larger shapes 1 x 256 with 2 layers (a CPU step of the full 0.5B is minutes)
        batch = a.batch or ((1 if big else 4) if quick else 8)
        seq = a.seq or (256 if quick else 2048)
        layers = a.layers or (2 if quick and big else None)
        shape = _shape(preset, layers, None)
        remat = a.remat or ("dots" if preset != "tiny" and not on_cpu else "none")
        label = f"{preset}" + (f" ({shape['num_layers']} layers)" if layers else "")
        print(f"== {label}: batch {batch} x {seq}, {dtype}, remat {remat}, attention {attention}", flush=True)
        j = bench_jax(shape, batch, seq, dtype, remat, attention, steps, a.warmup)
        cfg = j.pop("cfg")
        fpt = M.model_flops_per_token(cfg, seq)
        peak = M.device_peak_flops(j["device"], dtype)
        tokens = batch * seq
        res = {"preset": label, "batch": batch, "seq": seq, "dtype": dtype, "remat": remat, "params": cfg.num_params(),
               "flops_per_token": fpt, "device": j["device"], "devices": j["devices"]}
        j_tps = tokens / j["step_s"]
        res["jax"] = {"tokens_per_s": j_tps, "step_s": j["step_s"], "compile_s": j["compile_s"],
                      "mfu": M.mfu(j_tps, fpt, j["devices"], peak), "loss": j["loss"]}
        if not a.skip_torch:
            if a.torch_threads:
                import torch  # noqa: PLC0415 - optional: torch, the PyTorch side only

                torch.set_num_threads(a.torch_threads)
            t = bench_torch(shape, batch, seq, dtype, steps, a.warmup)
            t_tps = tokens / t["step_s"]
            res["torch"] = {"tokens_per_s": t_tps, "step_s": t["step_s"], "mfu": M.mfu(t_tps, fpt, 1, peak),
                            "loss": t["loss"], "device": t["device"]}
            res["torch_threads"] = t["threads"]
            res["ratio_jax_over_torch"] = j_tps / t_tps
        rows.append(res)
        fmt_mfu = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
        print(f"   jax   : {j_tps:12,.0f} tokens/s  step {j['step_s'] * 1e3:9.1f} ms  MFU {fmt_mfu(res['jax']['mfu'])}"
              f"  (compile {j['compile_s']:.1f}s, loss {j['loss']:.3f})", flush=True)
        if "torch" in res:
            tr = res["torch"]
            print(f"   torch : {tr['tokens_per_s']:12,.0f} tokens/s  step {tr['step_s'] * 1e3:9.1f} ms  MFU "
                  f"{fmt_mfu(tr['mfu'])}  (loss {tr['loss']:.3f})", flush=True)
            print(f"   ratio jax/torch: {res['ratio_jax_over_torch']:.2f}x", flush=True)
    dev = rows[0]["device"] if rows else "?"
    print(f"\ndevice: {dev} x{rows[0]['devices'] if rows else 0}; peak "
          f"{M.device_peak_flops(dev, dtype) or 'unknown'} FLOP/s ({dtype}); torch threads "
          f"{rows[0].get('torch_threads', '?') if rows else '?'}")
    print("| shape | batch x seq | dtype | JAX tokens/s | JAX MFU | PyTorch tokens/s | PyTorch MFU | JAX/PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tj, tt = r["jax"], r.get("torch")
        f = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
        torch_cols = (f"{tt['tokens_per_s']:,.0f} | {f(tt['mfu'])} | {r['ratio_jax_over_torch']:.2f}x |" if tt
                      else "- | - | - |")
        print(f"| {r['preset']} | {r['batch']} x {r['seq']} | {r['dtype']} | {tj['tokens_per_s']:,.0f} | "
              f"{f(tj['mfu'])} | " + torch_cols)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
