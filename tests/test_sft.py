"""SFT trainer: the loss contract (prompt masked, packing-invariant), gradient accumulation, the schedule,
checkpoint fall-back past a damaged latest step, the NaN guard, stage errors, and HF export after training.

Runs in-process on the 8 forced CPU devices of conftest (mesh fsdp=8), with the tiny preset and small batches.
"""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_data_config
from ml_collections import config_dict

from raredx_jax.checkpoints.hf_io import init_model
from raredx_jax.data.pipeline import sft_dataset, tokenize_sft
from raredx_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from raredx_jax.models.config import ModelConfig
from raredx_jax.parallel.mesh import make_mesh
from raredx_jax.training import common, lm, sft
from raredx_jax.training.optim import make_optimizer, make_schedule
from raredx_jax.training.state import abstract_params, create_train_state, split_model, train_state_shardings

SMALL = dict(family="qwen2", vocab_size=0, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8, tie_word_embeddings=True, attention_bias=True, max_position_embeddings=256)


def _records(n: int = 24) -> list[dict]:
    recs = []
    for i in range(n):
        note = f"Case {i}: fever, rash and seizures " * (1 + i % 3)
        prompt = "" if i % 3 == 0 else [{"role": "user", "content": note}]
        recs.append({"prompt": prompt, "completion": f"<think>finding {i}</think> diagnosis {i} " * (1 + i % 4)})
    return recs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [r["completion"] for r in _records()] + [str(r["prompt"]) for r in _records()]
    return SentencePieceTokenizer(train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "spm", 320))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(config_dict.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))


@pytest.fixture(scope="module")
def model(tok, mesh):
    cfg = ModelConfig(**{**SMALL, "vocab_size": tok.vocab_size})
    return init_model(cfg, mesh, seed=3)


_LOSS_FNS = {}


def _loss_sums(model, batch):
    """(sum NLL, targets) of a host batch, jitted once per model."""
    graphdef, params = split_model(model)
    if id(model) not in _LOSS_FNS:
        _LOSS_FNS[id(model)] = jax.jit(lambda p, b: lm.lm_loss_sums(lm.forward(graphdef, p, b), b))
    return _LOSS_FNS[id(model)](params, {k: jnp.asarray(batch[k]) for k in lm.BATCH_KEYS})


