"""GRPO rollouts: P prompts x G samples from the current policy -> one padded training batch (host arrays).

Layout of a rollout batch (N = P * G rows; row ``i * G + j`` is sample j of prompt i, so each prompt's G samples
are contiguous as the advantage estimators expect)::

    column:   0 ............ Lp-1 | Lp ............... Lp+C-1
    tokens:   [pad.. prompt ids  ] | [completion ids, pad ...]      Lp = bucketed prompt length, C = max_new_tokens
    segment:  [0 ..  1 1 1 1 1 1 ] | [1 1 1 1 1 1 1 , 0 ...   ]
    mask:                            [1 1 1 1 1 1 1 , 0 ...   ]      [N, C]: 1 on generated tokens (stop token incl.)
    old_lp:                          [sampler logprob of each ]      [N, C]: log_softmax(logits / T)[token]

Prompts are left-padded exactly as the sampler saw them, so a completion always starts at column ``Lp`` and
the sampler's ``[N, C]`` outputs line up with ``logits[:, Lp-1 : Lp+C-1]`` of one teacher-forced forward over
``tokens`` (positions restart at 0 on the first real token; padding has segment id 0 and is never attended to).

Generation uses the sampler's core API (``Sampler.generate``) on the live nnx model: chunks of
``params.batch_size`` prompts (the last one padded with inactive rows, so one compiled program serves every
chunk), each prompt's G samples sharing one prefill. Row keys are ``sample_keys(key, prompt index, G)``, so a
rollout depends only on (key, prompts, parameters), never on the chunking.

Also here: the diagnosis-specific pieces of a GRPO step -- the prompt of a curriculum lesson (closed-set with
seeded distractors from the run's disease subset, or open-domain) and the adapter from
:class:`~raredx_jax.rewards.combined.RewardFn` to the learner's reward interface.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from raredx_jax.data.prompts import closed_set_messages, diagnosis_messages
from raredx_jax.sampling.sampler import Sampler, SamplingParams, bucket_length, left_pad, sample_keys

# ---------------------------------------------------------------------------------------------------------------
# what a reward function sees / returns
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutSamples:
    """The decoded samples of one rollout, as a reward function receives them.

    payloads: one per prompt (e.g. the ``Case``); texts / token_ids / lengths / truncated: one per sample
    (N = P * G, sample j of prompt i at ``i * G + j``). text excludes a final EOS; token_ids include it.
    """

    payloads: Sequence[Any]
    texts: list[str]
    token_ids: list[list[int]]
    lengths: np.ndarray  # [N] int32 generated tokens (stop token included)
    truncated: np.ndarray  # [N] bool: hit max_new_tokens without stopping
    group_size: int

    def payload_of(self, row: int) -> Any:
        return self.payloads[row // self.group_size]


#: ``reward_fn(samples) -> {"total": [N] float32, <component>: [N], ...}``; "total" is what the advantages use.
RewardFunction = Callable[[RolloutSamples], dict[str, np.ndarray]]


@dataclasses.dataclass
class RolloutBatch:
    """One step's rollout as host arrays (see the module docstring for the layout)."""

    tokens: np.ndarray  # [N, Lp + C] int32
    positions: np.ndarray  # [N, Lp + C] int32
    segment_ids: np.ndarray  # [N, Lp + C] int32
    mask: np.ndarray  # [N, C] float32
    old_logprobs: np.ndarray  # [N, C] float32 (the sampler's)
    rewards: dict[str, np.ndarray]  # each [N] float32
    advantages: np.ndarray  # [N] float32
    samples: RolloutSamples
    prompt_len: int  # Lp: the completion starts at this column
    group_size: int

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def completion_len(self) -> int:
        return int(self.mask.shape[1])

    def train_arrays(self, rows: np.ndarray, pad_to: int) -> dict[str, np.ndarray]:
        """The training arrays of ``rows`` (indices), padded with empty rows (mask 0, advantage 0) to ``pad_to``."""
        rows = np.asarray(rows, np.int64)
        if rows.size > pad_to:
            raise ValueError(f"{rows.size} rows do not fit a mini-batch of {pad_to}")
        out = {
            "tokens": self.tokens[rows], "positions": self.positions[rows], "segment_ids": self.segment_ids[rows],
            "mask": self.mask[rows], "old_logprobs": self.old_logprobs[rows], "advantages": self.advantages[rows],
        }
        extra = pad_to - rows.size
        if extra:
            out = {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in out.items()}
        return out


# ---------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host sharded) device array as a full host numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def encode_prompts(tokenizer: Any, messages_list: Sequence[list[dict]], max_prompt_len: int) -> list[list[int]]:
    """Chat-template token ids of each prompt; ValueError naming the prompt and ``sampling.max_prompt_len``."""
    out = []
    for i, m in enumerate(messages_list):
        ids = list(tokenizer.encode_chat(m, add_generation_prompt=True))
        if not ids:
            raise ValueError(f"prompt {i}: encodes to no tokens")
        if len(ids) > max_prompt_len:
            raise ValueError(f"prompt {i}: {len(ids)} tokens exceed sampling.max_prompt_len={max_prompt_len}")
        out.append(ids)
    return out


