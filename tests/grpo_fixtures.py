"""A synthetic GRPO rollout shared by the GRPO tests and the multi-process workers (no side effects on import)."""
from __future__ import annotations


def synthetic_rollout(p: int = 3, g: int = 4, lp: int = 8, c: int = 16, seed: int = 0, vocab: int = 16,
                      logprob_range: tuple[float, float] = (1.5, 3.5)):
    """A fixed GRPO rollout batch with ragged prompts / completions and sampler logprobs far enough from the
    policy's that the importance ratio clips, laid out exactly as `training.rollout` lays out a sampled one."""
    import numpy as np

    from raredx_jax.training.rl_objectives import grpo_advantages
    from raredx_jax.training.rollout import Generated, RolloutBatch, RolloutSamples, training_layout

    rng = np.random.default_rng(seed)
    n = p * g
    ptok, pmask = np.zeros((p, lp), np.int32), np.zeros((p, lp), np.int32)
    for i, k in enumerate(rng.integers(3, lp + 1, size=p)):
        ptok[i, lp - k:] = rng.integers(2, vocab, size=k)
        pmask[i, lp - k:] = 1
    lengths = rng.integers(1, c + 1, size=n).astype(np.int32)
    mask = np.arange(c)[None] < lengths[:, None]
    gen = Generated(prompt_tokens=ptok, prompt_mask=pmask, tokens=np.where(mask, rng.integers(2, vocab, (n, c)), 0),
                    logprobs=-rng.uniform(*logprob_range, (n, c)).astype(np.float32), lengths=lengths,
                    done=lengths < c)
    lay = training_layout(gen, g, 0)
    total = rng.normal(size=n).astype(np.float32)
    samples = RolloutSamples(payloads=list(range(p)), texts=[""] * n, token_ids=[[]] * n, lengths=lengths,
                             truncated=~gen.done, group_size=g)
    return RolloutBatch(tokens=lay["tokens"], positions=lay["positions"], segment_ids=lay["segment_ids"],
                        mask=lay["mask"], old_logprobs=np.where(mask, gen.logprobs, 0.0).astype(np.float32),
                        rewards={"total": total}, advantages=np.asarray(grpo_advantages(total, g)), samples=samples,
                        prompt_len=lp, group_size=g)
