"""Continuous batching: a fixed set of decode slots kept full, so one long completion does not hold a batch.

Why: RERS, evaluation and `diagnose` on a file sample one prompt after another with completions of very different
lengths. The static path (`Sampler.generate`) decodes a batch until its longest row stops; here a group of n
slots (the n samples of one prompt) is refilled with the next prompt as soon as all n have stopped.

Layout. G slot groups x n samples = R decode rows over one preallocated cache: each group's prompt keys/values
sit in a read-only prefix ([G, K, P, D] per layer) shared by its n rows, and each row's own tokens in
[R, K, max_new, D] (the same `KVCache` as the static path, with a per-row write index). Prompts run in one
session per length bucket P (shortest first), so no row reads a prefix wider than its bucket; the rows' own
cache passes from session to session. Two compiled programs per bucket:

* `refill`: prefill m prompts (m = all groups for the first fill, then 1/16 of them), write their keys/values
  into the freed groups' prefix slots, sample each row's first token, and reset the rows' state;
* `decode`: a `lax.while_loop` of decode steps over all rows that exits after `chunk` steps, when every row is
  done, or as soon as m groups have finished while prompts are waiting (the host then refills them at once).

Exactness. Row r of prompt i keeps the static path's key `fold_in(fold_in(key, i), j)` and position, step and
stop rules: its step-t token uses `fold_in(row_key, t)` and positions count its own prompt's real tokens. So a
prompt's completions do not depend on which slot or batch it ran in (tested equal to the static path).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raredx_jax.models.transformer import CACHE_AXES, VALID_AXES, KVCache
from raredx_jax.parallel.sharding import constrain
from raredx_jax.sampling.sampler import (
    ROW_AXES,
    Sampler,
    SampleSpec,
    SamplingParams,
    as_typed_key,
    bucket_length,
    decode_layer_params,
    left_pad,
    next_pow2,
    prefill,
    put_sharded,
    record_tokens,
    select_tokens,
    stop_matrix,
)


@dataclasses.dataclass(frozen=True)
class RowResult:
    """One finished sample: its generated tokens (stop token included), their logprobs, and how it ended."""

    tokens: np.ndarray  # [length] int32
    logprobs: np.ndarray  # [length] float32
    stopped: bool  # True: EOS / stop sequence; False: max_new_tokens reached


def _init_slots(cache: KVCache, groups: int, n: int, max_prompt: int, max_new: int, tail_len: int,
                pad_id: int) -> dict:
    rows = groups * n
    cfg_shape = cache.k[0].shape  # [R, K, S, D]
    prefix = tuple(jnp.zeros((groups, cfg_shape[1], max_prompt, cfg_shape[3]), cache.k[0].dtype)
                   for _ in cache.k)
    cache = cache.replace(valid=jnp.zeros((rows, cache.max_len), bool), index=jnp.zeros((rows,), jnp.int32),
                          prefix_k=prefix, prefix_v=tuple(jnp.zeros_like(a) for a in prefix),
                          prefix_valid=jnp.zeros((groups, max_prompt), bool))
    return dict(
        cache=cache, tok=jnp.full((rows,), pad_id, jnp.int32), step=jnp.zeros((rows,), jnp.int32),
        prompt_len=jnp.zeros((rows,), jnp.int32), key_data=jnp.zeros((rows, 2), jnp.uint32),
        tail=jnp.full((rows, tail_len), -1, jnp.int32), tokens=jnp.full((rows, max_new), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, max_new), jnp.float32), lengths=jnp.zeros((rows,), jnp.int32),
        done=jnp.ones((rows,), bool), stopped=jnp.zeros((rows,), bool))


def _constrain_slots(slots: dict) -> dict:
    cache = slots["cache"]
    cache = cache.replace(k=tuple(constrain(a, CACHE_AXES) for a in cache.k),
                          v=tuple(constrain(a, CACHE_AXES) for a in cache.v),
                          prefix_k=tuple(constrain(a, CACHE_AXES) for a in cache.prefix_k),
                          prefix_v=tuple(constrain(a, CACHE_AXES) for a in cache.prefix_v),
                          valid=constrain(cache.valid, VALID_AXES),
                          prefix_valid=constrain(cache.prefix_valid, VALID_AXES))
    rowwise = {k: constrain(v, ROW_AXES if v.ndim == 2 else ("batch",)) for k, v in slots.items() if k != "cache"}
    return dict(rowwise, cache=cache)


def _refill_impl(graphdef, state, slots: dict, groups: jax.Array, tokens: jax.Array, mask: jax.Array,
                 key_data: jax.Array, eos: jax.Array, stop_m: jax.Array, spec: SampleSpec) -> dict:
    """Prefill m prompts into slot groups `groups` [m] (ids >= G are padding, dropped) and sample their first
    tokens; key_data [m*n, 2]."""
    model = nnx.merge(graphdef, state)
    n = spec.n
    m, p = tokens.shape
    cache = slots["cache"]
    layer_params = decode_layer_params(model)
    last, small, lens = prefill(model, tokens, mask, cache.k[0].dtype, layer_params)
    g_count, width = cache.prefix_valid.shape

    def pad(a: jax.Array) -> jax.Array:  # [m, K, P, D] -> [m, K, Pmax, D]
        return jnp.pad(a, [(0, 0)] * 2 + [(0, width - p), (0, 0)])

    def put(big: jax.Array, part: jax.Array) -> jax.Array:
        return big.at[groups].set(pad(part), mode="drop")

    prefix_valid = cache.prefix_valid.at[groups].set(jnp.pad(small.valid, [(0, 0), (0, width - p)]), mode="drop")
    rows = (groups[:, None] * n + jnp.arange(n)[None, :]).reshape(-1)  # [m*n], out of range for padding
    rows = jnp.where(jnp.repeat(groups, n) < g_count, rows, g_count * n)

    # The rows' first token, exactly as the static path draws it (step 0 from the prompt's last logits).
    keys = jax.random.wrap_key_data(key_data)
    fresh = dict(tok=jnp.full((m * n,), spec.pad_id, jnp.int32), tail=jnp.full((m * n, stop_m.shape[1]), -1, jnp.int32),
                 tokens=jnp.full((m * n, slots["tokens"].shape[1]), spec.pad_id, jnp.int32),
                 logprobs=jnp.zeros((m * n, slots["tokens"].shape[1]), jnp.float32),
                 lengths=jnp.zeros((m * n,), jnp.int32), done=jnp.zeros((m * n,), bool))
    step0 = jnp.zeros((), jnp.int32)
    tok, lp = select_tokens(jnp.repeat(last, n, axis=0), keys, step0, spec)
    fresh = record_tokens(fresh, tok, lp, step0, eos, stop_m, spec.pad_id)
    stopped = fresh["done"]
    fresh.update(step=jnp.ones((m * n,), jnp.int32), prompt_len=jnp.repeat(lens, n), key_data=key_data,
                 stopped=stopped, done=stopped | (spec.max_new <= 1))
    out = {k: v.at[rows].set(fresh[k], mode="drop") for k, v in slots.items() if k != "cache"}
    out["cache"] = cache.replace(
        prefix_k=tuple(map(put, cache.prefix_k, small.k)), prefix_v=tuple(map(put, cache.prefix_v, small.v)),
        prefix_valid=prefix_valid, valid=cache.valid.at[rows].set(False, mode="drop"),
        index=cache.index.at[rows].set(0, mode="drop"))
    return _constrain_slots(out)


def _decode_impl(graphdef, state, slots: dict, busy: jax.Array, chunk: jax.Array, refill_at: jax.Array,
                 eos: jax.Array, stop_m: jax.Array, spec: SampleSpec) -> tuple[dict, jax.Array]:
    """Decode all rows for up to `chunk` steps; stop early once `refill_at` busy groups have finished (0: never).
    Returns the slots and the steps run."""
    model = nnx.merge(graphdef, state)
    n, max_new = spec.n, spec.max_new
    rows = slots["tok"].shape[0]
    layer_params = decode_layer_params(model)

    def group_done(done: jax.Array) -> jax.Array:
        return busy & done.reshape(-1, n).all(axis=1)

    def cond(c: tuple[dict, jax.Array]) -> jax.Array:
        s, t = c
        finished = jnp.sum(group_done(s["done"]))
        return (t < chunk) & ~jnp.all(s["done"]) & ~((refill_at > 0) & (finished >= refill_at))

    def body(c: tuple[dict, jax.Array]) -> tuple[dict, jax.Array]:
        s, t = c
        step = s["step"]
        logits, cache = model(s["tok"][:, None], (s["prompt_len"] + step - 1)[:, None],
                              jnp.ones((rows, 1), jnp.int32), s["cache"], layer_params=layer_params)
        keys = jax.random.wrap_key_data(s["key_data"])
        tok, lp = select_tokens(logits[:, 0, :], keys, step, spec)
        live = ~s["done"]
        s = record_tokens(dict(s, cache=cache), tok, lp, step, eos, stop_m, spec.pad_id)
        s["stopped"] = s["stopped"] | (s["done"] & live)
        s["done"] = s["done"] | (s["step"] >= max_new)
        return s, t + 1

    return jax.lax.while_loop(cond, body, (slots, jnp.zeros((), jnp.int32)))


@functools.partial(jax.jit, static_argnames=("groups", "n", "max_prompt", "max_new", "tail_len", "pad_id"),
                   donate_argnames=("cache",))
def _init_slots_jit(cache: KVCache, groups: int, n: int, max_prompt: int, max_new: int, tail_len: int,
                    pad_id: int) -> dict:
    # compiled and constrained like the refill's output, so the first refill sees the same input shardings as
    # every later one (no second compilation of each refill program)
    return _constrain_slots(_init_slots(cache, groups, n, max_prompt, max_new, tail_len, pad_id))


_refill_jit = jax.jit(_refill_impl, static_argnames=("graphdef", "spec"), donate_argnames=("slots",))
_decode_jit = jax.jit(_decode_impl, static_argnames=("graphdef", "spec"), donate_argnames=("slots",))


def _session(call: Callable, cache: KVCache, members: list[int], width: int, prompts: Sequence[Sequence[int]],
             key_data: np.ndarray, params: SamplingParams, groups: int, n: int, max_new: int, chunk_d: jax.Array,
             eos_d: jax.Array, stop_d: jax.Array, tail_len: int, pad_id: int, results: list,
             on_done: Callable[[int, list[RowResult]], None] | None) -> KVCache:
    """Decode the prompts `members` (one length bucket, prefix `width` wide) over the slot groups; fills `results`
    and returns the rows' own cache for the next session."""
    slots = call(_init_slots_jit, cache, groups=groups, n=n, max_prompt=width, max_new=max_new,
                 tail_len=int(tail_len), pad_id=int(pad_id))
    owner = np.full((groups,), -1)  # prompt index held by each group, -1 = free
    pending = list(members)  # shortest first (the order does not change any sample: each row's key is its own)

    # Refills come in two sizes only, all groups (the first fill) and `refill_size` (1/16 of the groups: measured on
    # the skewed benchmark, refilling at once beat waiting to batch prefills), so a job compiles at most two refill
    # programs per prompt-length bucket.
    refill_size = next_pow2(max(1, groups // 16))

    def refill(free: list[int], size: int) -> None:
        nonlocal slots
        for start in range(0, len(free), size):
            take = pending[:min(size, len(free) - start)]
            if not take:
                return
            del pending[:len(take)]
            length = bucket_length(max(len(prompts[i]) for i in take), params.max_prompt_len)
            toks, mask = left_pad([prompts[i] for i in take] + [[]] * (size - len(take)), length, pad_id)
            gids = np.full((size,), groups, np.int32)
            gids[:len(take)] = free[start:start + len(take)]
            kd = np.zeros((size, n, 2), np.uint32)
            kd[:len(take)] = key_data[take]
            for g, i in zip(gids, take):
                owner[g] = i
            slots = call(_refill_jit, slots, jnp.asarray(gids), jnp.asarray(toks), jnp.asarray(mask),
                         jnp.asarray(kd.reshape(size * n, 2)), eos_d, stop_d)

    refill(list(range(groups)), groups)
    while (owner >= 0).any():
        busy = jnp.asarray(owner >= 0)
        # exit to refill as soon as refill_size groups are free
        refill_at = min(len(pending), refill_size) if pending else 0
        slots, _ = call(_decode_jit, slots, busy, chunk_d, jnp.asarray(refill_at, jnp.int32), eos_d, stop_d)
        done = np.asarray(jax.device_get(slots["done"])).reshape(groups, n)
        finished = [g for g in range(groups) if owner[g] >= 0 and done[g].all()]
        if not finished:
            continue
        host = {k: np.asarray(jax.device_get(slots[k])) for k in ("tokens", "logprobs", "lengths", "stopped")}
        for g in finished:
            i = int(owner[g])
            out = []
            for j in range(n):
                r, length = g * n + j, int(host["lengths"][g * n + j])
                out.append(RowResult(tokens=host["tokens"][r, :length].copy(),
                                     logprobs=host["logprobs"][r, :length].copy(), stopped=bool(host["stopped"][r])))
            results[i] = out
            owner[g] = -1
            if on_done is not None:
                on_done(i, out)
        if pending:
            refill(finished, refill_size)
    return slots["cache"].replace(prefix_k=None, prefix_v=None, prefix_valid=None)  # the prefix is this session's


def generate_continuous(sampler: Sampler, prompts: Sequence[Sequence[int]], keys: Any, params: SamplingParams, *,
                        n: int = 1, groups: int = 8, eos_ids: Sequence[int] = (),
                        stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0, chunk: int = 0,
                        on_done: Callable[[int, list[RowResult]], None] | None = None) -> list[list[RowResult]]:
    """n samples for each prompt (token lists), decoded in `groups` slot groups of n rows, refilled as they free.

    keys: [len(prompts) * n] row keys (e.g. `sample_keys(key, prompt_ids, n)`), row i*n + j = sample j of prompt i.
    groups is rounded up so the rows split evenly over the mesh's batch shards. chunk: most decode steps per
    compiled call (0 = max_new_tokens). on_done(i, results) is called as prompt i finishes (progress bars).
    Returns, per prompt in input order, its n RowResults.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1 (got {n})")
    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"prompt {i}: encodes to no tokens")
    divisor = sampler.batch_shards()
    groups = max(1, min(int(groups), len(prompts)))
    while (groups * n) % divisor:
        groups += 1
    max_new = int(params.max_new_tokens)
    keys = as_typed_key(keys)
    if keys.shape != (len(prompts) * n,):
        raise ValueError(f"keys: expected {len(prompts) * n} row keys (prompts * n), got shape {keys.shape}")
    key_data = np.asarray(jax.random.key_data(keys)).reshape(len(prompts), n, 2)
    stops = tuple(dict.fromkeys(tuple(int(t) for t in s) for s in (*params.stop_sequences, *stop_sequences)))
    eos = np.asarray(list(dict.fromkeys(int(e) for e in eos_ids)), np.int32).reshape(-1)
    stop_m = stop_matrix(stops)
    spec = SampleSpec(n=int(n), max_new=max_new, temperature=float(params.temperature), top_k=int(params.top_k),
                 top_p=float(params.top_p), pad_id=int(pad_id))
    graphdef, state = nnx.split(sampler.model)
    mesh = sampler._mesh(state)
    rows = groups * n
    cache = sampler._cache(rows, max_new, mesh)
    eos_d, stop_d = put_sharded(eos, (None,), mesh), put_sharded(stop_m, (None, None), mesh)
    chunk_d = jnp.asarray(int(chunk) or max_new, jnp.int32)

    def call(fn, *args, **kw):
        if not kw:
            args, kw = (graphdef, state, *args), dict(spec=spec)
        if mesh is None:
            return fn(*args, **kw)
        with jax.set_mesh(mesh):
            return fn(*args, **kw)

    results: list[list[RowResult] | None] = [None] * len(prompts)
    # One session per prompt-length bucket, shortest first: a session's prompt prefix is as wide as its bucket
    # (one width for all would make every decode step read the longest prompt's width for every row). The rows'
    # own cache is the same for every session and passes from one to the next.
    by_width: dict[int, list[int]] = {}
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        by_width.setdefault(bucket_length(len(prompts[i]), params.max_prompt_len), []).append(i)
    for width, members in sorted(by_width.items()):
        cache = _session(call, cache, members, width, prompts, key_data, params, groups, n, max_new, chunk_d,
                         eos_d, stop_d, stop_m.shape[1], pad_id, results, on_done)
    if sampler.keep_cache:  # hand the decode cache back for reuse
        sampler._caches[(rows, max_new)] = cache
    return results  # type: ignore[return-value]
