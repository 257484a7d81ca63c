"""grain pipelines: SFT records -> tokenized, prompt-masked, packed, shuffled, host-sharded batches.

Why grain: every step is a deterministic function of (seed, record index), so an iterator's state is a few
integers that orbax saves with the model and restores exactly (`it.get_state()` / `it.set_state()`), and hosts
read disjoint slices of the same random-access source without coordination.

Order of operations (each host): source[i] -> tag with global index i -> slice [shard_index::shard_count]
(an exact partition of the records) -> shuffle(seed) -> repeat(num_epochs; each epoch reshuffled) ->
tokenize + mask -> first-fit packing into `batch_size` bins of `seq_len` (or pad) -> batch.

Batch contract (docs/INTERFACES.md): int32 `[batch, seq_len]` arrays `tokens`, `segment_ids` (1.. per packed
sequence, 0 = padding), `positions` (restart at 0 per segment), `loss_mask` (1 on completion tokens, i.e. the
targets predicted from the previous token). Optional `record_ids` (global source index per token, -1 padding)
for provenance and tests.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from raredx_jax.data import tfds_builders
from raredx_jax.data.tokenizer import Tokenizer, load_tokenizer

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")
DATASETS = {"knowledge": "raredx_knowledge", "rers_trajectories": "raredx_rers_trajectories"}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else value


def as_sft_record(record: Mapping[str, Any]) -> tuple[list[dict] | str, str]:
    """(prompt messages or "", completion) from an in-memory record or a stored TFDS row (bytes, JSON prompt)."""
    if "completion" not in record:
        raise KeyError(f"SFT record lacks field 'completion' (fields: {sorted(record)})")
    completion = _text(record["completion"])
    if not isinstance(completion, str):
        raise TypeError(f"SFT record field 'completion' must be str, got {type(completion).__name__}")
    prompt = record.get("prompt", "")
    prompt = _text(prompt)
    if isinstance(prompt, str) and prompt:
        try:
            prompt = json.loads(prompt)  # stored rows keep chat messages as JSON
        except json.JSONDecodeError as e:
            raise ValueError("SFT record field 'prompt' must be chat messages or \"\"; got a plain string") from e
    if not isinstance(prompt, (str, list)):
        raise TypeError(f"SFT record field 'prompt' must be a list of messages or \"\", got {type(prompt).__name__}")
    return prompt, completion


def tokenize_sft(record: Mapping[str, Any], tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """Prompt (chat template + generation prompt; BOS for raw text) + completion + EOS, truncated to seq_len.

    loss_mask marks completion tokens and the EOS; prompt tokens are never trained on. A record whose prompt
    alone fills seq_len keeps its (fully masked) tokens rather than vanishing from the epoch.
    """
    prompt, completion = as_sft_record(record)
    if prompt:
        p_ids = tokenizer.encode_chat(prompt, add_generation_prompt=True)
    else:
        p_ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    c_ids = tokenizer.encode(completion) + [tokenizer.eos_id]
    tokens = np.asarray((p_ids + c_ids)[:seq_len], dtype=np.int32)
    mask = np.concatenate([np.zeros(len(p_ids), np.int32), np.ones(len(c_ids), np.int32)])[:seq_len]
    return {"tokens": tokens, "loss_mask": mask}


def _pad_row(x: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(x["tokens"])
    out = {
        "tokens": np.full(seq_len, pad_id, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, np.int32),
    }
    out["tokens"][:n] = x["tokens"]
    out["segment_ids"][:n] = 1
    out["positions"][:n] = np.arange(n, dtype=np.int32)
    out["loss_mask"][:n] = x["loss_mask"]
    if "record_ids" in x:
        out["record_ids"] = np.full(seq_len, -1, np.int32)
        out["record_ids"][:n] = x["record_ids"]
    return out


def _rename_packed(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {"tokens": x["tokens"], "segment_ids": x["tokens_segment_ids"], "positions": x["tokens_positions"],
           "loss_mask": x["loss_mask"]}
    if "record_ids" in x:
        out["record_ids"] = x["record_ids"]
    return {k: np.asarray(v, np.int32) for k, v in out.items()}


class _PadBatch(grain.transforms.Map):
    """Pads a short final batch with all-padding rows, so every batch has the static shape jit expects."""

    def __init__(self, batch_size: int, pad_id: int):
        self.batch_size, self.pad_id = batch_size, pad_id

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = batch["tokens"].shape[0]
        if n == self.batch_size:
            return batch
        out = {}
        for k, v in batch.items():
            fill = self.pad_id if k == "tokens" else (-1 if k == "record_ids" else 0)
            pad = np.full((self.batch_size - n, *v.shape[1:]), fill, v.dtype)
            out[k] = np.concatenate([v, pad])
        return out


def sft_dataset(
    source: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    pack: bool = True,
    num_epochs: int | None = None,
    *,
    shuffle: bool = True,
    packing_bins: int | None = None,
    with_record_ids: bool = False,
    pad_final_batch: bool = True,
    read_threads: int = 0,
) -> grain.IterDataset:
    """Batches of SFT records for one host; see the module docstring for the contract.

    Args:
      source: random-access records ({"prompt", "completion"} dicts or stored rows, e.g. a TFDS data source).
      batch_size: rows per batch on this host (the global batch divided by the number of hosts).
      shard_index, shard_count: this host's slice; default jax.process_index() / jax.process_count().
      num_epochs: None = repeat forever (training); an int gives a finite dataset (evaluation).
      packing_bins: first-fit bins packed at once (default batch_size); more bins = less padding.
      with_record_ids: add `record_ids` [B, T] (global source index per token, -1 on padding).
      pad_final_batch: finite datasets end with a full-size batch padded with empty rows (segment_ids 0).
      read_threads: grain read threads (0 = read in the consuming thread; tokenization holds the GIL anyway).
    """
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if len(source) < shard_count:
        raise ValueError(f"{len(source)} records cannot be sharded over {shard_count} processes")

    def tokenize(index_and_record: tuple[int, Mapping[str, Any]]) -> dict[str, np.ndarray]:
        index, record = index_and_record
        try:
            out = tokenize_sft(record, tokenizer, seq_len)
        except (KeyError, TypeError, ValueError) as e:
            raise type(e)(f"SFT source record {index}: {e}") from e
        if with_record_ids:
            out["record_ids"] = np.full(len(out["tokens"]), index, np.int32)
        return out

    n_source = len(source)
    # Indices past len(source) (later epochs) wrap around in grain: report the record's own index.
    ds = grain.MapDataset.source(source).map_with_index(lambda i, r: (i % n_source, r))
    ds = ds[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(tokenize)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(64, batch_size)))
    if pack:
        feats = ("tokens", "loss_mask") + (("record_ids",) if with_record_ids else ())
        it = grain.experimental.FirstFitPackIterDataset(
            it,
            length_struct={k: seq_len for k in feats},
            num_packing_bins=packing_bins or batch_size,
            seed=seed,
            shuffle_bins=True,
            padding_struct={"tokens": tokenizer.pad_id, "loss_mask": 0, "record_ids": -1}
            if with_record_ids else {"tokens": tokenizer.pad_id, "loss_mask": 0},
        )
        it = it.map(_rename_packed)
    else:
        pad_id = tokenizer.pad_id
        it = it.map(lambda x: _pad_row(x, seq_len, pad_id))
    it = it.batch(batch_size, drop_remainder=False)
    if pad_final_batch:
        it = it.map(_PadBatch(batch_size, tokenizer.pad_id))
    return it


def make_host_dataset(config: Any, split: str = "train", *, tokenizer: Tokenizer | None = None,
                      data_dir: str | None = None, num_epochs: int | None = None,
                      seed: int | None = None) -> grain.IterDataset:
    """This host's SFT batches for `config.train.dataset` from the built TFDS data (`data_dir` or data.dir).

    The global `train.batch_size` is split evenly over jax processes (it must divide).
    """

    name = config.train.dataset
    if name not in DATASETS:
        raise ValueError(f"train.dataset must be one of {sorted(DATASETS)}, got {name!r}")
    n_proc = jax.process_count()
    if config.train.batch_size % n_proc:
        raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by the {n_proc} processes")
    source = tfds_builders.data_source(DATASETS[name], split, data_dir or config.data.dir)
    return sft_dataset(
        source, tokenizer or load_tokenizer(config), config.train.seq_len, config.train.batch_size // n_proc,
        seed=config.seed if seed is None else seed, shard_index=jax.process_index(), shard_count=n_proc,
        pack=config.train.pack, num_epochs=num_epochs)


def make_host_batch_iterator(config: Any, split: str = "train", **kwargs: Any) -> grain.DatasetIterator:
    """`iter(make_host_dataset(...))`: a checkpointable iterator (`get_state()` / `set_state()`)."""
    return iter(make_host_dataset(config, split, **kwargs))
