"""LoRA / QLoRA (raredx_jax/lora.py): adapters train and resume exactly in SFT and GRPO, the merged export equals
transformers + peft's merged model, the PEFT adapter loads in peft, and the trainable state shrinks as it should."""
import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_data_config
from flax import nnx

from raredx_jax import lora
from raredx_jax.models.config import ModelConfig
from raredx_jax.models.transformer import Transformer

CFG = ModelConfig(family="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=False)


@functools.lru_cache(maxsize=None)
def _base_split():
    return nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))


def _base_model():
    """A fresh Transformer(CFG, seed 0) around shared immutable arrays (its eager init runs once per module)."""
    return nnx.merge(*_base_split())


def _tokens(n: int = 20, b: int = 2, vocab: int = 96):
    rng = np.random.default_rng(0)
    tok = rng.integers(3, vocab, size=(b, n)).astype(np.int32)
    return tok, np.broadcast_to(np.arange(n, dtype=np.int32), (b, n))


def _logits(model_or_graphdef, params=None, tok=None, pos=None) -> np.ndarray:
    """Jitted forward (eager ops each compile on their own: slower than one program on the forced CPU devices)."""
    if params is None:
        model_or_graphdef, params = nnx.split(model_or_graphdef)
        params = params.to_pure_dict()
    return np.asarray(_forward(model_or_graphdef)(params, jnp.asarray(tok), jnp.asarray(pos)))


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
    return jax.jit(lambda p, t, q: nnx.merge(graphdef, p)(t, q)[0])


def _random_adapters(adapters, seed: int = 1, scale: float = 0.2):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# --- the model hook ----------------------------------------------------------------------------------------------
def test_zero_b_is_the_base_model_and_merge_equals_the_adapter_path():
    tok, pos = _tokens()
    base_model = _base_model()
    ref = _logits(base_model, tok=tok, pos=pos)
    settings = lora.LoraSettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    model = lora.apply_lora(_base_model(), settings, seed=3)
    # B starts at zero: the adapted model is exactly the base model
    np.testing.assert_array_equal(_logits(model, tok=tok, pos=pos), ref)
    graphdef, state = nnx.split(model)
    base, adapters = lora.split_params(state.to_pure_dict())
    assert sorted(adapters["layers"]) == sorted(f"{t}{s}" for t in settings.targets for s in lora.SUFFIXES)
    adapters = _random_adapters(adapters)
    adapted = _logits(graphdef, lora.combine(base, adapters), tok, pos)
    merged = lora.merged_model(CFG, base, adapters, settings)
    assert float(np.abs(adapted - ref).max()) > 1e-2  # the adapters do change the function
    # the same function computed as x W + s (x A) B and as x (W + s A B): fp32 reassociation only
    np.testing.assert_allclose(_logits(merged, tok=tok, pos=pos), adapted, atol=1e-5)


@pytest.mark.parametrize("quantize,tol", [("int8", 0.02), ("nf4", 0.25)])
def test_qlora_base_is_quantised_with_qwix_and_close_to_the_base(quantize, tol):
    """QLoRA stores the base projections as qwix QArrays (int8 / nf4 codes + scales) and dequantises one layer at a
    time; logits stay within the quantisation error of the fp32 base (relative to the logit range)."""
    import qwix

    tok, pos = _tokens()
    ref = _logits(_base_model(), tok=tok, pos=pos)
    settings = lora.LoraSettings(rank=4, alpha=8.0, quantize=quantize, block_size=32)
    model = lora.apply_lora(_base_model(), settings)
    for t in lora.TARGETS:
        q = getattr(model.layers, t).get_value()
        assert isinstance(q, qwix.QArray) and q.qtype == (jnp.int8 if quantize == "int8" else "nf4")
        assert jnp.dtype(q.qvalue.dtype).itemsize == 1 and q.qvalue.shape == getattr(
            _base_model().layers, t).get_value().shape
    out = _logits(model, tok=tok, pos=pos)
    err = float(np.abs(out - ref).max()) / float(np.abs(ref).max())
    assert 0 < err < tol


