"""RERS (stage 2 of RareDxR1): sample verified diagnostic trajectories from the knowledge-SFT model,
reflect on the failures with the gold LABEL only, keep the repaired trajectories re-attached to the original
prompt. `python -m raredx_jax.train --config=configs/rers.py` (see raredx_jax/training/rers.py).

Reads the simulated `rers.split` cases of `data.dir` (built by knowledge SFT / `raredx_jax.data.build`) and
the checkpoint `model.init_from`; writes `<run_dir>/journal/` (resumable per-shard journals),
`<run_dir>/trajectories/` (TFDS `raredx_rers_trajectories`, splits train + validation: what
configs/rers_sft.py trains on via `train.data_dir`) and `<run_dir>/summary.json`.
Shard over separately launched processes with `--config.rers.shard_index=I --config.rers.shard_count=N`, then
`--config.rers.phase=merge`; under jax.distributed the processes shard and merge by themselves.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.base import make_config  # noqa: E402


def _stage(c):
    c.stage = "rers"
    c.run_dir = "runs/rers"
    c.model.init_from = "runs/knowledge_sft"  # run dir / checkpoint dir / step dir of the knowledge-SFT stage
    # Sampling (sampling.max_prompt_len from base): the knowledge corpus's worked exemplars, the format the
    # model learned, are up to ~200 tokens, so completions get 256.
    s = c.sampling
    # T=0.7: at 1.0 the tiny policy's kept trajectories often reason towards one disease and answer another
    s.temperature = 0.7
    s.top_k = 0
    s.top_p = 1.0
    s.max_new_tokens = 256
    s.batch_size = 32  # prompts per compiled generate call (x num_samples rows)
    r = c.rers
    r.num_samples = 4  # direct-round samples per case
    r.reflection_tries = 4  # reflection-round samples per unsolved case (0 = no reflection round)
    r.keep_rule = "shortest"  # shortest (fewest tokens, ties -> lowest try) | first (lowest try index)
    r.answer_top_k = 5  # differential size asked for in the diagnosis prompt
    r.split = "train"  # raredx_simulated_cases split sampled
    r.max_cases = 0  # 0 = every case of the split (sorted by id), else the first max_cases
    r.chunk_size = 32  # cases per journal commit (the unit of resume and of sharding)
    r.validation_fraction = 0.05  # kept trajectories held out by case-id hash -> split "validation"
    r.reflection_max_prompt_len = 0  # 0 = sampling.max_prompt_len + max_new_tokens + 256
    r.out_dir = ""  # TFDS data_dir of the trajectories; "" = <run_dir>/trajectories
    r.sampler = ""  # "" = the policy (model.init_from); "module:function" = factory(config) -> sample_fn
    r.phase = "all"  # all (sample this shard, then shard 0 merges) | sample | merge
    r.shard_index = -1  # with shard_count > 0: this process's shard (separately launched processes)
    r.shard_count = 0  # 0 = shard over the JAX processes


def get_config(hardware=None):
    return make_config(hardware, _stage)