@dataclasses.dataclass
class Generated:
    """Raw generation result (host arrays): left-padded prompts and G completions per prompt."""

    prompt_tokens: np.ndarray  # [P, Lp]
    prompt_mask: np.ndarray  # [P, Lp]
    tokens: np.ndarray  # [P*G, C] (pad after the end)
    logprobs: np.ndarray  # [P*G, C]
    lengths: np.ndarray  # [P*G]
    done: np.ndarray  # [P*G] bool: stopped on EOS / stop sequence


def generate_groups(sampler: Sampler, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], group_size: int,
                    params: SamplingParams, key: jax.Array, *, pad_to_max: bool = False) -> Generated:
    """``group_size`` samples for each prompt from the sampler's live model (chunked; one prefill per prompt).

    Prompts are left-padded to ``params.max_prompt_len`` when ``pad_to_max`` (one compiled shape for a whole
    run), else to the power-of-two bucket of the longest (``sampler.bucket_length``).
    """
    p = len(prompt_ids)
    if p == 0:
        raise ValueError("generate_groups: no prompts")
    longest = max(len(x) for x in prompt_ids)
    lp = bucket_length(longest, params.max_prompt_len)
    if pad_to_max:
        lp = int(params.max_prompt_len)
    chunk = max(1, min(int(params.batch_size), p))
    eos_ids = tuple(int(t) for t in (getattr(tokenizer, "stop_ids", ()) or (tokenizer.eos_id,)))
    stop_seqs = tuple(tuple(tokenizer.encode(s)) for s in params.stop)
    prompt_tokens, prompt_mask = left_pad(prompt_ids, lp, tokenizer.pad_id)
    outs = []
    for start in range(0, p, chunk):
        idx = np.arange(start, min(start + chunk, p))
        n_pad = chunk - idx.size
        toks, msk = prompt_tokens[idx], prompt_mask[idx]
        if n_pad:
            toks = np.concatenate([toks, np.full((n_pad, lp), tokenizer.pad_id, np.int32)])
            msk = np.concatenate([msk, np.zeros((n_pad, lp), np.int32)])
        ids = np.concatenate([idx, p + np.arange(n_pad)])  # padding rows: unused prompt ids
        active = np.arange(chunk) < idx.size
        out = sampler.generate(toks, msk, None, params, n=group_size, eos_ids=eos_ids, stop_sequences=stop_seqs,
                               pad_id=tokenizer.pad_id, keys=sample_keys(key, ids, group_size), active=active)
        keep = idx.size * group_size
        outs.append(tuple(to_host(a)[:keep] for a in (out.tokens, out.logprobs, out.lengths, out.done)))
    tokens, logprobs, lengths, done = (np.concatenate([o[i] for o in outs]) for i in range(4))
    return Generated(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=tokens.astype(np.int32),
                     logprobs=logprobs.astype(np.float32), lengths=lengths.astype(np.int32), done=done.astype(bool))


def decode_samples(tokenizer: Any, gen: Generated, payloads: Sequence[Any], group_size: int) -> RolloutSamples:
    eos = set(int(t) for t in (getattr(tokenizer, "stop_ids", ()) or (tokenizer.eos_id,)))
    texts, ids = [], []
    for r in range(gen.tokens.shape[0]):
        t = [int(x) for x in gen.tokens[r, :gen.lengths[r]]]
        ids.append(t)
        texts.append(tokenizer.decode(t[:-1] if t and t[-1] in eos else t))
    return RolloutSamples(payloads=list(payloads), texts=texts, token_ids=ids, lengths=gen.lengths.copy(),
                          truncated=~gen.done, group_size=group_size)


def training_layout(gen: Generated, group_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """tokens / positions / segment_ids [N, Lp + C] and mask [N, C] (see the module docstring)."""
    c = gen.tokens.shape[1]
    mask = (np.arange(c)[None, :] < gen.lengths[:, None]).astype(np.int32)
    tokens = np.concatenate([np.repeat(gen.prompt_tokens, group_size, axis=0),
                             np.where(mask > 0, gen.tokens, pad_id)], axis=1).astype(np.int32)
    seg = np.concatenate([np.repeat(gen.prompt_mask, group_size, axis=0), mask], axis=1).astype(np.int32)
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)  # = models.positions_from_mask
    return {"tokens": tokens, "positions": positions, "segment_ids": seg, "mask": mask.astype(np.float32)}