def test_trainable_parameters_and_optimiser_state_shrink_as_expected():
    """Trainable = r * (in + out) per adapted projection and layer; AdamW's two moments follow the trainable tree
    only, so optimiser memory falls by the same ratio (what the memory plan uses: lora.trainable_params)."""
    from raredx_jax.training.optim import make_optimizer
    from raredx_jax.training.state import abstract_params

    cfg = dataclasses.replace(CFG, num_layers=3)
    mesh = jax.make_mesh((1,), ("data",))
    settings = lora.LoraSettings(rank=8, alpha=16.0)
    _, full_abs, _ = lora.abstract_lora_model(cfg, settings, mesh)
    trainable = lora.trainable_params(full_abs)
    E, H, K, D, M, L, r = 64, 4, 2, 16, 128, 3, 8
    per_layer = r * ((E + H * D) * 2 + (E + K * D) * 2 + (E + M) * 2 + (M + E))
    assert lora.count(trainable) == L * per_layer
    _, plain_abs, _ = abstract_params(cfg, mesh)
    assert lora.count(plain_abs) == cfg.num_params()
    from ml_collections import config_dict

    tx, _ = make_optimizer(config_dict.ConfigDict(dict(lr=1e-3, steps=10, weight_decay=0.01, grad_clip=1.0)))
    opt_full = lora.nbytes(jax.eval_shape(tx.init, plain_abs))
    opt_lora = lora.nbytes(jax.eval_shape(tx.init, trainable))
    moments = 2 * 4  # AdamW mu + nu in fp32
    assert opt_full - moments * cfg.num_params() < 64 and opt_lora - moments * lora.count(trainable) < 64
    assert opt_lora / opt_full < 0.25


# --- export: merged HF model and PEFT adapter vs transformers + peft ---------------------------------------------
def test_merged_export_and_peft_adapter_match_transformers_peft(tmp_path):
    import peft
    import torch
    import transformers

    from raredx_jax.checkpoints import hf_io

    mesh = jax.make_mesh((1,), ("data",))
    settings = lora.LoraSettings(rank=4, alpha=12.0, targets=("q_proj", "k_proj", "o_proj", "gate_proj",
                                                              "down_proj"))
    base_model = _base_model()
    base_dir = hf_io.save_hf_model(base_model, str(tmp_path / "base"))
    model = lora.apply_lora(_base_model(), settings, seed=2)
    graphdef, state = nnx.split(model)
    base, adapters = lora.split_params(state.to_pure_dict())
    adapters = _random_adapters(adapters, seed=4)
    merged_dir = hf_io.save_hf_model(lora.merged_model(CFG, base, adapters, settings), str(tmp_path / "merged"))
    adapter_dir = lora.write_peft_adapter(str(tmp_path / "adapter"), CFG, adapters, settings, base_model=base_dir)
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]

    tok, pos = _tokens()
    with jax.set_mesh(mesh):
        ours = _logits(graphdef, lora.combine(base, adapters), tok, pos)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    loaded = peft_model.peft_config["default"]
    assert loaded.r == 4 and loaded.lora_alpha == 12.0 and set(loaded.target_modules) == set(settings.targets)
    ids = torch.as_tensor(tok, dtype=torch.long)
    with torch.no_grad():
        with_adapter = peft_model(input_ids=ids).logits.numpy()
        peft_merged = peft_model.merge_and_unload().eval()
        peft_merged_logits = peft_merged(input_ids=ids).logits.numpy()
        ours_merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        export_logits = ours_merged(input_ids=ids).logits.numpy()
    # fp32 throughout: the differences are reassociation of sums of ~E terms of size <= 1 (eps 1.2e-7 each)
    np.testing.assert_allclose(export_logits, peft_merged_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, with_adapter, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, peft_merged_logits, atol=1e-4, rtol=0)
    # and the merged weights themselves are peft's
    sd = peft_merged.state_dict()
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        np.testing.assert_allclose(ours_merged.state_dict()[name].numpy(), sd[name].numpy(), atol=1e-6, rtol=0)


# --- LoRA SFT on the embedded default: learns, checkpoints adapters only, resumes exactly ------------------------
def _sft_config(data_dir: str, run_dir: str, probe: int = 4, **lora_fields):
    from configs.knowledge_sft import get_config

    c = get_config("cpu")
    src = tiny_data_config(data_dir)
    c.data = src.data
    c.tokenizer = src.tokenizer
    c.run_dir = run_dir
    c.train.update(dict(steps=6, batch_size=8, seq_len=64, checkpoint_every=2, keep_checkpoints=3, log_every=1,
                        eval_every=0, async_checkpointing=False, build_data=False))
    c.optim.update(dict(warmup_steps=1, lr=2e-2))
    c.probe.n = probe  # the knowledge probe runs on base + adapters (lora.combine)
    c.probe.batch_size = 16
    c.lora.enabled = True
    c.lora.update({**dict(rank=4, alpha=8.0, dropout=0.1), **lora_fields})
    return c


