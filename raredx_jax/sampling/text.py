"""Text-level generation: chat messages in, decoded completions out (used by RERS, GRPO, evaluation, diagnose).

Prompts are encoded with `tokenizer.encode_chat(messages, add_generation_prompt=True)` and left-padded to a
bucketed length (powers of two, capped at `params.max_prompt_len`), so a whole dataset compiles only a handful
of programs. With `params.continuous` (the default) `params.batch_size` prompts decode at once and a prompt's
slots are refilled with the next prompt as soon as its n samples stop (`continuous.py`); otherwise prompts are
sorted by length and chunked into static batches of `params.batch_size`. Sample j of prompt i uses the key
`fold_in(fold_in(key(seed), i), j)` (`sampler.sample_keys`), so results do not depend on the path, the
chunking, the sort or the batch size.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from raredx_jax.sampling.continuous import generate_continuous
from raredx_jax.sampling.sampler import Sampler, SamplingParams, bucket_length, left_pad, next_pow2, sample_keys


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled completion.

    token_ids / logprobs: every generated token, the stop token included (GRPO trains on it); logprobs are
    `log_softmax(logits / temperature)` of each token (see `sampler`). text: decoded token_ids without a final
    EOS / stop id (a matched stop *string* stays in the text). finish_reason: "stop" (EOS id or stop sequence)
    or "length" (max_new_tokens reached).
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str


def _to_host(x: jax.Array) -> np.ndarray:
    """A global array on every host (rows are sharded across hosts on a multi-host mesh)."""
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _batch_rows(count: int, batch_size: int, divisor: int) -> int:
    """Rows a chunk of `count` prompts is padded to: the full batch_size for full chunks, else the next power of
    two (so the last, partial chunk reuses few shapes), always a multiple of the mesh's batch shards."""
    rows = batch_size if count == batch_size else min(batch_size, next_pow2(count))
    return -(-rows // divisor) * divisor


def context_length(model: Any) -> int:
    """Tokens the model's context holds (prompt + generation): its config's `max_position_embeddings`."""
    return int(model.config.max_position_embeddings)


def prompt_budget(model: Any, prompt_tokens: int, max_new_tokens: int, min_new_tokens: int = 64) -> tuple[int, int]:
    """(max_prompt_len, max_new_tokens) for one prompt of `prompt_tokens` tokens within the model's context.

    The prompt may use everything the context leaves after `max_new_tokens`; a prompt longer than that keeps its
    length and the generation budget shrinks to what is left, down to `min(min_new_tokens, max_new_tokens)`.
    ValueError (one line, with the numbers and the fix) only when the prompt cannot fit the model at all.
    """
    context = context_length(model)
    want = max(1, int(max_new_tokens))
    floor = max(1, min(int(min_new_tokens), want))
    if prompt_tokens + floor > context:
        raise ValueError(f"the prompt is {prompt_tokens} tokens; the model's context holds {context} tokens, which "
                         f"leaves no room for the {floor} generated tokens an answer needs: shorten the note to "
                         f"about {max(0, context - floor)} tokens")
    new = min(want, context - prompt_tokens)
    return context - new, new


def _completion(tokenizer: Any, token_ids: Sequence[int], logprobs: Sequence[float], stopped: bool,
                eos_ids: Sequence[int]) -> Completion:
    t = [int(x) for x in token_ids]
    text_ids = t[:-1] if t and t[-1] in eos_ids else t
    return Completion(text=tokenizer.decode(text_ids), token_ids=tuple(t),
                      logprobs=tuple(float(x) for x in logprobs), finish_reason="stop" if stopped else "length")


def _generate_text_continuous(sampler: Sampler, tokenizer: Any, prompts: list[list[int]], key: jax.Array, n: int,
                              params: SamplingParams, eos_ids: tuple[int, ...], stop_seqs: tuple[tuple[int, ...], ...],
                              progress: bool, desc: str) -> list[list[Completion]]:
    """generate_text over continuously batched slots: `params.batch_size` prompts decode at a time."""
    bar = None
    if progress:
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    try:
        rows = generate_continuous(sampler, prompts, sample_keys(key, np.arange(len(prompts)), n), params, n=n,
                                   groups=params.batch_size, eos_ids=eos_ids, stop_sequences=stop_seqs,
                                   pad_id=tokenizer.pad_id, on_done=(lambda i, r: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    return [[_completion(tokenizer, r.tokens, r.logprobs, r.stopped, eos_ids) for r in per] for per in rows]


def generate_text(model: Any, tokenizer: Any, messages_list: Sequence[list[dict]], n: int = 1,
                  params: SamplingParams | None = None, seed: int | jax.Array = 0,
                  mesh: jax.sharding.Mesh | None = None, *, progress: bool = False, desc: str = "generate",
                  sampler: Sampler | None = None) -> list[list[Completion]]:
    """Sample `n` completions per chat prompt; returns one list of n Completions per prompt, in input order.

    model: the nnx Transformer (or pass a reusable `sampler=`, which keeps its KV cache between calls).
    params: SamplingParams (e.g. `SamplingParams.from_config(config.sampling)`); its `stop` strings are encoded
    with the tokenizer and stop generation like EOS, as do `tokenizer.stop_ids`. seed: int or jax key.
    A prompt longer than `params.max_prompt_len` tokens raises ValueError naming its index.
    """
    params = params or SamplingParams()
    sampler = sampler or Sampler(model, mesh)
    prompts = [list(tokenizer.encode_chat(m, add_generation_prompt=True)) for m in messages_list]
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i}: encodes to no tokens")
        if len(ids) > params.max_prompt_len:
            raise ValueError(f"prompt {i}: {len(ids)} tokens exceed sampling.max_prompt_len="
                             f"{params.max_prompt_len}")
    eos_ids = tuple(tokenizer.stop_ids) or (int(tokenizer.eos_id),)
    stop_seqs = tuple(tuple(tokenizer.encode(s)) for s in params.stop)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    divisor = sampler.batch_shards()
    if params.continuous and len(prompts) > 1:
        return _generate_text_continuous(sampler, tokenizer, prompts, key, n, params, eos_ids, stop_seqs, progress,
                                         desc)

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[Completion] | None] = [None] * len(prompts)
    bar = None
    if progress:
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    try:
        for start in range(0, len(order), params.batch_size):
            idx = order[start:start + params.batch_size]
            rows = _batch_rows(len(idx), params.batch_size, divisor)
            length = bucket_length(max(len(prompts[i]) for i in idx), params.max_prompt_len)
            chunk = [prompts[i] for i in idx] + [[]] * (rows - len(idx))
            tokens, mask = left_pad(chunk, length, tokenizer.pad_id)
            ids = np.asarray(idx + [len(prompts) + k for k in range(rows - len(idx))])  # pad rows: unused ids
            active = np.arange(rows) < len(idx)
            out = sampler.generate(tokens, mask, None, params, n=n, eos_ids=eos_ids, stop_sequences=stop_seqs,
                                   pad_id=tokenizer.pad_id, keys=sample_keys(key, ids, n), active=active)
            toks, lps, lens, done = (_to_host(x) for x in (out.tokens, out.logprobs, out.lengths, out.done))
            for r, i in enumerate(idx):
                rows = [r * n + j for j in range(n)]
                results[i] = [_completion(tokenizer, toks[row, :lens[row]], lps[row, :lens[row]], bool(done[row]),
                                          eos_ids) for row in rows]
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return results  # type: ignore[return-value]
