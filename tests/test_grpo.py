"""GRPO learner (training/grpo/, training/rollout.py): real optimisation on CPU, nothing mocked.

The advantage estimators and loss variants are unit-tested against hand-computed examples in
test_rl_objectives.py and the curriculum rules in test_curriculum.py; here they run through the full learner:
rollout from the live policy -> rewards -> advantages -> jitted mini-batch updates -> checkpoint / resume.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from grpo_fixtures import synthetic_rollout

from raredx_jax.checkpoints import hf_io
from raredx_jax.checkpoints import orbax as orbax_io
from raredx_jax.models.config import ModelConfig
from raredx_jax.models.transformer import Transformer
from raredx_jax.parallel.mesh import make_mesh, single_device_mesh
from raredx_jax.sampling.sampler import SamplingParams
from raredx_jax.training import rl_objectives as rlo
from raredx_jax.training.grpo import GRPOLearner, GRPOSettings, MiniBatchLayout
from raredx_jax.training.optim import OptimizerSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 7  # the toy reward's token


class ToyTokenizer:
    """A 16-id character tokenizer (ids 2..15; 0 pad, 1 EOS): small enough that a random policy emits every id."""

    vocab_size, pad_id, eos_id, bos_id, stop_ids = 16, 0, 1, None, (1,)

    def encode(self, text):
        return [2 + (ord(ch) % 14) for ch in text]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)

    def encode_chat(self, messages, add_generation_prompt=True):
        return self.encode(messages[-1]["content"])


PROMPTS = [[{"role": "user", "content": s}] for s in ("abc", "hello", "xyz", "rare")]


def toy_reward(samples):
    """Fraction of the 16 generation slots holding TARGET: the policy must learn to emit it (and not stop)."""
    r = np.asarray([sum(t == TARGET for t in ids) / 16.0 for ids in samples.token_ids], np.float32)
    return {"total": r, "target": r}


def constant_reward(samples):
    n = len(samples.texts)
    return {"total": np.ones(n, np.float32), "diagnosis": np.ones(n, np.float32)}


def _model(seed=0):
    """A random-init toy policy filled from numpy (norms 1, biases 0, weights N(0, 0.5^2 / fan_in)): on forced CPU
    devices a jitted init compiles longer than this model takes to train. The learner places it on its mesh."""
    cfg = ModelConfig(family="qwen2", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, tie_word_embeddings=True, attention_bias=True)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def init(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return np.ones(x.shape, x.dtype)
        if "bias" in name:
            return np.zeros(x.shape, x.dtype)
        # [V, E] embeddings; layers [L, in, ...] except o_proj [L, H, D, E]
        fan_in = x.shape[-1] if "embed" in name else x.shape[1] * (x.shape[2] if "o_proj" in name else 1)
        return (rng.standard_normal(x.shape) * 0.5 / np.sqrt(fan_in)).astype(x.dtype)

    state.replace_by_pure_dict(jax.tree_util.tree_map_with_path(init, state.to_pure_dict()))
    return nnx.merge(graphdef, state)


OPTIM_FIELDS = {f.name for f in dataclasses.fields(OptimizerSettings)}


def _optim(**kw):
    """The optimiser the toy learners train with (constant lr, no warmup, no decay) plus `kw`."""
    return OptimizerSettings(**{**dict(lr=1e-2, warmup_steps=0, schedule="constant", min_lr_ratio=1.0,
                                       weight_decay=0.0, b2=0.99), **kw})


def _learner(reward, mesh, *, max_new=16, temperature=1.0, **kw):
    """A learner of the toy policy; `kw` are grpo.* fields or optim.* fields (config.optim)."""
    settings = dict(steps=30, prompts_per_step=4, group_size=8, minibatch_size=16, filter_groups="none")
    settings.update({k: v for k, v in kw.items() if k not in OPTIM_FIELDS})
    sp = SamplingParams(temperature=temperature, max_new_tokens=max_new, max_prompt_len=8, batch_size=4)
    return GRPOLearner.from_model(_model(), ToyTokenizer(), reward, GRPOSettings(**settings), sp, mesh, seed=0,
                                  optimizer=_optim(**{k: v for k, v in kw.items() if k in OPTIM_FIELDS}))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 1, "fsdp": -1, "tensor": 1})  # every (forced) CPU device on fsdp: real sharding


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# ---------------------------------------------------------------------------------------------------------------
def test_minibatch_layout_pads_to_the_devices_and_counts_updates():
    assert MiniBatchLayout.make(32, 16, 0, 8) == MiniBatchLayout(rows=16, num=2, accum=1, padded=16)
    assert MiniBatchLayout.make(12, 0, 6, 8) == MiniBatchLayout(rows=12, num=1, accum=2, padded=16)
    assert MiniBatchLayout.make(12, 5, 0, 1) == MiniBatchLayout(rows=5, num=3, accum=1, padded=5)
    with pytest.raises(ValueError, match="config.grpo.group_size"):
        GRPOSettings(group_size=1).validate()
    with pytest.raises(ValueError, match="config.grpo.nope"):
        GRPOSettings.from_config({"grpo": {"nope": 1}})
    with pytest.raises(ValueError, match="config.grpo.loss"):
        GRPOSettings.from_config({"grpo": {"loss": "ppo2"}})


def test_train_splits_never_include_a_held_out_split():
    assert GRPOSettings(train_split="train, rl").train_splits == ("train", "rl")
    for bad in ("train,test", "validation", "rl,validation"):
        with pytest.raises(ValueError, match="config.grpo.train_split: must not contain a held-out split"):
            GRPOSettings(train_split=bad).validate()
    GRPOSettings(train_split="validation", eval_cases=-1).validate()  # no held-out evaluation: allowed
    with pytest.raises(ValueError, match="config.grpo.train_split: names no split"):
        GRPOSettings(train_split=" , ").validate()


def test_zero_advantage_gives_no_update_and_no_reference_without_beta(mesh):
    """Every group scores the same -> advantages 0 -> zero gradient through the full learner update: the
    parameters are bit-identical afterwards (weight decay 0). beta = 0: no reference model, no reference forward.
    Also: the sampler's logprobs equal the learner's teacher-forced ones (the batch layout lines up)."""
    learner = _learner(constant_reward, mesh, old_logprobs="recompute", beta=0.0)
    assert learner.ref_params is None
    before = _host(learner.state.params)
    batch, m = learner.step(PROMPTS, list(range(4)), 1)
    assert np.all(batch.advantages == 0.0) and m["zero_std_groups"] == 1.0
    assert m["grad_norm"] == 0.0 and m["updates"] == 2 and int(learner.state.step) == 1
    after = _host(learner.state.params)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert learner.ref_params is None and learner.counters["reference_forward"] == 0 and m["kl"] == 0.0
    # the sampler ran on the learner's own arrays, and its logprobs match the training forward token by token
    assert m["logprob_mismatch"] < 1e-5, m["logprob_mismatch"]
    assert learner.counters["old_logprob_forward"] == 1


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_learner_logprobs_equal_the_samplers_at_temperature(mesh, temperature):
    """Rollouts sample from softmax(logits / T); the learner's teacher-forced logprobs must use the same T or
    every importance ratio is off (at T = 0.5 the mismatch without the division is ~1e-1 per token, not 1e-6)."""
    learner = _learner(constant_reward, mesh, old_logprobs="recompute", temperature=temperature)
    _, m = learner.step(PROMPTS, list(range(4)), 1)
    assert m["logprob_mismatch"] < 1e-5, m["logprob_mismatch"]


def test_zero_variance_groups_are_dropped_before_the_update(mesh):
    """DAPO's dynamic sampling: a group whose filter reward is the same for every sample has no signal. All
    groups flat -> no optimiser step at all (parameters bit-identical) while the global step still counts; two
    of four groups varying -> only their rows are trained on (one mini-batch of 16 rows instead of two)."""
    def half_flat(samples):  # groups 0, 1 flat; groups 2, 3 vary with the sample index
        r = np.zeros(len(samples.texts), np.float32)
        r[16:] = np.tile(np.arange(8) % 2, 2)
        return {"total": r.copy(), "pass": r}

    from raredx_jax.training.grpo import kept_rows

    flat = _learner(lambda smp: {**constant_reward(smp), "pass": np.ones(len(smp.texts), np.float32)}, mesh,
                    filter_groups="pass")
    before = _host(flat.state.params)
    batch, m = flat.step(PROMPTS, list(range(4)), 1)
    assert m["updates"] == 0 and m["groups_kept_fraction"] == 0.0 and int(flat.state.step) == 1
    assert kept_rows(batch, "pass").size == 0 and kept_rows(batch, "none").size == 32
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_host(flat.state.params))):
        np.testing.assert_array_equal(a, b)
    mixed = _learner(half_flat, mesh, filter_groups="pass")
    batch, m = mixed.step(PROMPTS, list(range(4)), 1)
    np.testing.assert_array_equal(kept_rows(batch, "pass"), np.arange(16, 32))
    assert m["updates"] == 1 and m["groups_kept_fraction"] == 0.5 and m["grad_norm"] > 0
    assert m["positive_advantage_wrong_first"] == 0.0  # every pushed-up row passed
    with pytest.raises(ValueError, match="config.grpo.filter_groups"):
        GRPOSettings(filter_groups="variance").validate()


def test_a_zero_update_step_resumes_exactly_across_a_checkpoint(mesh, tmp_path):
    """Step 2's groups are all flat on `pass` (filter_groups=pass drops them all): no optimiser step, parameters
    bit-identical, but state.step counts it. Saved after step 2 as run_grpo saves (rl_state holding
    optimizer_steps), restored into a fresh learner as run_grpo restores, step 3 equals the uninterrupted run's
    bit for bit: metrics (loss, grad_norm, lr, rewards, ...) and parameters. The lr schedule decays, so the
    optimiser-step count must come from rl_state (the fallback start * updates_per_step = 4, not 2, would log
    another lr)."""
    from raredx_jax.checkpoints.manager import TrainCheckpointManager
    from raredx_jax.training.grpo import RL_ITEM

    phase = {"flat": False}

    def reward(samples):  # pass alternates inside every group (kept), or is 1 everywhere (all dropped)
        n = len(samples.texts)
        passed = np.ones(n, np.float32) if phase["flat"] else (np.arange(n) % 2).astype(np.float32)
        return {"total": toy_reward(samples)["total"] + passed, "pass": passed}

    kw = dict(steps=3, filter_groups="pass", schedule="cosine", min_lr_ratio=0.1)
    timing = ("rollout_s", "update_s", "step_time_s", "sample_tokens_per_s", "train_tokens_per_s", "mfu")

    def run_step(learner, s):
        phase["flat"] = s == 2
        _, m = learner.step(PROMPTS, list(range(4)), s)
        assert int(learner.state.step) == s
        return {k: v for k, v in m.items() if k not in timing}

    ref = _learner(reward, mesh, **kw)
    m1 = run_step(ref, 1)
    after1 = _host(ref.state.params)
    m2 = run_step(ref, 2)
    assert m1["updates"] == 2 and m2["updates"] == 0 and m2["groups_kept_fraction"] == 0.0
    assert "loss" not in m2 and ref.optimizer_steps == 2
    for a, b in zip(jax.tree.leaves(after1), jax.tree.leaves(_host(ref.state.params))):
        np.testing.assert_array_equal(a, b)  # the zero-update step left the parameters alone
    ckpt = TrainCheckpointManager(str(tmp_path / "run"), keep=2, async_save=False, extra_items=(RL_ITEM,))
    ckpt.save(2, ref.state, ref.cfg, extras={RL_ITEM: {"step": 2, "optimizer_steps": ref.optimizer_steps}})
    ckpt.close()
    m3 = run_step(ref, 3)  # the uninterrupted run (the save only copied the state)
    assert m3["updates"] == 2 and ref.optimizer_steps == 4 and m3["grad_norm"] > 0

    ckpt = TrainCheckpointManager(str(tmp_path / "run"), keep=2, async_save=False, extra_items=(RL_ITEM,))
    fresh = GRPOLearner(ref.cfg, ToyTokenizer(), reward, ref.settings, ref.sampling, mesh, seed=0,
                        optimizer=ref.optimizer)
    with jax.set_mesh(mesh):
        restored = ckpt.restore(fresh.abstract_state())
    ckpt.close()
    assert restored.step == 2 and int(restored.state.step) == 2
    fresh.set_state(restored.state)
    saved = restored.extras.get(RL_ITEM, {})
    fresh.optimizer_steps = int(saved.get("optimizer_steps", restored.step * fresh.updates_per_step))  # run_grpo's
    assert fresh.optimizer_steps == 2 != restored.step * fresh.updates_per_step
    got = run_step(fresh, 3)
    assert int(fresh.state.step) == int(ref.state.step) == 3
    assert float(fresh.schedule(3)) != float(fresh.schedule(5))  # a wrong count would show in the logged lr
    for k in ("loss", "grad_norm", "lr", "reward/total_mean", "reward/pass_mean"):
        assert k in m3, k
    assert got == m3, {k: (got.get(k), m3.get(k)) for k in set(got) | set(m3) if got.get(k) != m3.get(k)}
    for a, b in zip(jax.tree.leaves(_host(ref.state.params)), jax.tree.leaves(_host(fresh.state.params))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(_host(ref.state.opt_state)), jax.tree.leaves(_host(fresh.state.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_toy_reward_rises_with_a_frozen_reference(mesh):
    """A random-init policy learns to emit the target token within 20 steps: real sampling, real gradients,
    G = 8. beta > 0: the reference is built (a frozen copy of the start), its forward runs once per step and the
    KL to it grows as the policy moves."""
    learner = _learner(toy_reward, mesh, beta=0.02)
    assert learner.ref_params is not None
    ref0 = _host(learner.ref_params)
    for a, b in zip(jax.tree.leaves(ref0), jax.tree.leaves(_host(learner.state.params))):
        np.testing.assert_array_equal(a, b)  # the reference is the starting policy
    rewards, kls = [], []
    for s in range(1, 21):
        _, m = learner.step(PROMPTS, list(range(4)), s)
        rewards.append(m["reward/total_mean"])
        kls.append(m["kl"])
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > first + 0.3, rewards
    assert np.isfinite(rewards).all() and min(kls) >= 0.0 and kls[-1] > kls[0]
    assert learner.counters["reference_forward"] == 20 and learner.counters["updates"] == 40
    for a, b in zip(jax.tree.leaves(ref0), jax.tree.leaves(_host(learner.ref_params))):
        np.testing.assert_array_equal(a, b)  # frozen


def _synthetic_batch(p=3, g=4, lp=8, c=16, seed=0):
    return synthetic_rollout(p, g, lp, c, seed)


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_micro_batches_and_device_padding_give_the_same_loss_and_gradient(mesh, loss):
    """12 rows on 8 devices in 2 micro-batches (each padded 6 -> 8 rows) vs 1 device in one pass: the re-weighting
    makes loss, gradient norm and every metric equal (row-mean grpo and token-mean dapo alike)."""
    common = dict(prompts_per_step=3, group_size=4, minibatch_size=0, loss=loss, old_logprobs="sampler")
    a = _learner(toy_reward, mesh, micro_batch_size=6, **common)
    b = _learner(toy_reward, single_device_mesh(), **common)
    assert (a.layout.padded, a.layout.accum, b.layout.padded, b.layout.accum) == (16, 2, 12, 1)
    ma, mb = a.learn(_synthetic_batch(), 1), b.learn(_synthetic_batch(), 1)
    assert ma["clip_fraction"] > 0.05  # the clipped branch is exercised
    for k in ("loss", "pg_loss", "grad_norm", "clip_fraction", "approx_kl", "ratio_mean", "entropy"):
        np.testing.assert_allclose(ma[k], mb[k], rtol=2e-5, atol=1e-7, err_msg=k)


def reinforce_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, *, cfg):
    """A new loss is this one function: plain REINFORCE, -A * log pi averaged over every completion token."""
    m = mask.astype(jnp.float32)
    return -(advantages[:, None] * logprobs * m).sum() / jnp.maximum(m.sum(), 1.0), {}


@pytest.fixture
def reinforce_registered():
    """Registered for this test only (the registry is global: other tests iterate over every registered loss)."""
    rlo.register_loss("test_reinforce", aggregation="token")(reinforce_loss)
    yield
    rlo.LOSSES.pop("test_reinforce")
    rlo.LOSS_AGGREGATION.pop("test_reinforce")


def test_a_new_loss_is_one_registered_function_and_trains(mesh, reinforce_registered):
    """`grpo.loss=test_reinforce` (`register_loss` on the function above, nothing else edited) validates, trains a
    real update through the learner, and its registered token aggregation makes 2 padded micro-batches on 8
    devices give the loss and gradient of one pass on 1 device."""
    assert rlo.loss_aggregation("test_reinforce") == "token"
    GRPOSettings(loss="test_reinforce").validate()
    common = dict(prompts_per_step=3, group_size=4, minibatch_size=0, loss="test_reinforce", old_logprobs="sampler")
    a = _learner(toy_reward, mesh, micro_batch_size=6, **common)
    b = _learner(toy_reward, single_device_mesh(), **common)
    before = _host(a.state.params)
    ma, mb = a.learn(_synthetic_batch(), 1), b.learn(_synthetic_batch(), 1)
    assert ma["updates"] == 1 and np.isfinite(ma["loss"]) and ma["grad_norm"] > 0
    after = _host(a.state.params)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    for k in ("loss", "pg_loss", "grad_norm", "entropy"):
        np.testing.assert_allclose(ma[k], mb[k], rtol=2e-5, atol=1e-7, err_msg=k)


# ---------------------------------------------------------------------------------------------------------------
# the stage: python -m raredx_jax.train --config=configs/rl_curriculum.py, killed and resumed
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """Small embedded data (6 diseases) and a tiny random 'RERS-SFT' checkpoint to start from."""
    from configs.base import get_config
    from raredx_jax.data.build import build_all

    root = tmp_path_factory.mktemp("grpo_stage")
    c = get_config()
    c.data.dir = str(root / "data")
    c.data.diseases.n = 6
    c.data.notes_per_disease = 4
    c.data.rl_notes_per_disease = 0
    c.data.knowledge_passages_per_disease = 4
    c.data.eval_notes_per_disease = 1
    c.data.knowledge_eval_passages_per_disease = 1
    build_all(c, log=lambda msg: None)
    cfg = ModelConfig(family="qwen2", vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, attention_bias=True)
    init = orbax_io.save_model(str(root / "sft_ckpt"), hf_io.init_model(cfg, single_device_mesh(), seed=0))
    return {"root": root, "data": c.data.dir, "init": init}


def _stage_cmd(run_dir, inputs, **over):
    args = {"run_dir": run_dir, "data.dir": inputs["data"], "model.init_from": inputs["init"], "grpo.steps": 5,
            "grpo.prompts_per_step": 2, "grpo.group_size": 4, "grpo.minibatch_size": 4, "grpo.checkpoint_every": 1,
            "grpo.eval_every": 0, "grpo.eval_at_start": False, "grpo.eval_cases": 2,  # held-out eval at the end only
            "sampling.max_new_tokens": 16, "sampling.max_prompt_len": 512, "sampling.batch_size": 2,
            "curriculum.window": 1, "curriculum.min_steps": 1, "curriculum.max_steps": 2,
            "curriculum.remeasure_every": 1, "curriculum.prior_from": "", "curriculum.promote_rule": "threshold",
            # the closed-set task too (not in the default lessons); every group trained on (a random policy's
            # groups are all misses, which the default filter drops)
            "curriculum.lessons": "('closed_set:typical','open:typical','open:sparse')",
            "grpo.filter_groups": "none"}
    args.update(over)
    return [sys.executable, "-m", "raredx_jax.train", "--config=configs/rl_curriculum.py"] + [
        f"--config.{k}={v}" for k, v in args.items()]


def _env(root):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # real 2-way fsdp, quicker to compile than 8
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # the three runs compile the same programs: share them (halves the test's CPU time; results are identical)
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / "xla_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    drop = ("rollout_s", "update_s", "step_time_s", "sample_tokens_per_s", "train_tokens_per_s", "mfu", "seconds")
    return [{k: v for k, v in r.items() if k not in drop} for r in recs if r["kind"] == kind]


def test_stage_kill_and_resume_continues_exactly(stage_inputs):
    root = stage_inputs["root"]
    ref_dir, run_dir = str(root / "uninterrupted"), str(root / "killed")
    env = _env(root)
    ref = subprocess.run(_stage_cmd(ref_dir, stage_inputs), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=400)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    proc = subprocess.Popen(_stage_cmd(run_dir, stage_inputs), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(run_dir, "checkpoints", "2")) and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint 2 within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"

    res = subprocess.run(_stage_cmd(run_dir, stage_inputs), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout, res.stdout[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])["summary"]
    assert summary["resumed_from"] is not None and 2 <= summary["resumed_from"] < 5

    want, got = _records(ref_dir, "train"), _records(run_dir, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got, want):  # every metric, the curriculum lesson sequence and batch mix included
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert not diff, (a["step"], diff)
    lessons = [r["curriculum/lesson"] for r in got]
    assert lessons == ["closed_set:typical", "open:typical", "open:typical", "open:sparse", "open:sparse"]
    assert _records(run_dir, "promotion") == _records(ref_dir, "promotion")
    assert len(_records(ref_dir, "promotion")) == 2
    assert _records(run_dir, "eval") == _records(ref_dir, "eval") and len(_records(ref_dir, "eval")) == 1
    ev = _records(ref_dir, "eval")[0]
    assert ev["step"] == 5 and ev["n"] == 2 and 0.0 <= ev["pass@1"] <= 1.0
    for key in ("reward/total_mean", "reward/diagnosis_mean", "reward/format_mean", "reward/length_mean",
                "reward/pass_mean", "entropy", "clip_fraction", "kl", "response_length_mean",
                "curriculum/bucket_size/easy", "curriculum/batch_mix/easy"):
        assert key in want[0], key
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["final_lesson"] == "open:sparse"


def test_stage_without_the_rl_split_says_how_to_build_it(stage_inputs, tmp_path):
    from configs.rl_curriculum import get_config
    from raredx_jax.training.grpo import run_grpo

    c = get_config()
    c.run_dir = str(tmp_path / "run")
    c.data.dir = stage_inputs["data"]
    c.model.init_from = stage_inputs["init"]
    c.grpo.train_split = "train,rl"  # the fixture's data has no rl split
    with pytest.raises(ValueError, match=r"no split 'rl'.*--config\.data\.rl_notes_per_disease=N"):
        run_grpo(c)


def test_stage_without_the_sft_checkpoint_names_the_stage_to_run(stage_inputs, tmp_path):
    from configs.rl_curriculum import get_config
    from raredx_jax.training.common import MissingInputError
    from raredx_jax.training.grpo import run_grpo

    c = get_config()
    c.run_dir = str(tmp_path / "run")
    c.data.dir = stage_inputs["data"]
    c.model.init_from = str(tmp_path / "no_such_run")
    with pytest.raises(MissingInputError, match=r"configs/rers_sft\.py") as e:  # train.py exits 2 with this message
        run_grpo(c)
    assert "model.init_from" in str(e.value)
    assert not os.path.exists(c.run_dir)  # failed before writing anything