@pytest.fixture(scope="module")
def lora_sft_run(data_dir, tmp_path_factory):
    from raredx_jax.training import sft

    run_dir = str(tmp_path_factory.mktemp("lora") / "ksft")
    return run_dir, sft.run_sft(_sft_config(data_dir, run_dir))


def _step_params(step_dir: str):
    mesh = jax.make_mesh((1,), ("data",))
    return lora.load_adapter_checkpoint(step_dir, mesh, with_base=False)


def test_lora_sft_learns_and_checkpoints_hold_adapters_only(lora_sft_run):
    from raredx_jax.training.metrics import read_metrics

    run_dir, summary = lora_sft_run
    train = read_metrics(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["loss"] < train[0]["loss"] - 0.05
    assert 0 < summary["trainable_params"] < 0.2 * summary["params"]
    assert summary["probe"]["items"] == 4  # the knowledge probe ran on base + adapters
    step_dir = os.path.join(run_dir, "checkpoints", "6")
    model_cfg, settings, base, adapters = _step_params(step_dir)
    assert settings.rank == 4 and settings.dropout == 0.1
    names = set(adapters["layers"])
    assert names == {f"{t}{s}" for t in lora.TARGETS for s in lora.SUFFIXES}
    # the params item on disk holds the adapters only: its bytes are those of the adapters, not the model
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(step_dir, "params"))
                  for f in fs)
    assert on_disk < 0.1 * 4 * model_cfg.num_params()  # fp32 full params would be 4 bytes each
    b = np.asarray(adapters["layers"]["q_proj_lora_b"])
    assert np.abs(b).max() > 0  # B left zero would mean nothing trained


def test_lora_sft_resumes_exactly(lora_sft_run, data_dir, tmp_path):
    from raredx_jax.training import sft

    run_dir, _ = lora_sft_run
    resumed = str(tmp_path / "ksft")
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    os.remove(os.path.join(resumed, "summary.json"))
    summary = sft.run_sft(_sft_config(data_dir, resumed, probe=0))
    assert summary["resumed_from"] == 4
    _, _, _, want = _step_params(os.path.join(run_dir, "checkpoints", "6"))
    _, _, _, got = _step_params(os.path.join(resumed, "checkpoints", "6"))
    for k in want["layers"]:
        np.testing.assert_array_equal(np.asarray(got["layers"][k]), np.asarray(want["layers"][k]), err_msg=k)


def test_lora_settings_and_mode_are_checked_on_resume(lora_sft_run, data_dir, tmp_path):
    from raredx_jax.training import sft

    run_dir, _ = lora_sft_run
    other = str(tmp_path / "ksft")
    shutil.copytree(run_dir, other)
    os.remove(os.path.join(other, "summary.json"))
    with pytest.raises(ValueError, match=r"lora\.rank differ"):
        sft.run_sft(_sft_config(data_dir, other, rank=8))
    c = _sft_config(data_dir, other)
    c.lora.enabled = False
    with pytest.raises(ValueError, match="lora.enabled=False"):
        sft.run_sft(c)
    with pytest.raises(ValueError, match="lora.targets"):
        lora.LoraSettings(targets=("q_proj", "qkv"))


# --- LoRA GRPO: the base is the reference, the sampler runs base + adapters, the reward rises, resume is exact ----
def _grpo_learner(reward, mesh, settings, **kw):
    from test_grpo import ToyTokenizer, _model

    from raredx_jax.sampling.sampler import SamplingParams
    from raredx_jax.training.grpo import GRPOLearner, GRPOSettings
    from raredx_jax.training.optim import OptimizerSettings

    gs = dict(steps=30, prompts_per_step=4, group_size=8, minibatch_size=16, filter_groups="none")
    gs.update(kw)
    sp = SamplingParams(temperature=1.0, max_new_tokens=16, max_prompt_len=8, batch_size=4)
    model = _model()
    opt = OptimizerSettings(lr=3e-2, weight_decay=0.0, warmup_steps=0, schedule="constant", min_lr_ratio=1.0, b2=0.99)
    learner = GRPOLearner(model.config, ToyTokenizer(), reward, GRPOSettings(**gs), sp, mesh, seed=0,
                          lora_settings=settings, optimizer=opt)
    learner.init_from_model(model)
    return learner


