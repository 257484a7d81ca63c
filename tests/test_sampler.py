"""The sampler against transformers `generate`, the model's own teacher-forced logprobs, and sampling statistics."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import FAMILIES, build_hf_model, left_padded_batch
from ml_collections import ConfigDict

from raredx_jax.checkpoints import hf_io
from raredx_jax.models.transformer import positions_from_mask
from raredx_jax.parallel.mesh import make_mesh, single_device_mesh
from raredx_jax.sampling import (
    Completion,
    GenerateOutput,
    Sampler,
    SamplingParams,
    bucket_length,
    continuous,
    generate,
    generate_continuous,
    generate_text,
    left_pad,
    sample_from_logits,
    sample_keys,
    truncation_mask,
)

PAD, EOS = 0, 2
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


def _hf_and_ours(family: str, path: str, mesh=None):
    """A random-init HF model and the same weights imported into our model. Qwen2's tied embeddings make its
    greedy text one repeated token; scaling its attention/MLP outputs x4 makes it vary."""
    hf = build_hf_model(family)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if family == "qwen2" and name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(4.0)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, hf_io.load_hf_model(path, mesh or single_device_mesh())


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _hf_and_ours("qwen3", str(tmp_path_factory.mktemp("hf_qwen3_sampler")))


def _hf_greedy(hf, tokens, mask, max_new, eos):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=False,
                          max_new_tokens=max_new, pad_token_id=PAD, eos_token_id=eos)
    return out[:, tokens.shape[1]:].numpy()


def _assert_matches_hf(out, ref, eos):
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    m = ref.shape[1]
    np.testing.assert_array_equal(toks[:, :m], ref)
    assert (toks[:, m:] == PAD).all()  # HF stopped because every row was done; so did we
    for r in range(len(ref)):
        hit = np.flatnonzero(ref[r] == eos)
        want = hit[0] + 1 if len(hit) else toks.shape[1]
        assert lens[r] == want and bool(out.done[r]) == bool(len(hit)), (r, lens[r], want)


@nnx.jit
def _forward(model, tokens, positions, segment_ids):
    return model(tokens, positions, segment_ids)[0]


def teacher_forced_logprobs(model, tokens, mask, out, n, temperature):
    """log_softmax(logits / T) of the generated tokens, from one no-cache forward over prompt + completion."""
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    p, new = tokens.shape[1], toks.shape[1]
    gen_mask = (np.arange(new)[None] < lens[:, None]).astype(np.int32)
    full = np.concatenate([np.repeat(tokens, n, 0), toks], 1).astype(np.int32)
    seg = np.concatenate([np.repeat(mask, n, 0), gen_mask], 1).astype(np.int32)
    logits = _forward(model, jnp.asarray(full), positions_from_mask(jnp.asarray(seg)), jnp.asarray(seg))
    pred = np.asarray(logits)[:, p - 1:p - 1 + new] / (temperature or 1.0)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(pred), -1))
    return np.take_along_axis(logp, toks[..., None], -1)[..., 0] * gen_mask, pred


# --- exactness against transformers and the model itself ------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_and_logprobs_teacher_forced(family, tmp_path):
    hf, model = _hf_and_ours(family, str(tmp_path))
    tokens, mask, _ = left_padded_batch(lengths=(12, 7, 3))
    out = generate(model, tokens, mask, 0, GREEDY, eos_ids=(EOS,), pad_id=PAD)
    _assert_matches_hf(out, _hf_greedy(hf, tokens, mask, 10, EOS), EOS)
    assert len(set(np.asarray(out.tokens).ravel().tolist())) >= 6  # not one degenerate repeated token
    # An EOS id that occurs mid-way (row 0's 5th token): per-row stop at the same place as HF (same compile).
    eos = int(out.tokens[0, 4])
    out2 = generate(model, tokens, mask, 0, GREEDY, eos_ids=(eos,), pad_id=PAD)
    _assert_matches_hf(out2, _hf_greedy(hf, tokens, mask, 10, eos), eos)
    assert bool(out2.done[0]) and int(out2.lengths[0]) <= 5
    # Greedy logprobs are under log_softmax(logits) (temperature 1).
    ref, _ = teacher_forced_logprobs(model, tokens, mask, out, 1, 0.0)
    assert np.abs(np.asarray(out.logprobs) - ref).max() <= 1e-4


def test_sampled_logprobs_equal_teacher_forced_and_respect_truncation(qwen3):
    _, model = qwen3
    tokens, mask, _ = left_padded_batch(seed=4, lengths=(9, 4))
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=8)
    out = generate(model, tokens, mask, jax.random.key(3), params, n=2, eos_ids=(EOS,), pad_id=PAD)
    ref, scaled = teacher_forced_logprobs(model, tokens, mask, out, 2, 0.7)
    np.testing.assert_array_equal(np.asarray(out.logprobs) == 0, ref == 0)
    assert np.abs(np.asarray(out.logprobs) - ref).max() <= 1e-4
    allowed = np.asarray(truncation_mask(jnp.asarray(scaled), 20, 0.9))
    toks, m = np.asarray(out.tokens), np.asarray(out.mask)
    assert np.take_along_axis(allowed, toks[..., None], -1)[..., 0][m].all()
    # Same seed reproduces (and reuses the compiled program); another seed gives other samples.
    again = generate(model, tokens, mask, jax.random.key(3), params, n=2, eos_ids=(EOS,), pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(again.tokens), toks)
    np.testing.assert_array_equal(np.asarray(again.logprobs), np.asarray(out.logprobs))
    other = generate(model, tokens, mask, jax.random.key(4), params, n=2, eos_ids=(EOS,), pad_id=PAD)
    assert (np.asarray(other.tokens) != toks).any()


# --- sampling statistics on fixed logits -----------------------------------------------------------------------

def _np_allowed(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Independent reference for the allowed set (distinct logits): top-k, then nucleus of the renormalised rest."""
    keep = np.ones_like(scaled, bool)
    if top_k:
        keep &= scaled >= np.sort(scaled, -1)[..., -top_k, None]
    if top_p < 1:
        for r in range(scaled.shape[0]):
            idx = np.flatnonzero(keep[r])
            order = idx[np.argsort(-scaled[r, idx])]
            pr = np.exp(scaled[r, order] - scaled[r, order].max())
            pr /= pr.sum()
            before = np.cumsum(pr) - pr
            keep[r] = False
            keep[r, order[before < top_p]] = True
    return keep


