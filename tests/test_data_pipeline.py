"""grain SFT pipeline: exact resume, exact host partition, packing metadata, prompt masking."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from raredx_jax.data.pipeline import BATCH_KEYS, sft_dataset, tokenize_sft
from raredx_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

SEQ = 48


def _records(n: int = 53) -> list[dict]:
    """Varied lengths, chat prompts and raw-text (empty prompt) records; a few longer than SEQ (truncated)."""
    recs = []
    for i in range(n):
        prompt = "" if i % 3 == 0 else [{"role": "user", "content": f"Case {i}: fever and rash " * (1 + i % 4)}]
        recs.append({"prompt": prompt, "completion": f"<think>r{i}</think> answer {i} " * (1 + i % 6), "id": i})
    return recs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [r["completion"] for r in _records()] + [str(r["prompt"]) for r in _records()]
    return SentencePieceTokenizer(train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "spm", 320))


def _batches(ds, n=None):
    it = iter(ds)
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def _segments(batches):
    """(record_id, tokens, loss_mask) for every packed segment, checking the packing metadata on the way."""
    segs = []
    for b in batches:
        assert set(BATCH_KEYS) <= set(b) and all(b[k].dtype == np.int32 for k in b)
        for row in range(b["tokens"].shape[0]):
            seg, pos, rid = b["segment_ids"][row], b["positions"][row], b["record_ids"][row]
            n_real = int(np.count_nonzero(seg))
            assert np.all(seg[n_real:] == 0) and np.all(rid[n_real:] == -1), "padding only at the end"
            assert np.all(b["loss_mask"][row][n_real:] == 0) and np.all(b["tokens"][row][n_real:] == 0)
            if n_real == 0:
                continue
            assert seg[0] == 1 and np.all(np.diff(seg[:n_real]) >= 0) and np.all(np.diff(seg[:n_real]) <= 1)
            for s in range(1, int(seg.max()) + 1):
                idx = np.nonzero(seg == s)[0]
                assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))), "segment is contiguous"
                assert np.array_equal(pos[idx], np.arange(len(idx))), "positions restart at 0 per segment"
                assert len(set(rid[idx].tolist())) == 1, "one record per segment"
                segs.append((int(rid[idx[0]]), b["tokens"][row][idx].tolist(), b["loss_mask"][row][idx].tolist()))
    return segs


@pytest.mark.parametrize("pack", [True, False])
def test_resume_mid_epoch_gives_identical_batches(tok, pack):
    # 3 packing bins with batch 2: a saved state can fall in the middle of a packed group.
    kw = dict(seq_len=SEQ, batch_size=2, seed=7, shard_index=0, shard_count=1, pack=pack, packing_bins=3,
              with_record_ids=True)
    ds = sft_dataset(_records(), tok, **kw)  # num_epochs=None: runs across epoch boundaries
    ref = _batches(ds, 60)
    for k in (1, 5, 17, 40):
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = it.get_state()
        resumed = iter(sft_dataset(_records(), tok, **kw))  # a fresh pipeline, as after a restart
        resumed.set_state(state)
        for j in range(k, min(k + 12, 60)):
            got = next(resumed)
            for key in ref[j]:
                np.testing.assert_array_equal(got[key], ref[j][key], err_msg=f"batch {j} key {key} after resume@{k}")


def test_resume_with_read_threads(tok):
    kw = dict(seq_len=SEQ, batch_size=4, seed=1, shard_index=0, shard_count=1, read_threads=2)
    ref = _batches(sft_dataset(_records(), tok, **kw), 12)
    it = iter(sft_dataset(_records(), tok, **kw))
    for _ in range(5):
        next(it)
    state = it.get_state()
    it2 = iter(sft_dataset(_records(), tok, **kw))
    it2.set_state(state)
    for j in range(5, 12):
        np.testing.assert_array_equal(next(it2)["tokens"], ref[j]["tokens"])


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_sharding_partitions_records_exactly(tok, count, pack):
    recs = _records()
    seen = []
    for index in range(count):
        ds = sft_dataset(recs, tok, SEQ, 3, seed=3, shard_index=index, shard_count=count, pack=pack,
                         num_epochs=1, with_record_ids=True)
        seen.append([rid for rid, _, _ in _segments(_batches(ds))])
    flat = [r for s in seen for r in s]
    assert sorted(flat) == list(range(len(recs))), "no loss, no duplicate"
    for a in range(count):
        for b in range(a + 1, count):
            assert not set(seen[a]) & set(seen[b]), "hosts overlap"


def test_packed_segments_match_tokenization_and_mask_prompt(tok):
    recs = _records()
    batches = _batches(sft_dataset(recs, tok, SEQ, 4, seed=0, shard_index=0, shard_count=1, num_epochs=1,
                                   with_record_ids=True))
    segs = _segments(batches)
    assert max(int(b["segment_ids"].max()) for b in batches) > 1, "packing put several records in a row"
    for rid, tokens, mask in segs:
        want = tokenize_sft(recs[rid], tok, SEQ)
        assert tokens == want["tokens"].tolist() and mask == want["loss_mask"].tolist()
        prompt = recs[rid]["prompt"]
        n_prompt = len(tok.encode_chat(prompt)) if prompt else 1  # chat prompt, or BOS for raw text
        assert all(m == 0 for m in mask[:n_prompt]), "prompt tokens are never trained on"
        assert all(m == 1 for m in mask[n_prompt:]), "every completion token is a target"
        if len(tokens) < SEQ:  # untruncated: completion ends with EOS, and the masked tokens are exactly it
            assert tokens[-1] == tok.eos_id
            assert tok.decode([t for t, m in zip(tokens, mask) if m][:-1]) == recs[rid]["completion"]


def test_packed_and_unpacked_carry_the_same_tokens(tok):
    recs = _records()
    def collect(pack):
        ds = sft_dataset(recs, tok, SEQ, 4, seed=0, shard_index=0, shard_count=1, pack=pack, num_epochs=1,
                         with_record_ids=True)
        return {rid: (t, m) for rid, t, m in _segments(_batches(ds))}
    packed, unpacked = collect(True), collect(False)
    assert packed == unpacked and len(packed) == len(recs)
    n_packed = sum(1 for _ in sft_dataset(recs, tok, SEQ, 4, 0, 0, 1, pack=True, num_epochs=1))
    n_unpacked = sum(1 for _ in sft_dataset(recs, tok, SEQ, 4, 0, 0, 1, pack=False, num_epochs=1))
    assert n_packed < n_unpacked


def test_shuffle_by_seed_and_epoch(tok):
    recs = _records()
    def order(seed, epochs=1):
        ds = sft_dataset(recs, tok, SEQ, 1, seed, 0, 1, pack=False, num_epochs=epochs, with_record_ids=True)
        return [int(b["record_ids"][0, 0]) for b in ds]
    assert order(0) == order(0)
    assert order(0) != order(1)
    two = order(0, epochs=2)
    assert sorted(two[: len(recs)]) == sorted(two[len(recs):]) == list(range(len(recs)))
    assert two[: len(recs)] != two[len(recs):], "each epoch reshuffled"


def test_final_batch_padded_to_static_shape(tok):
    recs = _records(7)
    bs = list(sft_dataset(recs, tok, SEQ, 4, 0, 0, 1, pack=False, num_epochs=1))
    assert [b["tokens"].shape for b in bs] == [(4, SEQ), (4, SEQ)]
    assert np.all(bs[-1]["segment_ids"][3] == 0) and np.all(bs[-1]["loss_mask"][3] == 0)
    assert "record_ids" not in bs[0]


def test_loss_formula_counts_only_completion_targets(tok):
    """The trainer's weighting (INTERFACES.md) counts exactly the completion tokens after the first of a segment."""
    recs = _records()
    bs = list(sft_dataset(recs, tok, SEQ, 4, 0, 0, 1, num_epochs=1, with_record_ids=True))
    weighted = sum(int((b["loss_mask"][:, 1:] * (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1])).sum())
                   for b in bs)
    expected = 0
    for rec in recs:
        m = tokenize_sft(rec, tok, SEQ)["loss_mask"]
        expected += int(m[1:].sum())
    assert weighted == expected


def test_bad_record_names_index(tok):
    recs = _records(6)
    recs[4] = {"prompt": ""}
    with pytest.raises(KeyError, match="record 4.*completion"):
        list(sft_dataset(recs, tok, SEQ, 2, 0, 0, 1, shuffle=False, num_epochs=1))
    with pytest.raises(ValueError, match="shard_index"):
        sft_dataset(recs, tok, SEQ, 2, 0, 3, 2)


def test_counter_of_tokens_is_stable_across_hosts(tok):
    """Sharded hosts together see every token once per epoch (the packed union equals the unsharded stream)."""
    recs = _records()
    def tokens(count):
        c = collections.Counter()
        for i in range(count):
            for b in sft_dataset(recs, tok, SEQ, 3, 5, i, count, num_epochs=1):
                c.update(b["tokens"][b["segment_ids"] > 0].tolist())
        return c
    assert tokens(1) == tokens(2) == tokens(4)
