"""The knowledge probe: does the model know the diseases it was taught, before any diagnosis training?

Closed choice on held-out phrasings (`data.knowledge.knowledge_probe`): for each item the model's log-likelihood
of every candidate disease name as the assistant's answer is computed (one teacher-forced forward pass, no
sampling); the item counts as correct when the gold name ranks first. Candidates: every disease of the trained
subset (or `probe.num_candidates` of them, gold included). Reports accuracy by the summed log-likelihood
(primary) and by the per-token mean, beside chance (mean 1 / #candidates). Run after knowledge SFT (and after
any SFT run with `probe.always`); its result is `<run_dir>/probe.json` and the summary's `probe`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from raredx_jax.data.build import run_diseases
from raredx_jax.data.knowledge import knowledge_probe
from raredx_jax.training.lm import BATCH_KEYS, batch_sharding, batch_shards, make_row_logprob, replicated_batch
from raredx_jax.training.sft_settings import ProbeSettings


def knowledge_probe_score(config: Any, settings: ProbeSettings, graphdef: nnx.GraphDef, params: Any,
                          param_shardings: Any, mesh: jax.sharding.Mesh, tokenizer: Any) -> dict[str, Any] | None:
    """The probe's scores (module docstring), or None when `settings.n` is 0."""
    n = settings.n
    if n <= 0:
        return None
    diseases, ontology = run_diseases(config)
    seed = settings.seed
    items = knowledge_probe(diseases, ontology, seed=seed, n=n)
    by_id = {d.id: d for d in diseases}
    k = settings.num_candidates or len(diseases)
    rng = np.random.default_rng(seed)
    rows, row_item, row_cand, golds, n_cands = [], [], [], [], []
    for i, item in enumerate(items):
        gold = by_id[item["answer_id"]]
        others = [d for d in diseases if d.id != gold.id]
        if k < len(diseases):
            others = [others[j] for j in rng.choice(len(others), size=k - 1, replace=False)]
        cands = [gold] + others
        golds.append(0)
        n_cands.append(len(cands))
        p_ids = tokenizer.encode_chat(item["messages"], add_generation_prompt=True)
        for j, c in enumerate(cands):
            c_ids = tokenizer.encode(c.name)
            rows.append((p_ids, c_ids))
            row_item.append(i)
            row_cand.append(j)
    seq = max(len(p) + len(c) for p, c in rows)
    seq = int(math.ceil(seq / 16) * 16)
    shards = batch_shards(mesh)
    bsz = max(shards, settings.batch_size // shards * shards)
    fn = make_row_logprob(graphdef, param_shardings, mesh, (bsz, seq))
    sh = batch_sharding(mesh, bsz, seq)
    ll = np.zeros(len(rows), np.float64)
    ntok = np.zeros(len(rows), np.float64)
    for start in range(0, len(rows), bsz):
        chunk = rows[start:start + bsz]
        arr = {key: np.zeros((bsz, seq), np.int32) for key in BATCH_KEYS}
        arr["tokens"][:] = tokenizer.pad_id
        for r, (p, c) in enumerate(chunk):
            t = p + c
            arr["tokens"][r, :len(t)] = t
            arr["segment_ids"][r, :len(t)] = 1
            arr["positions"][r, :len(t)] = np.arange(len(t))
            arr["loss_mask"][r, len(p):len(t)] = 1
            ntok[start + r] = len(c)
        out = np.asarray(jax.device_get(fn(params, replicated_batch(arr, sh))))
        ll[start:start + len(chunk)] = out[:len(chunk)]
    correct = np.zeros(len(items))
    correct_norm = np.zeros(len(items))
    row_item, row_cand = np.asarray(row_item), np.asarray(row_cand)
    for i in range(len(items)):
        sel = row_item == i
        s, c, t = ll[sel], row_cand[sel], ntok[sel]
        correct[i] = float(c[np.argmax(s)] == golds[i])
        correct_norm[i] = float(c[np.argmax(s / np.maximum(t, 1))] == golds[i])
    chance = float(np.mean([1.0 / m for m in n_cands]))
    return {"items": len(items), "candidates_per_item": float(np.mean(n_cands)), "accuracy": float(correct.mean()),
            "accuracy_per_token": float(correct_norm.mean()), "chance": chance, "seed": seed}