@functools.lru_cache(maxsize=None)
def _sampler_fn(temperature, top_k, top_p):
    return jax.jit(functools.partial(sample_from_logits, temperature=temperature, top_k=top_k, top_p=top_p))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.3, 5, 1.0), (1.3, 0, 0.7), (0.8, 12, 0.6)])
def test_top_k_top_p_never_emit_outside_allowed_set(temperature, top_k, top_p):
    rows, vocab = 4096, 64
    logits = 3.0 * jax.random.normal(jax.random.key(0), (rows, vocab))
    keys = jax.random.split(jax.random.key(1), rows)
    toks, _ = _sampler_fn(temperature, top_k, top_p)(logits, keys)
    want = _np_allowed(np.asarray(logits) / temperature, top_k, top_p)
    np.testing.assert_array_equal(np.asarray(truncation_mask(logits / temperature, top_k, top_p)), want)
    assert want[np.arange(rows), np.asarray(toks)].all()


# chi-square critical values at p = 1e-3 by degrees of freedom
_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8),
                                                     (2.0, 4, 0.9)])
def test_empirical_frequencies_match_softmax(temperature, top_k, top_p):
    """20,000 draws from a fixed 6-token distribution. Tolerance: |freq - p| <= 0.015 per token (>= 4.2 standard
    errors, sqrt(0.25 / 20000) = 0.0035) and a chi-square statistic below its p = 0.001 critical value."""
    draws = 20_000
    base = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    scaled = base / temperature
    allowed = _np_allowed(scaled[None], top_k, top_p)[0]
    p = np.where(allowed, np.exp(scaled - scaled.max()), 0.0)
    p /= p.sum()
    logits = jnp.broadcast_to(jnp.asarray(base), (draws, 6))
    toks, lps = _sampler_fn(temperature, top_k, top_p)(logits, jax.random.split(jax.random.key(7), draws))
    toks = np.asarray(toks)
    freq = np.bincount(toks, minlength=6) / draws
    assert np.abs(freq - p).max() <= 0.015, (freq, p)
    assert (freq[~allowed] == 0).all()
    k = allowed.sum()
    chi2 = (((freq - p) ** 2 / np.where(allowed, p, 1.0))[allowed]).sum() * draws
    assert k == 1 or chi2 < _CHI2_999[k - 1], chi2
    full = np.asarray(jax.nn.log_softmax(jnp.asarray(scaled)))  # logprob: full temperature-scaled distribution
    np.testing.assert_allclose(np.asarray(lps), full[toks], atol=1e-6)