@pytest.fixture(scope="module")
def fsdp_mesh():
    from raredx_jax.parallel.mesh import make_mesh

    return make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_lora_grpo_reward_rises_with_the_base_as_reference_and_resumes_exactly(fsdp_mesh, tmp_path):
    """The toy policy (tests/test_grpo.py) learns to emit the target token through rank-4 adapters only (with
    adapter dropout). beta > 0: the reference is the frozen base itself (no snapshot is made), its forward runs
    each step with the adapters off, and the KL to it grows as the adapters move; the base never changes. A
    checkpoint after step 6 holds the adapters and their optimiser state only; restored (the base rebuilt from its
    source, as run_grpo's lora.resume_base does), steps 7-8 repeat bit for bit."""
    from test_grpo import PROMPTS, _model, toy_reward

    from raredx_jax.checkpoints.manager import TrainCheckpointManager
    from raredx_jax.training.grpo import RL_ITEM

    settings = lora.LoraSettings(rank=4, alpha=8.0, dropout=0.05)
    learner = _grpo_learner(toy_reward, fsdp_mesh, settings, beta=0.02)
    assert learner.ref_params is None  # no second copy of the model
    ref = learner.reference_params()
    assert all(ref["layers"][k] is learner.base["layers"][k] for k in ref["layers"])
    assert ref["embed_tokens"] is learner.base["embed_tokens"]
    names = {f"{t}{s}" for t in lora.TARGETS for s in lora.SUFFIXES}
    assert set(learner.state.params["layers"]) == names
    base0 = _host(learner.base)
    timing = ("rollout_s", "update_s", "step_time_s", "sample_tokens_per_s", "train_tokens_per_s", "mfu")
    ckpt_dir = str(tmp_path / "run")
    metrics = []
    for s in range(1, 9):
        _, m = learner.step(PROMPTS, list(range(4)), s)
        metrics.append({k: v for k, v in m.items() if k not in timing})
        if s == 6:
            ckpt = TrainCheckpointManager(ckpt_dir, keep=2, async_save=False, extra_items=(RL_ITEM,))
            ckpt.save(6, learner.state, learner.cfg, extras={RL_ITEM: {"optimizer_steps": learner.optimizer_steps}})
            ckpt.close()
    rewards, kls = [m["reward/total_mean"] for m in metrics], [m["kl"] for m in metrics]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.2, rewards  # measured: 0.07 -> 0.47
    assert min(kls) >= 0.0 and kls[-1] > kls[0]
    assert learner.counters["reference_forward"] == 8
    for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(_host(learner.base))):
        np.testing.assert_array_equal(a, b)  # frozen
    # the sampler's model holds base + the current adapters (the same arrays as the train state)
    assert learner.model.layers.q_proj_lora_b.get_value() is learner.state.params["layers"]["q_proj_lora_b"]
    after8 = _host(learner.state)

    # restored into the same learner object, whose compiled functions are reused (a second learner would only
    # compile the same programs again): its state comes from the checkpoint, its base from the source
    ckpt = TrainCheckpointManager(ckpt_dir, keep=2, async_save=False, extra_items=(RL_ITEM,))
    with jax.set_mesh(fsdp_mesh):
        restored = ckpt.restore(learner.abstract_state())
        _, base, _, _ = lora.init_lora_model(_model(), settings, fsdp_mesh, init_adapters=False)
    ckpt.close()
    assert restored.step == 6 and set(restored.state.params["layers"]) == names  # adapters only
    learner.set_state(restored.state, base=base)
    learner.optimizer_steps = int(restored.extras[RL_ITEM]["optimizer_steps"])
    for s in (7, 8):
        _, m = learner.step(PROMPTS, list(range(4)), s)
        got = {k: v for k, v in m.items() if k not in timing}
        assert got == metrics[s - 1], {k: (got.get(k), metrics[s - 1].get(k)) for k in got
                                       if got.get(k) != metrics[s - 1].get(k)}
    for a, b in zip(jax.tree.leaves(after8), jax.tree.leaves(_host(learner.state))):
        np.testing.assert_array_equal(a, b)