# --- loss contract ------------------------------------------------------------------------------------------------
def test_prompt_tokens_contribute_no_loss(tok, model, mesh):
    rec = _records()[4]
    x = tokenize_sft(rec, tok, 128)
    n = len(x["tokens"])
    n_prompt = int((x["loss_mask"] == 0).sum())
    n_completion = int(x["loss_mask"].sum())
    assert n_prompt > 0 and n_completion > 0
    batch = {"tokens": x["tokens"][None], "segment_ids": np.ones((1, n), np.int32),
             "positions": np.arange(n, dtype=np.int32)[None], "loss_mask": x["loss_mask"][None]}
    graphdef, params = split_model(model)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        logits = lm.forward(graphdef, params, jb)
        s, cnt = lm.lm_loss_sums(logits, jb)
        g = jax.grad(lambda lg: lm.lm_loss_sums(lg, jb)[0])(logits)
    # exactly the completion tokens (and the EOS) are targets
    assert int(cnt) == n_completion
    # the gradient reaches only the logits that predict completion tokens: position t predicts token t+1
    touched = np.nonzero(np.abs(np.asarray(g[0])).sum(-1) > 0)[0]
    np.testing.assert_array_equal(touched, np.arange(n_prompt - 1, n - 1))
    # an independent numpy computation over the completion targets gives the same sum
    lg = np.asarray(logits[0], np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll = lse[:-1] - lg[np.arange(n - 1), x["tokens"][1:]]
    np.testing.assert_allclose(float(s), nll[n_prompt - 1:].sum(), rtol=1e-5)
    # changing a prompt *target* (the token itself, with its context fixed) leaves the loss unchanged
    alt = dict(jb, tokens=jb["tokens"].at[0, 1].set((int(jb["tokens"][0, 1]) + 7) % tok.vocab_size))
    s2, _ = lm.lm_loss_sums(logits, alt)
    assert float(s2) == float(s)


def test_packing_gives_the_same_loss_as_unpacked(tok, model, mesh):
    kw = dict(seq_len=96, batch_size=4, seed=0, shard_index=0, shard_count=1, num_epochs=1, shuffle=False)
    totals = {}
    with jax.set_mesh(mesh):
        for pack in (True, False):
            s_tot, n_tot, rows = 0.0, 0.0, 0
            for b in sft_dataset(_records(), tok, pack=pack, **kw):
                s, n = _loss_sums(model, b)
                s_tot, n_tot = s_tot + float(s), n_tot + float(n)
                rows += int((b["segment_ids"].max(1) > 0).sum())
            totals[pack] = (s_tot, n_tot, rows)
    (sp, npk, rows_p), (su, nu, rows_u) = totals[True], totals[False]
    assert rows_p < rows_u, "packing put several sequences in a row"
    assert npk == nu
    np.testing.assert_allclose(sp / npk, su / nu, rtol=2e-5)


def test_packed_row_equals_separate_rows(tok, model, mesh):
    a = tokenize_sft(_records()[1], tok, 64)
    b = tokenize_sft(_records()[3], tok, 64)
    la, lb = len(a["tokens"]), len(b["tokens"])
    T = la + lb + 5
    packed = {k: np.zeros((1, T), np.int32) for k in lm.BATCH_KEYS}
    packed["tokens"][0, :la + lb] = np.concatenate([a["tokens"], b["tokens"]])
    packed["segment_ids"][0, :la + lb] = [1] * la + [2] * lb
    packed["positions"][0, :la + lb] = np.concatenate([np.arange(la), np.arange(lb)])
    packed["loss_mask"][0, :la + lb] = np.concatenate([a["loss_mask"], b["loss_mask"]])
    sep = {k: np.zeros((2, T), np.int32) for k in lm.BATCH_KEYS}
    for r, x in enumerate((a, b)):
        n = len(x["tokens"])
        sep["tokens"][r, :n], sep["segment_ids"][r, :n] = x["tokens"], 1
        sep["positions"][r, :n], sep["loss_mask"][r, :n] = np.arange(n), x["loss_mask"]
    with jax.set_mesh(mesh):
        s1, n1 = _loss_sums(model, packed)
        s2, n2 = _loss_sums(model, sep)
    assert float(n1) == float(n2)
    np.testing.assert_allclose(float(s1), float(s2), rtol=1e-5)


# --- optimiser ----------------------------------------------------------------------------------------------------
def test_schedule_warmup_cosine_linear():
    t = config_dict.ConfigDict(dict(lr=1.0, steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1))
    f = make_schedule(t)
    np.testing.assert_allclose([float(f(0)), float(f(4)), float(f(9))], [0.1, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose([float(f(10)), float(f(60)), float(f(110)), float(f(500))], [1.0, 0.55, 0.1, 0.1],
                               rtol=1e-5)
    t.schedule = "linear"
    np.testing.assert_allclose(float(make_schedule(t)(60)), 0.55, rtol=1e-6)
    t.schedule = "bogus"
    with pytest.raises(ValueError, match="optim.schedule"):
        make_schedule(t)


_U32 = 2.0 ** -24  # fp32 unit roundoff


def _adam_param_bound(lr, b1, b2, eps, wd, t, a, b, p_prev_a, p_prev_b):
    """Elementwise bound on |p_t(a) - p_t(b)| for one AdamW step of two runs, from their *measured* state.

    `a`, `b`: (mu_t, nu_t, p_t) of each run after step t. Exact identities, no linearisation (float64):
      u = m/(s + eps) with m = mu/(1-b1^t), s = sqrt(nu/(1-b2^t));
      u_a - u_b = (m_a - m_b)/(s_a+eps) + m_b (s_b - s_a)/((s_a+eps)(s_b+eps)),  s_a - s_b = (v_a - v_b)/(s_a + s_b)
    so |du| <= |dm|/(s_a+eps) + |m_b| |dv| / ((s_a+s_b)(s_a+eps)(s_b+eps)). The step is
    p_t = p_{t-1} - lr (u + wd p_{t-1}) (decay masked to matrices; 1 - lr wd <= 1 either way), hence
    |dp_t| <= |dp_{t-1}| + lr |du| + rho, with rho the fp32 rounding of each run's own update given its stored
    moments: ~10 rounded operations on the update (bias corrections, sqrt, +eps, divide, decay, scale) and one
    on the addition to p, each a relative error <= u = 2^-24, for two runs.
    """
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    (mu_a, nu_a, p_a), (mu_b, nu_b, p_b) = [tuple(map(f64, r)) for r in (a, b)]
    c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    m_a, m_b, v_a, v_b = mu_a / c1, mu_b / c1, nu_a / c2, nu_b / c2
    s_a, s_b = np.sqrt(v_a), np.sqrt(v_b)
    d_a, d_b = s_a + eps, s_b + eps
    du = np.abs(m_a - m_b) / d_a + np.abs(m_b) * np.abs(v_a - v_b) / (np.maximum(s_a + s_b, 1e-300) * d_a * d_b)
    p_prev = np.maximum(np.abs(f64(p_prev_a)), np.abs(f64(p_prev_b)))
    u_mag = np.maximum(np.abs(m_a) / d_a, np.abs(m_b) / d_b) + wd * p_prev
    rho = 2 * _U32 * (10 * lr * u_mag + np.maximum(np.abs(p_a), np.abs(p_b)))
    return np.abs(f64(p_prev_a) - f64(p_prev_b)) + lr * du + rho


@pytest.mark.parametrize("k", [4])
def test_grad_accumulation_equals_large_batch(tok, mesh, k):
    """k micro-batches accumulated == one large batch: loss, gradients, AdamW moments, then parameters.

    Why not one tolerance on the parameters: Adam divides by sqrt(v). Where a gradient is tiny, fp32
    summation-order noise (the micro-batch sums add the same token terms in another order) becomes a relative
    change of m/sqrt(v) of order one, i.e. up to lr per step: measured 1.29e-5 on an Intel Xeon against a fixed
    atol of 1e-3 lr, while the gradients agreed to 1e-7. So:
      * gradients and moments are compared tightly, normwise per parameter: after the first update
        mu = (1-b1) clip(g), so mu compares the (clipped) gradients; sqrt(nu) is 1-Lipschitz in g elementwise
        (triangle inequality on (sqrt(b2) sqrt(nu_prev), sqrt(1-b2) g)), so it takes the same tolerance.
        GRAD_RTOL = 1e-4 covers the fp32 bound for reordering a sum of n = 16*64 = 1024 token terms,
        gamma_n = n u ~ 6.1e-5; a wrong normalisation of the micro-batches is an O(1e-1) error.
      * parameters are compared against `_adam_param_bound`: the exact difference AdamW's update can make from
        the moments each run actually holds, plus the fp32 rounding of the update itself.
    """
    GRAD_RTOL = 1e-4
    cfg = ModelConfig(**{**SMALL, "vocab_size": tok.vocab_size})
    train = config_dict.ConfigDict(dict(lr=1e-2, steps=10, warmup_steps=0, schedule="constant", min_lr_ratio=0.0,
                                        weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=0.5))
    eps = 1e-8  # make_optimizer's default train.eps
    tx, schedule = make_optimizer(train)
    # 16 rows whose micro-batches hold different numbers of target tokens (normalisation matters)
    batch = next(iter(sft_dataset(_records(40), tok, seq_len=64, batch_size=16, seed=1, shard_index=0, shard_count=1,
                                  pack=False)))
    results = {}
    with jax.set_mesh(mesh):
        _, p_abs, p_sh = abstract_params(cfg, mesh)
        shardings = train_state_shardings(tx, p_abs, p_sh, mesh)
        b_sh = lm.batch_sharding(mesh, 16, 64)
        graphdef, params0 = split_model(init_model(cfg, mesh, seed=5))
        host0 = jax.device_get(params0)
        for accum in (1, k):
            params = jax.tree.map(jnp.copy, params0)  # the state donates its params
            state = create_train_state(params, tx, 0, shardings)
            step = lm.make_train_step(graphdef, tx, schedule, shardings, mesh, (16, 64), grad_accum=accum)
            trace = []
            for _ in range(2):  # two updates: the optimiser state after accumulation is equal as well
                state, m = step(state, lm.to_global(batch, b_sh))
                opt = jax.device_get(state.opt_state)
                trace.append(dict(params=jax.device_get(state.params), mu=optax.tree_utils.tree_get(opt, "mu"),
                                  nu=optax.tree_utils.tree_get(opt, "nu"), loss=float(m["loss"]),
                                  grad_norm=float(m["grad_norm"])))
            results[accum] = trace
    micro_targets = [int(lm.target_weights({kk: jnp.asarray(v[i::k]) for kk, v in batch.items()}).sum())
                     for i in range(k)]
    assert len(set(micro_targets)) > 1, "micro-batches should differ in target count"
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(results[1][0]["params"]),
                                                           jax.tree.leaves(host0)))
    assert moved > 1e-3
    prev = {1: host0, k: host0}
    for t, (one, acc) in enumerate(zip(results[1], results[k]), start=1):
        np.testing.assert_allclose(acc["loss"], one["loss"], rtol=GRAD_RTOL)
        np.testing.assert_allclose(acc["grad_norm"], one["grad_norm"], rtol=GRAD_RTOL)
        for name, fn in (("mu", lambda x: x), ("sqrt(nu)", np.sqrt)):
            src = "mu" if name == "mu" else "nu"
            for (path, x1), xk in zip(jax.tree_util.tree_leaves_with_path(one[src]), jax.tree.leaves(acc[src])):
                a, b = fn(np.asarray(x1, np.float64)), fn(np.asarray(xk, np.float64))
                err, ref = np.linalg.norm(a - b), np.linalg.norm(a)
                assert err <= GRAD_RTOL * ref, f"step {t} {name}{jax.tree_util.keystr(path)}: {err:.3g} vs {ref:.3g}"
        leaves = zip(jax.tree_util.tree_leaves_with_path(one["params"]), jax.tree.leaves(acc["params"]),
                     jax.tree.leaves(one["mu"]), jax.tree.leaves(acc["mu"]), jax.tree.leaves(one["nu"]),
                     jax.tree.leaves(acc["nu"]), jax.tree.leaves(prev[1]), jax.tree.leaves(prev[k]))
        for (path, p1), pk, mu1, muk, nu1, nuk, q1, qk in leaves:
            bound = _adam_param_bound(train.lr, train.b1, train.b2, eps, train.weight_decay, t,
                                      (mu1, nu1, p1), (muk, nuk, pk), q1, qk)
            diff = np.abs(np.asarray(p1, np.float64) - np.asarray(pk, np.float64))
            worst = np.unravel_index(np.argmax(diff - bound), diff.shape)
            assert np.all(diff <= bound), (f"step {t} params{jax.tree_util.keystr(path)}{list(worst)}: "
                                           f"|diff| {diff[worst]:.3g} > Adam bound {bound[worst]:.3g}")
        prev = {1: one["params"], k: acc["params"]}


def test_grad_accum_must_divide_the_mesh(mesh):
    with pytest.raises(ValueError, match="train.grad_accum"):
        lm.check_batch(mesh, 16, 3)
    with pytest.raises(ValueError, match="micro-batch"):
        lm.check_batch(mesh, 16, 4)  # 4 rows per micro-batch over 8 devices


# --- a tiny real run: data built by data.build -----------------------------------------------------------------
# (the `data_dir` fixture of conftest: tiny_data_config() built once, shared with test_train_resume)
def _run_config(data_dir: str, run_dir: str, **train) -> config_dict.ConfigDict:
    from configs.knowledge_sft import get_config

    c = get_config("cpu")
    src = tiny_data_config(data_dir)
    c.data = src.data
    c.tokenizer = src.tokenizer
    c.run_dir = run_dir
    c.train.update(dict(steps=6, batch_size=8, seq_len=64, checkpoint_every=2, keep_checkpoints=3, log_every=1,
                        eval_every=3, eval_batches=2, async_checkpointing=False, build_data=False))
    c.optim.warmup_steps = 2
    c.train.update(train)
    c.probe.n = 6
    c.probe.batch_size = 16
    return c


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run") / "ksft")
    summary = sft.run_sft(_run_config(data_dir, run_dir))
    return run_dir, summary


def test_run_writes_run_dir_and_learns_something(trained_run):
    from raredx_jax.training.metrics import read_metrics

    run_dir, summary = trained_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "probe.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(run_dir, "tb"))
    assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints"))) == [2, 4, 6]
    train = read_metrics(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["loss"] < train[0]["loss"]
    evals = read_metrics(run_dir, "eval")
    assert [r["step"] for r in evals] == [0, 3, 6] and evals[-1]["loss"] < evals[0]["loss"]
    p = summary["probe"]
    assert p["items"] == 6 and p["candidates_per_item"] == 6 and abs(p["chance"] - 1 / 6) < 1e-9
    assert 0.0 <= p["accuracy"] <= 1.0


def test_rerun_of_a_finished_run_does_not_train_again(trained_run, data_dir):
    run_dir, summary = trained_run
    again = sft.run_sft(_run_config(data_dir, run_dir))
    assert again == summary


def test_hf_export_after_sft_loads_in_transformers_with_same_logits(trained_run, mesh, tmp_path):
    import torch
    import transformers

    from raredx_jax.checkpoints import hf_io, orbax

    run_dir, _ = trained_run
    ckpt = orbax.resolve_model_checkpoint(run_dir)
    assert ckpt.endswith(os.path.join("checkpoints", "6"))
    model = orbax.load_model(ckpt, mesh)
    out = hf_io.save_hf_model(model, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, model.config.vocab_size, size=(2, 24)).astype(np.int32)
    pos = np.broadcast_to(np.arange(24, dtype=np.int32), (2, 24))
    with jax.set_mesh(mesh):
        ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(pos))[0])
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)