# --- n samples per prompt, stops, sharding ----------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_n_samples_sharing_prefill_equal_separate_prefills(qwen3, temperature):
    _, model = qwen3
    tokens, mask, _ = left_padded_batch(seed=5, lengths=(9, 4))
    params = SamplingParams(temperature=temperature, max_new_tokens=6)
    key = jax.random.key(11)
    shared = generate(model, tokens, mask, key, params, n=3, eos_ids=(EOS,), pad_id=PAD)
    separate = generate(model, np.repeat(tokens, 3, 0), np.repeat(mask, 3, 0), None, params, n=1,
                        eos_ids=(EOS,), pad_id=PAD, keys=sample_keys(key, [0, 1], 3))
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(separate.tokens))
    np.testing.assert_array_equal(np.asarray(shared.lengths), np.asarray(separate.lengths))
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(separate.logprobs), atol=1e-5)
    if temperature:  # the n samples of a prompt differ from each other
        assert len({tuple(r) for r in np.asarray(shared.tokens)[:3].tolist()}) > 1


def _expected_stop(row, eos_ids, seqs, pad=PAD):
    """Length after the first EOS or the first completed stop sequence (numpy reference)."""
    for t in range(len(row)):
        if row[t] in eos_ids or any(t + 1 >= len(s) and tuple(row[t + 1 - len(s):t + 1]) == s for s in seqs):
            return t + 1, True
    return len(row), False


def test_stop_sequences_cut_at_the_right_place(qwen3):
    _, model = qwen3
    tokens, mask, _ = left_padded_batch(seed=6, lengths=(10, 5, 8))
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    free = np.asarray(generate(model, tokens, mask, 0, params, pad_id=PAD).tokens)
    seqs = [tuple(free[0, 3:5].tolist()), tuple(free[2, 5:8].tolist()), (PAD + 7, PAD + 7, PAD + 7, PAD + 7)]
    eos_ids = (int(free[1, 6]),)
    out = generate(model, tokens, mask, 0, params.replace(stop_sequences=(seqs[0],)), pad_id=PAD,
                   eos_ids=eos_ids, stop_sequences=seqs[1:])
    toks, lens, lps = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.logprobs)
    for r in range(3):
        want, stopped = _expected_stop(free[r].tolist(), eos_ids, seqs)
        assert lens[r] == want and bool(out.done[r]) == stopped, (r, lens[r], want)
        np.testing.assert_array_equal(toks[r, :want], free[r, :want])
        assert (toks[r, want:] == PAD).all() and (lps[r, want:] == 0).all()
    assert lens[0] <= 5 and lens[1] <= 7 and lens[2] <= 8 and out.done.all()


