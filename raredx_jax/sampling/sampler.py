"""One jit-compiled generate: prefill, then a decode loop inside `lax.while_loop` (no host round-trip per token).

Layout of one call (everything below runs inside a single compiled program):

1. **Prefill** the B left-padded prompts once into a prompt-sized KV cache ([B, K, P, D] per layer).
2. **Share** that cache, unchanged, as the read-only prefix of the B*n sample rows (row `b*n + j` is sample j of
   prompt b): each row's own keys/values go to the preallocated, *donated* decode cache ([B*n, K, max_new, D]
   per layer), and attention joins the prompt's slots with the row's own. A decode step is bound by reading the
   cache, and the n samples of a prompt now read its prompt keys/values once instead of n copies.
3. **Decode** in `lax.while_loop`: sample a token from the last logits, record it and its logprob, check EOS ids
   and stop sequences (on the tail of the generated tokens), feed it back; the loop exits when every row is done
   or `max_new_tokens` is reached.

Logprobs. `logprobs[i, t]` is `log_softmax(logits / temperature)[token]`: the log-probability of the chosen token
under the **temperature-scaled, untruncated** distribution (the full vocabulary, *before* top-k / top-p masking;
with temperature 0 (greedy) it is under `log_softmax(logits)`, i.e. temperature 1). This is what GRPO's importance
ratio is computed against when the trainer recomputes `log_softmax(logits / temperature)` of the same tokens.
It is *not* the probability of the truncated (renormalised) distribution the token was actually drawn from; with
top-k / top-p the two differ by the (per-step) log of the kept mass.

Stop semantics. The stop token (an EOS id) or the last token of a matched stop sequence *is* part of the returned
tokens and counted in `lengths` (so a trainer learns to stop); after it a row holds `pad_id` and logprob 0.
`done[i]` is True when row i stopped on EOS / a stop sequence, False when it ran out of `max_new_tokens`.

RNG. Each sample row has its own key, `fold_in(fold_in(key, prompt_index), sample_index)` (`sample_keys`), and
step t uses `fold_in(row_key, t)`. A row's tokens therefore depend only on (key, prompt index, sample index, the
prompt), not on the batch it was generated in: the same seed reproduces, and n samples sharing one prefill equal
n separately prefilled copies of the prompt given the same per-row keys.

Sharding. Under the model's mesh (taken from its parameters, or passed in), sample rows are sharded over
(data, fsdp) and KV heads over tensor, by the same logical-axis rules the trainer uses (`parallel/sharding.py`).
The generate runs on the nnx model object itself: `nnx.split` gives (graphdef, state) and the compiled function
merges them back, so the trainer's current parameters are used without a copy to another format.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raredx_jax.models.transformer import CACHE_AXES, VALID_AXES, KVCache, Transformer, positions_from_mask
from raredx_jax.parallel.sharding import constrain, logical_to_spec

ROW_AXES = ("batch", None)


# --- parameters -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature=0` is greedy (argmax); `top_k=0` and `top_p=1` disable those filters.

    `stop_sequences` are token-id sequences (core API); `stop` are strings that the text API encodes with the
    tokenizer and adds to them. `max_prompt_len` and `batch_size` (prompts per compiled call) are used by the
    text API to bucket and chunk prompts. `continuous`: the text API keeps `batch_size` prompts decoding and
    refills a prompt's slots as soon as its samples stop (`sampling/continuous.py`); the same samples as the
    static chunks, sooner when completion lengths differ.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 160
    max_prompt_len: int = 384
    batch_size: int = 32
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stop: tuple[str, ...] = ()
    continuous: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences))
        object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"sampling.{field}: {why} (got {getattr(self, field)!r})")

        if not self.temperature >= 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 = off)")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if self.max_prompt_len < 1:
            bad("max_prompt_len", "must be >= 1")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if any(len(s) == 0 for s in self.stop_sequences):
            bad("stop_sequences", "stop sequences must not be empty")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **kw: Any) -> "SamplingParams":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_config(cls, sampling: Any, **overrides: Any) -> "SamplingParams":
        """From the run config's `sampling` section (a ConfigDict or dict); missing fields keep defaults."""
        get = sampling.get if hasattr(sampling, "get") else (lambda k, d=None: getattr(sampling, k, d))
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = get(f.name, None)
            if v is None:
                continue
            if f.name == "stop":
                v = (v,) if isinstance(v, str) else tuple(v)
                v = tuple(s for s in v if s)
            elif f.name == "stop_sequences":
                v = tuple(tuple(s) for s in v)
            elif f.name in ("top_k", "max_new_tokens", "max_prompt_len", "batch_size"):
                v = int(v)
            elif f.name == "continuous":
                if not isinstance(v, (bool, np.bool_)):
                    raise ValueError(f"sampling.continuous: must be True or False (got {v!r})")
                v = bool(v)
            else:
                v = float(v)
            kw[f.name] = v
        kw.update(overrides)
        return cls(**kw)