def test_damaged_latest_checkpoints_fall_back_to_the_last_good_one(trained_run, data_dir, tmp_path, caplog):
    """Step 6 truncated and step 4 with a file deleted: both are detected and set aside, step 2 is used."""
    from raredx_jax.training.metrics import read_metrics

    run_dir, _ = trained_run
    work = str(tmp_path / "run")
    shutil.copytree(run_dir, work)
    os.remove(os.path.join(work, "summary.json"))
    ckpts = os.path.join(work, "checkpoints")
    # 6: truncate the largest data file of the parameters
    params6 = os.path.join(ckpts, "6", "params")
    files = [os.path.join(r, f) for r, _, fs in os.walk(params6) for f in fs if os.sep + "d" in r]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    # 4: delete a file of the optimiser state
    os.remove(os.path.join(ckpts, "4", "opt_state", "manifest.ocdbt"))
    caplog.set_level("WARNING")
    summary = sft.run_sft(_run_config(data_dir, work))
    out = caplog.text  # checkpoints/manager.py's log.warning lines
    assert "checkpoints/6 is damaged" in out and "falling back to step 4" in out
    assert "checkpoints/4 is damaged" in out and "falling back to step 2" in out
    assert summary["resumed_from"] == 2
    assert len(os.listdir(os.path.join(work, "checkpoints_corrupt"))) == 2
    assert sorted(int(s) for s in os.listdir(ckpts)) == [2, 4, 6]  # rewritten by the resumed run
    # the recomputed steps 3-6 equal the original run's, exactly
    orig = {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}
    redo = {r["step"]: r["loss"] for r in read_metrics(work, "train")}
    assert redo == orig