def test_sharded_generate_equals_single_device(qwen3, tmp_path):
    _, single = qwen3
    mesh = make_mesh(ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    path = str(tmp_path / "hf")
    _hf_and_ours("qwen3", path)
    sharded = hf_io.load_hf_model(path, mesh)
    tokens, mask, _ = left_padded_batch(lengths=(12, 7, 3, 10))
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    sampler = Sampler(sharded)  # mesh taken from the parameters' shardings
    out = sampler.generate(tokens, mask, 0, params, n=2, eos_ids=(EOS,), pad_id=PAD)
    ref = generate(single, tokens, mask, 0, params, n=2, eos_ids=(EOS,), pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-4)
    (cache,) = sampler._caches.values()  # kept for the next call, sharded rows over data*fsdp, kv heads over tensor
    want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), "tensor"))
    for layer in (*cache.k, *cache.v):  # [B, K, S, D] per layer
        assert layer.sharding.is_equivalent_to(want, 4), layer.sharding
    again = sampler.generate(tokens, mask, 0, params, n=2, eos_ids=(EOS,), pad_id=PAD)  # donated cache reused
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(ref.tokens))
    # Sampled too: per-row keys make the draws independent of how rows are split over devices.
    hot = params.replace(temperature=1.0, top_k=30)
    out = sampler.generate(tokens, mask, 9, hot, n=2, eos_ids=(EOS,), pad_id=PAD)
    ref = generate(single, tokens, mask, 9, hot, n=2, eos_ids=(EOS,), pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


# --- continuous batching ----------------------------------------------------------------------------------------

def _static_rows(model, prompts, key, params, n, eos, prompt_ids=None):
    """Each prompt alone through the static path (its own bucket, batch of one): the reference rows."""
    rows = []
    sampler = Sampler(model)
    for i, p in enumerate(prompts):
        tokens, mask = left_pad([p], bucket_length(len(p), params.max_prompt_len), PAD)
        out = sampler.generate(tokens, mask, None, params, n=n, eos_ids=eos, pad_id=PAD,
                               keys=sample_keys(key, [i if prompt_ids is None else prompt_ids[i]], n))
        for j in range(n):
            ln = int(out.lengths[j])
            rows.append((np.asarray(out.tokens[j, :ln]), np.asarray(out.logprobs[j, :ln]), bool(out.done[j])))
    return rows


def test_continuous_equals_static_and_teacher_forced(qwen3):
    """Sampled (top-k), prompts of three length buckets over 3 slot groups refilled as rows stop at different
    steps, decode chunks of 3 steps: every sample equals the static path's (same keys), and its logprobs equal the
    model's teacher-forced recomputation. (Greedy: test_continuous_greedy_matches_transformers.)"""
    _, model = qwen3
    temperature, chunk = 1.0, 3
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, int(k)).tolist() for k in (3, 38, 20, *rng.integers(2, 40, 5))]
    params = SamplingParams(temperature=temperature, top_k=20 if temperature else 0, max_new_tokens=12,
                            max_prompt_len=64)
    eos = tuple(range(3, 128, 9))  # frequent stops: rows end anywhere from the first token to the last
    key = jax.random.key(11)
    n = 2
    got = generate_continuous(Sampler(model), prompts, sample_keys(key, np.arange(len(prompts)), n), params, n=n,
                              groups=3, eos_ids=eos, pad_id=PAD, chunk=chunk)
    want = _static_rows(model, prompts, key, params, n, eos)
    lengths = []
    for i, per in enumerate(got):
        assert len(per) == n
        for j, r in enumerate(per):
            t, lp, stopped = want[i * n + j]
            np.testing.assert_array_equal(r.tokens, t)
            assert r.stopped == stopped and len(r.logprobs) == len(t)
            np.testing.assert_allclose(r.logprobs, lp, atol=1e-5)
            lengths.append(len(t))
            # the learner's recomputation (one forward over prompt + completion)
            tokens, mask = left_pad([prompts[i]], bucket_length(len(prompts[i]), 64), PAD)
            out = GenerateOutput(tokens=jnp.asarray(np.pad(r.tokens, (0, 12 - len(t)))[None]),
                                 logprobs=jnp.zeros((1, 12)), lengths=jnp.asarray([len(t)]),
                                 done=jnp.asarray([r.stopped]))
            ref, _ = teacher_forced_logprobs(model, tokens, mask, out, 1, temperature)
            np.testing.assert_allclose(r.logprobs, ref[0, :len(t)], atol=1e-4)
    assert min(lengths) < 6 and max(lengths) == 12  # the workload really was length-skewed


def test_continuous_greedy_matches_transformers(tmp_path):
    hf, model = _hf_and_ours("llama", str(tmp_path))
    tokens, mask, _ = left_padded_batch(lengths=(12, 7, 3, 9, 5))
    prompts = [tokens[r][mask[r] == 1].tolist() for r in range(len(tokens))]
    got = generate_continuous(Sampler(model), prompts, sample_keys(0, np.arange(5), 1), GREEDY, groups=2,
                              eos_ids=(EOS,), pad_id=PAD)
    for r, p in enumerate(prompts):
        t = np.asarray([p])
        ref = _hf_greedy(hf, t, np.ones_like(t), 10, EOS)[0]
        hit = np.flatnonzero(ref == EOS)
        ref = ref[:hit[0] + 1] if len(hit) else ref
        np.testing.assert_array_equal(got[r][0].tokens, ref)
        assert got[r][0].stopped == bool(len(hit))


def test_continuous_compiles_once_per_bucket(qwen3):
    """Per prompt-length bucket one decode program and two refill programs (the first fill, then single refills),
    reused by later workloads of the same buckets."""
    _, model = qwen3
    rng = np.random.default_rng(5)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, max_prompt_len=32)
    sampler = Sampler(model)
    decode0, refill0 = continuous._decode_jit._cache_size(), continuous._refill_jit._cache_size()

    def run(seed):
        # lengths in buckets 16 and 32; the longest (30) sets the cache's prompt width (32) in every run
        prompts = [rng.integers(3, 128, int(k)).tolist() for k in (30, *rng.integers(2, 30, 8))]
        generate_continuous(sampler, prompts, sample_keys(seed, np.arange(9), 2), params, n=2, groups=4,
                            eos_ids=tuple(range(3, 128, 7)), pad_id=PAD)

    run(0)
    decode1, refill1 = continuous._decode_jit._cache_size(), continuous._refill_jit._cache_size()
    assert decode1 - decode0 == 2  # buckets 16 and 32
    # refills of 4 (the first fill) or 1 prompt (1/16 of the groups, at least 1), each at length 16 or 32
    assert 2 <= refill1 - refill0 <= 4
    run(1)
    run(2)
    assert continuous._decode_jit._cache_size() == decode1
    assert continuous._refill_jit._cache_size() - refill0 <= 4