def rollout(sampler: Sampler, tokenizer: Any, messages_list: Sequence[list[dict]], payloads: Sequence[Any],
            group_size: int, params: SamplingParams, key: jax.Array, reward_fn: RewardFunction,
            advantage_fn: Callable[[np.ndarray, int], np.ndarray], *, pad_to_max: bool = False) -> RolloutBatch:
    """Sample, score and lay out one GRPO step: P prompts x G samples -> :class:`RolloutBatch`."""
    if len(messages_list) != len(payloads):
        raise ValueError(f"{len(messages_list)} prompts but {len(payloads)} payloads")
    prompt_ids = encode_prompts(tokenizer, messages_list, params.max_prompt_len)
    gen = generate_groups(sampler, tokenizer, prompt_ids, group_size, params, key, pad_to_max=pad_to_max)
    samples = decode_samples(tokenizer, gen, payloads, group_size)
    rewards = reward_fn(samples)
    if "total" not in rewards:
        raise ValueError(f"reward function returned {sorted(rewards)}: it must include 'total'")
    n = gen.tokens.shape[0]
    rewards = {k: np.asarray(v, np.float32).reshape(-1) for k, v in rewards.items()}
    for k, v in rewards.items():
        if v.shape != (n,):
            raise ValueError(f"reward {k!r} has {v.shape[0]} values for {n} samples")
    adv = np.asarray(advantage_fn(rewards["total"], group_size), np.float32).reshape(-1)
    lay = training_layout(gen, group_size, tokenizer.pad_id)
    return RolloutBatch(tokens=lay["tokens"], positions=lay["positions"], segment_ids=lay["segment_ids"],
                        mask=lay["mask"], old_logprobs=np.where(lay["mask"] > 0, gen.logprobs, 0.0).astype(np.float32),
                        rewards=rewards, advantages=adv, samples=samples, prompt_len=int(gen.prompt_tokens.shape[1]),
                        group_size=group_size)


# ---------------------------------------------------------------------------------------------------------------
# the diagnosis task: curriculum lessons -> prompts, RewardFn -> reward interface
# ---------------------------------------------------------------------------------------------------------------


def closed_set_candidates(case: Any, diseases: Sequence[tuple[str, str]], n: int,
                          rng: np.random.Generator) -> list[str]:
    """Gold name + (n - 1) distractor names drawn from ``diseases`` ((id, name) of the run's subset), shuffled.

    Distractors never share an id or a name with the gold.
    """
    gold_ids = set(case.diagnosis)
    gold_name = case.diagnosis_name or next((nm for i, nm in diseases if i in gold_ids), "")
    if not gold_name:
        raise ValueError(f"case {case.id!r}: no diagnosis_name and its gold id is not in the disease subset")
    pool = [nm for i, nm in diseases if i not in gold_ids and nm.strip().lower() != gold_name.strip().lower()]
    pool = list(dict.fromkeys(pool))
    k = max(0, min(int(n) - 1, len(pool)))
    picks = [pool[j] for j in rng.choice(len(pool), size=k, replace=False)] if k else []
    names = [gold_name] + picks
    return [names[j] for j in rng.permutation(len(names))]


@dataclasses.dataclass(frozen=True)
class LessonCase:
    """A training case as one lesson's prompt poses it: the reward reads ``max_answers`` (how many entries the
    prompt allows: the asked top-k for open prompts, every candidate but one for closed-set prompts, so copying
    the candidate list earns nothing); every other attribute is the wrapped Case's."""

    case: Any
    task: str
    max_answers: int

    def __getattr__(self, name: str) -> Any:
        if name == "case":  # not yet set (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.case, name)


def lesson_case(case: Any, lesson: str, *, n_candidates: int = 5, top_k: int = 5) -> LessonCase:
    """The reward payload of ``case`` under lesson ``"<task>:<level>"`` (see :class:`LessonCase`)."""
    task = lesson.partition(":")[0]
    return LessonCase(case, task, max(1, int(n_candidates) - 1) if task == "closed_set" else int(top_k))


def lesson_messages(case: Any, lesson: str, diseases: Sequence[tuple[str, str]], rng: np.random.Generator, *,
                    n_candidates: int = 5, top_k: int = 5) -> list[dict]:
    """The chat prompt of ``case`` under curriculum lesson ``"<task>:<level>"`` (task closed_set | open)."""

    task = lesson.partition(":")[0]
    if task == "closed_set":
        return closed_set_messages(case.text, closed_set_candidates(case, diseases, n_candidates, rng))
    if task == "open":
        return diagnosis_messages(case.text, top_k=top_k)
    raise ValueError(f"lesson {lesson!r}: unknown task {task!r} (closed_set | open)")


def diagnosis_reward(reward: Any) -> RewardFunction:
    """Adapter: :class:`~raredx_jax.rewards.combined.RewardFn` (payloads = Cases) -> the learner's interface.

    Lengths are the completion lengths in tokens; truncated = the sample hit max_new_tokens.
    """

    def fn(samples: RolloutSamples) -> dict[str, np.ndarray]:
        return reward(samples.texts, list(samples.payloads), lengths=[int(x) for x in samples.lengths],
                      truncated=[bool(x) for x in samples.truncated])

    return fn


__all__ = [
    "RolloutSamples", "RewardFunction", "RolloutBatch", "LessonCase", "lesson_case", "Generated", "to_host",
    "encode_prompts", "generate_groups", "decode_samples", "training_layout", "rollout", "closed_set_candidates",
    "lesson_messages", "diagnosis_reward",
]