def test_nan_guard_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    run_dir = str(tmp_path / "nan")
    cfg = _run_config(data_dir, run_dir, steps=4, debug_nan_at_step=2, eval_every=0)  # step index 2 = 3rd step
    with pytest.raises(common.NonFiniteLossError, match=r"non-finite loss or gradient at step 3.*last good checkpoint "
                                                     r"is step 2"):
        sft.run_sft(cfg)
    assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints"))) == [2]


# --- stage dispatch and missing inputs ----------------------------------------------------------------------------
def test_unknown_stage_lists_known_ones():
    from raredx_jax import train

    with pytest.raises(ValueError, match="known stages: .*knowledge_sft"):
        train.resolve_stage("pretrain")


def test_sft_without_rers_data_names_the_stage_to_run(data_dir, tmp_path):
    from configs.sft import get_config

    c = get_config("cpu")
    c.data.dir = data_dir
    c.run_dir = str(tmp_path / "sft")
    with pytest.raises(common.MissingInputError, match="Run the RERS stage first: .*configs/rers.py"):
        sft.run_sft(c)


def test_missing_init_checkpoint_names_knowledge_sft(data_dir, tmp_path):
    c = _run_config(data_dir, str(tmp_path / "r"))
    c.model.init_from = str(tmp_path / "nothing_here")
    with pytest.raises(common.MissingInputError, match="configs/knowledge_sft.py"):
        sft.run_sft(c)