def test_export_of_a_lora_run_writes_the_merged_model_and_a_peft_adapter(lora_sft_run, tmp_path):
    """What the export stage does with a LoRA run's step (run_export: load_model, save_hf_model, export_adapter):
    `orbax.load_model` merges the adapters into the recorded base, the HF directory holds that merged model, and
    the PEFT adapter beside it loads in peft onto the base's transformers model and merges to the same logits.
    (Called piecewise: run_export also writes the SentencePiece tokenizer, which is not LoRA's concern.)"""
    import peft
    import torch
    import transformers

    from raredx_jax.checkpoints import hf_io, orbax

    run_dir, _ = lora_sft_run
    mesh = jax.make_mesh((1,), ("data",))
    step_dir = orbax.resolve_model_checkpoint(run_dir)
    assert lora.is_lora_checkpoint(step_dir)
    merged = orbax.load_model(step_dir, mesh)  # what export, RERS, evaluation and init_from load
    assert not any(k.endswith(lora.SUFFIXES) for k in nnx.state(merged).to_pure_dict()["layers"])
    merged_dir = hf_io.save_hf_model(merged, str(tmp_path / "hf"))
    adapter_dir = lora.export_adapter(step_dir, str(tmp_path / "hf_peft"), mesh)
    assert sorted(os.listdir(adapter_dir)) == list(lora.PEFT_FILES)
    assert lora.export_adapter(step_dir, adapter_dir, mesh) == adapter_dir  # a rerun replaces its own export

    meta = lora.read_meta(step_dir)
    assert meta["base"]["kind"] == "fresh"
    base_dir = hf_io.save_hf_model(lora.load_base_model(meta["base"], mesh, merged.config), str(tmp_path / "base"))
    tok, _ = _tokens(n=24, vocab=merged.config.vocab_size)
    ids = torch.as_tensor(tok, dtype=torch.long)
    with torch.no_grad():
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        want = peft.PeftModel.from_pretrained(hf_base, adapter_dir).merge_and_unload().eval()(input_ids=ids).logits
        exported = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        got = exported(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_qlora_nf4_sft_steps_train_on_an_fsdp_mesh(fsdp_mesh):
    """The SFT train step with an nf4 base sharded over 8 devices (codes like the weight, block scales replicated
    where fsdp does not divide them) and adapter dropout: the loss on a fixed batch falls, the base is untouched."""
    import qwix
    from ml_collections import config_dict

    from raredx_jax.training import lm
    from raredx_jax.training.optim import make_optimizer
    from raredx_jax.training.state import create_train_state, train_state_shardings

    settings = lora.LoraSettings(rank=4, alpha=8.0, quantize="nf4", block_size=32, dropout=0.1)
    tx, sched = make_optimizer(config_dict.ConfigDict(dict(lr=1e-2, steps=10, warmup_steps=0)))
    with jax.set_mesh(fsdp_mesh):
        graphdef, full_abs, full_sh = lora.abstract_lora_model(CFG, settings, fsdp_mesh)
        base_sh, train_sh = lora.split_params(full_sh)
        shardings = train_state_shardings(tx, lora.trainable_params(full_abs), train_sh, fsdp_mesh)
        _, base, params, _ = lora.init_lora_model(_base_model(), settings, fsdp_mesh)
        q = base["layers"]["q_proj"]
        assert isinstance(q, qwix.QArray) and q.qvalue.sharding.spec[1] == "fsdp"
        codes = np.asarray(q.qvalue)
        state = create_train_state(params, tx, 0, shardings)
        step = lm.make_train_step(graphdef, tx, sched, shardings, fsdp_mesh, (8, 16), frozen_sh=base_sh,
                                   lora_dropout=settings.dropout)
        tok = np.random.default_rng(0).integers(3, CFG.vocab_size, (8, 16)).astype(np.int32)
        batch = lm.to_global({"tokens": tok, "segment_ids": np.ones_like(tok), "loss_mask": np.ones_like(tok),
                               "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16))},
                              lm.batch_sharding(fsdp_mesh, 8, 16))
        losses = []
        for _ in range(5):
            state, m = step(state, batch, base)
            assert bool(m["ok"])
            losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses  # measured 4.61 -> 4.31
    np.testing.assert_array_equal(np.asarray(base["layers"]["q_proj"].qvalue), codes)