@flax.struct.dataclass
class GenerateOutput:
    """Result of one generate call; row `b*n + j` is sample j of prompt b."""

    tokens: jax.Array  # [B*n, max_new] int32, pad_id after the end
    logprobs: jax.Array  # [B*n, max_new] float32, log_softmax(logits / T) of the chosen token; 0 after the end
    lengths: jax.Array  # [B*n] int32 generated tokens, stop token included
    done: jax.Array  # [B*n] bool: stopped on EOS / stop sequence (False: hit max_new_tokens)

    @property
    def mask(self) -> jax.Array:
        """[B*n, max_new] bool: True on generated tokens (stop token included)."""
        return jnp.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


# --- sampling from logits ---------------------------------------------------------------------------------------

def truncation_mask(scaled: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Bool [..., V]: the tokens top-k then top-p (HF order) may emit, from temperature-scaled logits.

    top-k keeps the k largest logits (k static; ties with the k-th value are kept too). top-p then keeps the
    smallest prefix of the (top-k renormalised) distribution sorted by probability whose mass reaches top_p: a
    token is kept when the mass strictly before it is < top_p (the most likely token is always kept). Both are
    implemented as a logit threshold found from a sort, so no scatter is needed and shapes are static under jit.
    """
    v = scaled.shape[-1]
    keep = jnp.ones(scaled.shape, bool)
    sorted_desc = None
    if top_k and top_k < v:
        sorted_desc = jax.lax.top_k(scaled, int(top_k))[0]  # [..., k] descending
        keep = scaled >= sorted_desc[..., -1:]
    if top_p < 1.0:
        if sorted_desc is None:
            sorted_desc = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(sorted_desc.astype(jnp.float32), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
        cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
        keep = keep & (scaled >= cutoff)
    return keep


def sample_from_logits(logits: jax.Array, keys: jax.Array | None, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(tokens [N] int32, logprobs [N] f32) from logits [N, V] with one key per row (typed keys [N]).

    temperature 0 = greedy argmax. The logprob is `log_softmax(logits / T)[token]` (full, untruncated
    distribution; T = 1 when greedy): see the module docstring.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / jnp.float32(temperature)
        logp = jax.nn.log_softmax(scaled, axis=-1)
        masked = scaled
        if top_k or top_p < 1.0:
            masked = jnp.where(truncation_mask(scaled, top_k, top_p), scaled, -jnp.inf)
        tokens = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen


def sample_keys(key: jax.Array, prompt_ids: Sequence[int] | jax.Array, n: int) -> jax.Array:
    """Typed keys [len(prompt_ids) * n]: row `i*n + j` = fold_in(fold_in(key, prompt_ids[i]), j)."""
    return _sample_keys(as_typed_key(key), jnp.asarray(np.asarray(prompt_ids), jnp.uint32), int(n))


@functools.partial(jax.jit, static_argnames="n")
def _sample_keys(key: jax.Array, ids: jax.Array, n: int) -> jax.Array:
    per_prompt = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    rows = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n, dtype=jnp.uint32)))(
        per_prompt)
    return rows.reshape(-1)


def as_typed_key(key: Any) -> jax.Array:
    if isinstance(key, int):
        return jax.random.key(key)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


# --- the compiled generate --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """Static (compile-time) part of a generate call."""

    n: int
    max_new: int
    temperature: float
    top_k: int
    top_p: float
    pad_id: int


def stop_matrix(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """[S, Lmax] right-aligned stop sequences; -1 marks a wildcard (left padding). [0, 1] when there are none."""
    lmax = max((len(s) for s in stop_sequences), default=1)
    m = np.full((len(stop_sequences), lmax), -1, np.int32)
    for i, s in enumerate(stop_sequences):
        m[i, lmax - len(s):] = s
    return m


def decode_layer_params(model: Transformer) -> tuple[dict[str, jax.Array], ...] | None:
    """Each layer's weights taken once before a decode loop (`layers.per_layer()`), or None to slice them per step.

    On one device (or tensor/data-parallel meshes) slicing the stacked weights inside the loop copies every
    weight on every step, so they are sliced once. With the weights fsdp-sharded, slices taken before the loop
    could be all-gathered there and held for the whole call (every layer's full weights at once), so those are
    gathered layer by layer inside the step, FSDP's usual trade of bandwidth for memory."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and mesh.shape.get("fsdp", 1) > 1:
        return None
    return model.layers.per_layer()


def prefill(model: Transformer, tokens: jax.Array, mask: jax.Array, cache_dtype: Any,
            layer_params: tuple[dict[str, jax.Array], ...]) -> tuple[jax.Array, KVCache, jax.Array]:
    """Run B left-padded prompts [B, P] once: (last-position logits [B, V], their [B, K, P, D] cache, lengths [B])."""
    cfg = model.config
    b, p = tokens.shape
    seg = constrain(mask.astype(jnp.int32), ROW_AXES)
    tokens = constrain(tokens, ROW_AXES)
    small = KVCache.init(cfg, b, p, cache_dtype)
    small = small.replace(k=tuple(constrain(a, CACHE_AXES) for a in small.k),
                          v=tuple(constrain(a, CACHE_AXES) for a in small.v))
    logits, small = model(tokens, positions_from_mask(seg), seg, small, last_only=True, layer_params=layer_params)
    return logits[:, -1, :], small, seg.sum(axis=1).astype(jnp.int32)  # left padded: last slot = last token


def select_tokens(logits: jax.Array, keys: jax.Array, step: jax.Array, spec: Any) -> tuple[jax.Array, jax.Array]:
    """Sample each row's token at its step (scalar or [R]) with key `fold_in(row_key, step)`."""
    steps = jnp.broadcast_to(step, keys.shape)
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
    return sample_from_logits(logits, step_keys, spec.temperature, spec.top_k, spec.top_p)


def record_tokens(carry: dict, tok: jax.Array, lp: jax.Array, step: jax.Array, eos: jax.Array, stop_m: jax.Array,
                  pad_id: int) -> dict:
    """Write the sampled tokens of the live rows at `step` (a scalar shared by all rows, or [R] per row), check
    EOS ids and stop sequences (on the tail of each row's generated tokens), and advance the step."""
    live = ~carry["done"]
    tok = jnp.where(live, tok, pad_id)
    lp = jnp.where(live, lp, 0.0)
    tail = jnp.concatenate([carry["tail"][:, 1:], tok[:, None]], axis=1)
    hit_seq = jnp.all((tail[:, None, :] == stop_m[None]) | (stop_m[None] < 0), axis=-1)
    stopped = jnp.any(tok[:, None] == eos[None, :], axis=-1) | jnp.any(hit_seq, axis=-1)
    if jnp.ndim(step) == 0:
        tokens = jax.lax.dynamic_update_slice(carry["tokens"], tok[:, None], (0, step))
        logprobs = jax.lax.dynamic_update_slice(carry["logprobs"], lp[:, None], (0, step))
    else:  # rows at different steps (continuous batching); finished rows keep their last entry
        rows = jnp.arange(tok.shape[0])
        at = jnp.minimum(step, carry["tokens"].shape[1] - 1)
        tokens = carry["tokens"].at[rows, at].set(jnp.where(live, tok, carry["tokens"][rows, at]))
        logprobs = carry["logprobs"].at[rows, at].set(jnp.where(live, lp, carry["logprobs"][rows, at]))
    return dict(carry, step=jnp.where(live, step + 1, step) if jnp.ndim(step) else step + 1, tok=tok, tail=tail,
                tokens=tokens, logprobs=logprobs, lengths=jnp.where(live, step + 1, carry["lengths"]),
                done=carry["done"] | (live & stopped))


def _generate_impl(graphdef, state, cache: KVCache, tokens: jax.Array, mask: jax.Array, active: jax.Array,
                   key_data: jax.Array, eos: jax.Array, stop_m: jax.Array,
                   spec: SampleSpec) -> tuple[GenerateOutput, KVCache]:
    model = nnx.merge(graphdef, state)
    b, p = tokens.shape
    n, max_new = spec.n, spec.max_new
    rows = b * n
    keys = jax.random.wrap_key_data(key_data)

    # 1. prefill the B prompts once.
    layer_params = decode_layer_params(model)  # once per call, outside the decode loop
    last, small, lens = prefill(model, tokens, mask, cache.k[0].dtype, layer_params)

    # 2. the n samples of each prompt share its prompt keys/values as the cache's read-only prefix; the donated
    # decode cache holds only each row's generated tokens.
    rep = (lambda x, axis: x) if n == 1 else (lambda x, axis: jnp.repeat(x, n, axis=axis))
    cache = KVCache(k=cache.k, v=cache.v, valid=constrain(jnp.zeros((rows, cache.max_len), bool), VALID_AXES),
                    index=jnp.zeros((rows,), jnp.int32), prefix_k=small.k, prefix_v=small.v,
                    prefix_valid=small.valid)
    last = constrain(rep(last, 0), ("batch", "vocab"))
    prompt_len = rep(lens, 0)
    record = functools.partial(record_tokens, eos=eos, stop_m=stop_m, pad_id=spec.pad_id)

    carry = dict(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        tok=jnp.full((rows,), spec.pad_id, jnp.int32),
        # -1 never equals a token id, so a stop sequence can only match generated tokens.
        # eos [E] and stop_m [S, Lmax] are data: changing them does not recompile.
        tail=jnp.full((rows, stop_m.shape[1]), -1, jnp.int32),
        tokens=constrain(jnp.full((rows, max_new), spec.pad_id, jnp.int32), ROW_AXES),
        logprobs=constrain(jnp.zeros((rows, max_new), jnp.float32), ROW_AXES),
        lengths=jnp.zeros((rows,), jnp.int32),
        done=~rep(active, 0),
    )
    tok, lp = select_tokens(last, keys, carry["step"], spec)
    carry = record(carry, tok, lp, carry["step"])

    def cond(c: dict) -> jax.Array:
        return (c["step"] < max_new) & ~jnp.all(c["done"])

    def body(c: dict) -> dict:
        step = c["step"]
        pos = (prompt_len + step - 1)[:, None]
        logits, new_cache = model(c["tok"][:, None], pos, jnp.ones((rows, 1), jnp.int32), c["cache"],
                                  layer_params=layer_params)
        tok, lp = select_tokens(logits[:, 0, :], keys, step, spec)
        return record(dict(c, cache=new_cache), tok, lp, step)

    carry = jax.lax.while_loop(cond, body, carry)
    out = GenerateOutput(tokens=carry["tokens"], logprobs=carry["logprobs"], lengths=carry["lengths"],
                         done=carry["done"] & rep(active, 0))
    return out, carry["cache"].replace(prefix_k=None, prefix_v=None, prefix_valid=None)


generate_jit = jax.jit(_generate_impl, static_argnames=("graphdef", "spec"), donate_argnames=("cache",))


def _model_mesh(state: Any) -> jax.sharding.Mesh | None:
    for leaf in jax.tree.leaves(state):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            return sh.mesh
    return None


def put_sharded(x: Any, logical: Sequence[str | None], mesh: jax.sharding.Mesh | None) -> jax.Array:
    x = jnp.asarray(x)
    if mesh is None:
        return x
    spec = logical_to_spec(logical, x.shape, mesh)
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


class Sampler:
    """Generates from a live nnx `Transformer` (the trainer's object: its current parameters are used each call).

    Keeps the decode KV cache between calls of the same shape (it is donated to the compiled generate and handed
    back), so repeated calls neither reallocate it nor recompile. `release()` frees it (e.g. before a train step).
    """

    def __init__(self, model: Transformer, mesh: jax.sharding.Mesh | None = None, *, keep_cache: bool = True):
        self.model = model
        self.mesh = mesh
        self.keep_cache = keep_cache
        self._caches: dict[tuple[int, int], KVCache] = {}

    def release(self) -> None:
        self._caches.clear()

    def _mesh(self, state: Any) -> jax.sharding.Mesh | None:
        # The model's own mesh (even a 1-device one): the decode cache handed back by one call must carry the same
        # sharding as the one the next call passes in, or the program would be recompiled.
        return self.mesh if self.mesh is not None else _model_mesh(state)

    def batch_shards(self) -> int:
        """How many ways sample rows are split (data * fsdp of the mesh); batches are padded to a multiple."""
        mesh = self._mesh(nnx.state(self.model))
        return 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)

    def _cache(self, rows: int, max_len: int, mesh: jax.sharding.Mesh | None) -> KVCache:
        cache = self._caches.pop((rows, max_len), None)
        if cache is not None:
            return cache
        cfg = self.model.config
        make = functools.partial(KVCache.init, cfg, rows, max_len, cfg.dtype)
        if mesh is None:
            return jax.jit(make)()
        return jax.jit(make, out_shardings=KVCache.shardings(cfg, rows, max_len, mesh))()

    def generate(self, prompt_tokens: Any, prompt_mask: Any, key: Any, params: SamplingParams, *, n: int = 1,
                 eos_ids: Sequence[int] = (), stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0,
                 keys: Any = None, active: Any = None) -> GenerateOutput:
        """Sample `n` completions for each of B left-padded prompts.

        prompt_tokens, prompt_mask: [B, P] (mask 1 = real token; prompts must be left-padded: the last column is
        every prompt's last token). key: a jax key (typed or raw uint32) or an int seed; row keys are
        `sample_keys(key, range(B), n)` unless `keys` ([B*n] typed or raw keys) is given. active: optional [B]
        bool; inactive prompts (batch padding) are done from the start and return length 0.
        Returns a GenerateOutput with B*n rows (row b*n + j = sample j of prompt b), as device arrays.
        """
        tokens = np.asarray(prompt_tokens, np.int32)
        mask = np.asarray(prompt_mask, np.int32)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(f"prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must both be [B, P]")
        b, p = tokens.shape
        if n < 1:
            raise ValueError(f"n: must be >= 1 (got {n})")
        if b and not np.all(mask[:, -1] | (mask.sum(axis=1) == 0)):
            raise ValueError("prompts must be left-padded: prompt_mask[:, -1] must be 1 for every non-empty prompt")
        rows = b * n
        if keys is None:
            keys = sample_keys(key, np.arange(b), n)
        keys = as_typed_key(keys)
        if keys.shape != (rows,):
            raise ValueError(f"keys: expected {rows} row keys (B*n), got shape {keys.shape}")
        active = np.ones((b,), bool) if active is None else np.asarray(active, bool)
        stops = tuple(dict.fromkeys(tuple(int(t) for t in s) for s in (*params.stop_sequences, *stop_sequences)))
        if any(len(s) == 0 for s in stops):
            raise ValueError("stop_sequences: stop sequences must not be empty")
        eos = np.asarray(list(dict.fromkeys(int(e) for e in eos_ids)), np.int32).reshape(-1)
        spec = SampleSpec(n=int(n), max_new=int(params.max_new_tokens), temperature=float(params.temperature),
                     top_k=int(params.top_k), top_p=float(params.top_p), pad_id=int(pad_id))
        graphdef, state = nnx.split(self.model)
        mesh = self._mesh(state)
        cache = self._cache(rows, spec.max_new, mesh)
        args = (put_sharded(tokens, ROW_AXES, mesh), put_sharded(mask, ROW_AXES, mesh),
                put_sharded(active, ("batch",), mesh), put_sharded(jax.random.key_data(keys), ROW_AXES, mesh),
                put_sharded(eos, (None,), mesh),
                put_sharded(stop_matrix(stops), (None, None), mesh))
        if mesh is None:
            out, cache = generate_jit(graphdef, state, cache, *args, spec=spec)
        else:
            with jax.set_mesh(mesh):
                out, cache = generate_jit(graphdef, state, cache, *args, spec=spec)
        if self.keep_cache:
            self._caches[(rows, spec.max_new)] = cache
        return out


def generate(model: Transformer, prompt_tokens: Any, prompt_mask: Any, key: Any, params: SamplingParams, *,
             n: int = 1, eos_ids: Sequence[int] = (), stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0,
             keys: Any = None, mesh: jax.sharding.Mesh | None = None) -> GenerateOutput:
    """One-shot `Sampler(model, mesh).generate(...)` (allocates the decode cache for this call only)."""
    return Sampler(model, mesh, keep_cache=False).generate(
        prompt_tokens, prompt_mask, key, params, n=n, eos_ids=eos_ids, stop_sequences=stop_sequences,
        pad_id=pad_id, keys=keys)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) [len(prompts), length], each prompt right-aligned (left padding)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, ids in enumerate(prompts):
        if len(ids) > length:
            raise ValueError(f"prompt {i}: {len(ids)} tokens exceed the padded length {length}")
        if len(ids):
            tokens[i, length - len(ids):] = ids
            mask[i, length - len(ids):] = 1
    return tokens, mask


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): the bucket sizes that keep compiled shapes few."""
    return 1 << max(0, int(x) - 1).bit_length()


def bucket_length(length: int, max_len: int, minimum: int = 16) -> int:
    """Padded prompt length: the next power of two >= length (at least `minimum`), capped at max_len."""
    if length > max_len:
        raise ValueError(f"prompt of {length} tokens exceeds sampling.max_prompt_len={max_len}")
    return min(max(minimum, next_pow2(length)), max_len)