def test_a_checkpoint_refuses_another_tokenizer(trained_run, data_dir, mesh, tmp_path):
    """The checkpoint records its vocabulary digest; pairing it with a retrained SentencePiece model (what a data
    rebuild does) fails with the fix named instead of decoding nonsense."""
    from raredx_jax.checkpoints.orbax import read_checkpoint_meta
    from raredx_jax.evaluate import evaluate_checkpoint
    from raredx_jax.policy import load_policy

    run_dir, _ = trained_run
    ckpt = os.path.join(run_dir, "checkpoints", "6")
    _, tok = load_policy(ckpt, mesh)
    assert read_checkpoint_meta(ckpt)["tokenizer_digest"] == tok.digest()
    other = tmp_path / "other"
    other.mkdir()
    train_sentencepiece(["A 6-year-old girl presented with hypotonia and seizures."] * 40, other / "spm",
                        vocab_size=300, seed=0)
    with pytest.raises(ValueError, match="trained with another tokenizer.*data.dir / tokenizer.path"):
        load_policy(ckpt, mesh, tokenizer_dir=str(other))
    with pytest.raises(ValueError, match="trained with another tokenizer"):  # evaluate's --tokenizer reaches it
        evaluate_checkpoint(_run_config(data_dir, run_dir), ckpt, [], str(tmp_path / "eval"),
                            tokenizer_dir=str(other))
