"""Exact resume after SIGKILL: `python -m raredx_jax.train` killed at a random point after a checkpoint, rerun,
gives the same per-step losses as an uninterrupted run of the same config and seed, on 1 CPU device and on an
8-device CPU mesh (parameters and optimiser state FSDP-sharded for real).

The data is the embedded corpus built by `raredx_jax.data.build` at a tiny scale (6 diseases). The three
processes per mesh share a persistent XLA compilation cache, so only the first one compiles.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from raredx_jax.training.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def _cmd(data_dir: str, run_dir: str) -> list[str]:
    return [sys.executable, "-m", "raredx_jax.train", "--config=configs/knowledge_sft.py",
            f"--config.data.dir={data_dir}", f"--config.run_dir={run_dir}", f"--config.train.steps={STEPS}",
            "--config.train.batch_size=8", "--config.train.seq_len=64", "--config.optim.warmup_steps=3",
            "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=2", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.build_data=False", "--config.probe.n=0"]


def _env(devices: int, cache_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _run(cmd, env, log_path) -> str:
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    out = open(log_path).read()
    assert proc.returncode == 0, out[-4000:]
    return out


def _finished_steps(run_dir: str) -> list[int]:
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())  # tmp dirs of a save in flight are not digits


def _losses(run_dir: str) -> dict[int, float]:
    recs = read_metrics(run_dir, "train")
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in recs}


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_sigkill_and_resume_gives_the_uninterrupted_loss_sequence(data_dir, tmp_path, devices):
    env = _env(devices, str(tmp_path / "xla_cache"))
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    _run(_cmd(data_dir, ref_dir), env, tmp_path / "ref.log")
    ref = _losses(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))

    rng = random.Random()
    target = rng.choice([2, 4, 6])
    delay = rng.uniform(0.0, 0.4)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(data_dir, run_dir), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        t_end = time.time() + 600
        while proc.poll() is None and time.time() < t_end:
            if any(s >= target for s in _finished_steps(run_dir)):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    killed_log = open(tmp_path / "killed.log").read()
    assert proc.returncode == -signal.SIGKILL, (f"not killed (rc={proc.returncode}, target step {target})\n"
                                                + killed_log[-3000:])
    latest = max(_finished_steps(run_dir))
    assert target <= latest < STEPS, (target, latest)
    seen_before = sorted(_losses(run_dir))

    out = _run(_cmd(data_dir, run_dir), env, tmp_path / "resumed.log")
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', str(latest))} (step {latest}/{STEPS})" in out
    got = _losses(run_dir)
    assert got == ref, (f"killed after checkpoint {target} (+{delay:.2f}s; losses logged up to step "
                        f"{seen_before[-1] if seen_before else 0}), resumed from {latest}:\n got {got}\n ref {ref}")
    assert _finished_steps(run_dir) == [STEPS - 2, STEPS]  # keep_checkpoints=2