# --- text API ---------------------------------------------------------------------------------------------------

class CharTokenizer:
    """A Tokenizer (docs/INTERFACES.md) over the 128-id test vocab: one character per id (ids 3..127)."""

    vocab_size, pad_id, eos_id, bos_id, stop_ids = 128, PAD, EOS, 1, (EOS,)

    def encode(self, text):
        return [ord(c) - 0x100 for c in text]

    def decode(self, ids):
        return "".join(chr(0x100 + i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(self.decode([5, 6]) + m["content"] for m in messages) + (
            self.decode([7]) if add_generation_prompt else "")

    def encode_chat(self, messages, add_generation_prompt=True):
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


@pytest.mark.parametrize("continuous", [False, True])
def test_generate_text_chunking_invariant_and_stop_strings(qwen3, continuous):
    _, model = qwen3
    tok = CharTokenizer()
    rng = np.random.default_rng(0)
    msgs = [[{"role": "user", "content": tok.decode(rng.integers(3, 128, n).tolist())}] for n in (12, 2, 7, 10, 4)]
    # prompts of 5..15 tokens: one length bucket (16); chunks of 2, 2 and 1 prompts, then one chunk of 8 rows.
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, batch_size=2, max_prompt_len=32,
                            continuous=continuous)
    a = generate_text(model, tok, msgs, n=2, params=params, seed=5)
    assert [len(c) for c in a] == [2] * 5
    for comps in a:
        for c in comps:
            assert isinstance(c, Completion) and len(c.token_ids) == len(c.logprobs) >= 1
            assert c.finish_reason == ("stop" if c.token_ids[-1] == EOS else "length")
            assert c.text == tok.decode([t for t in c.token_ids if t != EOS])
    stop = next(c.text for c in sum(a, []) if len(c.text) >= 5)[2:4]
    # the other path (static <-> continuous), another batch size, and a stop string
    other = params.replace(batch_size=8, stop=(stop,), continuous=not continuous)
    b = generate_text(model, tok, msgs, n=2, params=other, seed=5)
    for ca, cb in zip(sum(a, []), sum(b, [])):
        cut = ca.text.find(stop)
        if cut < 0:  # different chunking, padding and batch: same samples
            assert (cb.token_ids, cb.text, cb.finish_reason) == (ca.token_ids, ca.text, ca.finish_reason)
            np.testing.assert_allclose(cb.logprobs, ca.logprobs, atol=1e-5)
        else:
            assert cb.text == ca.text[:cut + len(stop)] and cb.finish_reason == "stop"
            np.testing.assert_allclose(cb.logprobs, ca.logprobs[:len(cb.logprobs)], atol=1e-5)
    with pytest.raises(ValueError, match=r"prompt 1: 35 tokens exceed sampling\.max_prompt_len=32"):
        generate_text(model, tok, [msgs[0], [{"role": "user", "content": tok.decode([9] * 32)}]], params=params)


def test_sampling_params_from_config_and_validation():
    from configs.base import get_config
    c = get_config()
    p = SamplingParams.from_config(c.sampling)
    assert (p.temperature, p.top_k, p.top_p, p.max_new_tokens, p.max_prompt_len, p.batch_size) == (
        c.sampling.temperature, c.sampling.top_k, c.sampling.top_p, c.sampling.max_new_tokens,
        c.sampling.max_prompt_len, c.sampling.batch_size)
    assert SamplingParams.from_config({"temperature": 0, "stop": "</answer>"}).stop == ("</answer>",)
    with pytest.raises(ValueError, match=r"sampling\.top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match=r"sampling\.temperature"):
        SamplingParams.from_config({"temperature": -1.0})


def test_skewed_benchmark_workload_runs_both_paths_to_the_same_completions():
    """The benchmark's length-skewed workload (benchmarks/sampler.py) at a toy size: it raises unless static and
    continuous batching return identical completions; lengths really vary."""
    from benchmarks.sampler import run_skewed
    r = run_skewed("tiny", prompts=4, n=2, batch=2, max_prompt=32, new_tokens=8, repeats=1, stop_every=8)
    assert r.generated_tokens == round(r.mean_length * 8) and 1 <= r.mean_length < 8
    assert len(r.static_s) == len(r.continuous_s) == 1
