"""Dual-level curriculum: promotion rule, bucket / lesson mix, skipping, JSON state round-trip."""
import json

import numpy as np
import pytest
from ml_collections import config_dict

from raredx_jax.training.curriculum import BUCKETS, DualCurriculum, curriculum_config, parse_lesson

THREE = ("closed_set:typical", "open:typical", "open:sparse")


def make(levels, **over):
    cfg = config_dict.ConfigDict(over)
    return DualCurriculum(levels, cfg)


def set_pass_rates(cur, lesson, rates, attempts=10):
    """Drive the estimates to exact pass rates through the public API (EMA: first measurement sets p)."""
    idx, passes = [], []
    for i, p in rates.items():
        k = int(round(p * attempts))
        idx += [i] * attempts
        passes += [1.0] * k + [0.0] * (attempts - k)
    cur.update(idx, lesson, passes, passes=passes)
    cur.remeasure()


# --------------------------------------------------------------------------------------------------------
# task level
# --------------------------------------------------------------------------------------------------------


def test_promotion_happens_when_rule_holds_and_not_before():
    # rule: >= 5 steps at the lesson and mean reward over the last 3 steps >= 0.5
    cur = make(["typical"] * 4 + ["sparse"] * 4, lessons=THREE, window=3, min_steps=5, promote_threshold=0.5,
               replay=0.0, remeasure_every=100)
    # lesson 0: high reward from the start; min_steps blocks promotion until step 5
    expected = []
    for step, r in enumerate([0.9, 0.9, 0.9, 0.9, 0.9], start=1):
        ev = cur.update([0, 1], "closed_set:typical", [r, r], step=step)
        expected.append((step, cur.lesson_index, bool(ev)))
    assert expected == [(1, 0, False), (2, 0, False), (3, 0, False), (4, 0, False), (5, 1, True)]
    assert cur.promotions[0]["step"] == 5 and cur.promotions[0]["reason"] == "rule"
    # lesson 1: the window mean must reach 0.5 (>=); 5 steps of 0.4 never promote
    rewards = [0.4] * 6 + [0.7, 0.4, 0.4, 0.7, 0.6]
    #   window means: ... steps 6..11 (1-based at this lesson): [.4 .4 .4]=.4, [.4 .4 .7]=.5 -> promote at the 7th
    seen = []
    for k, r in enumerate(rewards, start=6):
        ev = cur.update([2, 3], "open:typical", [r, r - 0.0], step=k)
        seen.append(cur.lesson_index)
        if ev:
            break
    assert seen == [1] * 6 + [2]
    assert cur.promotions[-1]["window_mean"] == pytest.approx(0.5)
    # last lesson: never promoted further
    for k in range(13, 30):
        assert cur.update([4], "open:sparse", [1.0], step=k) == []
    assert cur.lesson_index == 2


def test_window_uses_only_current_lesson_samples_and_per_step_means():
    cur = make(["typical"] * 4 + ["sparse"] * 4, lessons=THREE, window=2, min_steps=2, promote_threshold=0.5,
               replay=0.5, remeasure_every=100, max_steps=0)
    cur.lesson_index = 1  # start at lesson 1 to have replay
    # replay samples with reward 1 must not lift the window; current-lesson mean is 0.2
    for step in (1, 2, 3):
        cur.update([0, 1, 2, 3], ["closed_set:typical"] * 2 + ["open:typical"] * 2, [1, 1, 0.2, 0.2], step=step)
    assert cur.lesson_index == 1 and cur.window_mean() == pytest.approx(0.2)
    # two calls at the same step are merged into one window entry
    cur.update([2], "open:typical", [0.6], step=4)  # window (0.2 + 0.6) / 2 = 0.4 < 0.5
    cur.update([3], "open:typical", [0.2], step=4)
    assert cur.window[-1][1:] == pytest.approx([0.8, 2.0]) and cur.steps_at_lesson == 4
    assert cur.lesson_index == 1 and cur.window_mean() == pytest.approx(0.3)
    cur.update([2, 3], "open:typical", [0.8, 0.8], step=5)  # (0.4 + 0.8) / 2 = 0.6 >= 0.5
    assert cur.lesson_index == 2


def test_pass_metric_thresholds_per_lesson_and_max_steps():
    cur = make(["typical"] * 4, lessons=("closed_set:typical", "open:typical", "open:*"), window=1, min_steps=1,
               promote_metric="pass", promote_threshold=(0.9, 0.2), max_steps=4, replay=0.0)
    assert cur.thresholds == [0.9, 0.2, 0.2]
    cur.update([0, 1], "closed_set:typical", rewards=[1.0, 1.0], passes=[1, 0], step=1)  # pass .5 < .9
    assert cur.lesson_index == 0
    for s in (2, 3):
        cur.update([0, 1], "closed_set:typical", rewards=[1.0, 1.0], passes=[1, 0], step=s)
    assert cur.lesson_index == 0
    cur.update([0, 1], "closed_set:typical", rewards=[1.0, 1.0], passes=[1, 0], step=4)  # 4 steps: forced
    assert cur.lesson_index == 1 and cur.promotions[-1]["reason"] == "max_steps"
    cur.update([0], "open:typical", rewards=[0.0], passes=[0.25], step=5)  # .25 >= .2
    assert cur.lesson.name == "open:*"


def test_lessons_without_cases_are_skipped_and_config_errors_name_the_field():
    cur = make(["typical"] * 3, lessons=("closed_set:typical", "open:noisy", "open:typical"))
    assert [x.name for x in cur.lessons] == ["closed_set:typical", "open:typical"]
    assert cur.metrics()["skipped_lessons"] == ["open:noisy"]
    with pytest.raises(ValueError, match="curriculum.lessons"):
        make(["typical"], lessons=("open:noisy",))
    with pytest.raises(ValueError, match="curriculum.lessons"):
        make(["typical"], lessons=("guess:typical",))
    with pytest.raises(ValueError, match="curriculum.nope"):
        make(["typical"], nope=1)
    assert parse_lesson("open:sparse") == ("open", "sparse")
    # the full config form: reads grpo.steps for the shift and the string list form of lessons
    full = config_dict.ConfigDict({"seed": 3, "grpo": {"steps": 40},
                                   "curriculum": {"lessons": "closed_set:typical, open:*", "remeasure_every": 5}})
    c = DualCurriculum(["typical", "noisy"], full)
    assert c.cfg.shift_steps == 40 and [x.name for x in c.lessons] == ["closed_set:typical", "open:*"]
    assert set(curriculum_config().keys()) >= {"lessons", "window", "min_steps", "replay", "remeasure_every"}


# --------------------------------------------------------------------------------------------------------
# case level
# --------------------------------------------------------------------------------------------------------


def _bucketed(n_per=100, **over):
    levels = ["typical"] * (3 * n_per)
    cfg = dict(lessons=("open:typical",), min_attempts=1000, revisit=0.0, floor=0.02, shift_steps=100,
               remeasure_every=10_000)
    cfg.update(over)
    cur = make(levels, **cfg)
    rates = {i: 0.8 for i in range(n_per)}
    rates.update({i: 0.5 for i in range(n_per, 2 * n_per)})
    rates.update({i: 0.1 for i in range(2 * n_per, 3 * n_per)})
    set_pass_rates(cur, "open:typical", rates)
    return cur


def test_bucket_mix_follows_stated_weights_and_shifts_easy_to_hard():
    cur = _bucketed()
    b = cur.buckets("open")
    assert (b[:100] == 0).all() and (b[100:200] == 1).all() and (b[200:] == 2).all()
    rng = np.random.default_rng(0)
    # Tolerance: 10,000 slots -> binomial sd <= 0.005 per share; allow 0.02 (4 sd).
    for step, want in [(0, (0.5, 0.35, 0.15)), (50, (0.325, 0.35, 0.325)), (100, (0.15, 0.35, 0.5))]:
        cur.step = step  # the shift follows the training step
        np.testing.assert_allclose(cur.bucket_weights(), want, atol=1e-12)
        counts = np.zeros(3)
        for _ in range(200):
            batch = cur.sample_batch(50, rng)
            for ci, lesson in batch:
                assert lesson == "open:typical"
                counts[b[ci]] += 1
        np.testing.assert_allclose(counts / counts.sum(), want, atol=0.02)
        assert set(cur.metrics()) >= {f"batch_mix/{x}" for x in BUCKETS}


def test_within_bucket_sampling_peaks_near_half():
    # hard bucket (p < 0.3): cases at p = 0.2 (w = .16 + .02) and p = 0.0 (w = .02, not skipped: min_attempts)
    cur = make(["typical"] * 20, lessons=("open:typical",), min_attempts=1000, revisit=0.0, floor=0.02,
               bucket_weights_start=(0, 0, 1), bucket_weights_end=(0, 0, 1))
    set_pass_rates(cur, "open:typical", {**{i: 0.2 for i in range(10)}, **{i: 0.0 for i in range(10, 20)}})
    rng = np.random.default_rng(1)
    hits = np.zeros(20)
    for _ in range(4000):  # one slot per batch: no without-replacement effect
        (ci, _), = cur.sample_batch(1, rng)
        hits[ci] += 1
    share_half = hits[:10].sum() / hits.sum()
    want = 0.18 / (0.18 + 0.02)  # = 0.9 ; sd = sqrt(.9 * .1 / 4000) = .0047 ; tolerance 0.02
    assert abs(share_half - want) < 0.02


def test_lesson_mix_with_replay():
    cur = make(["typical"] * 10 + ["sparse"] * 10, lessons=THREE, replay=0.3)
    cur.lesson_index = 2
    assert cur.lesson_weights() == pytest.approx({"closed_set:typical": 0.15, "open:typical": 0.15,
                                                  "open:sparse": 0.7})
    rng = np.random.default_rng(2)
    names = [les for _ in range(250) for _, les in cur.sample_batch(40, rng)]
    share = {k: names.count(k) / len(names) for k in THREE}
    # 10,000 slots; sd <= 0.005; tolerance 0.02
    assert share == pytest.approx({"closed_set:typical": 0.15, "open:typical": 0.15, "open:sparse": 0.7}, abs=0.02)
    # each lesson's cases come from its own level
    for ci, les in cur.sample_batch(200, rng):
        assert cur.case_levels[ci] == parse_lesson(les)[1]


def test_always_and_never_solved_cases_are_skipped_after_enough_attempts():
    cur = make(["typical"] * 20, lessons=("open:typical",), min_attempts=4, revisit=0.0, remeasure_every=1)
    always, never, mixed = range(0, 5), range(5, 10), range(10, 20)
    rng = np.random.default_rng(3)
    # 3 attempts each: not enough to skip yet
    idx = [i for i in range(20) for _ in range(3)]
    passes = [1.0 if i in always else 0.0 if i in never else float(k % 2) for i in range(20) for k in range(3)]
    cur.update(idx, "open:typical", passes, passes=passes, step=1)
    assert not cur.skipped("open").any()
    assert {ci for _ in range(50) for ci, _ in cur.sample_batch(20, rng)} == set(range(20))
    # one more attempt each (4 >= min_attempts): always / never solved are skipped
    idx = list(range(20))
    passes = [1.0 if i in always else 0.0 if i in never else float(i % 2) for i in range(20)]
    cur.update(idx, "open:typical", passes, passes=passes, step=2)
    assert cur.skipped("open")[:10].all() and not cur.skipped("open")[10:].any()
    sampled = {ci for _ in range(100) for ci, _ in cur.sample_batch(8, rng)}
    assert sampled == set(mixed)
    assert cur.metrics()["skipped_cases"] == 10
    # revisit > 0 brings skipped cases back at about that share
    cur.cfg.revisit = 0.1
    n_skipped = sum(ci < 10 for _ in range(500) for ci, _ in cur.sample_batch(20, rng))
    assert abs(n_skipped / 10_000 - 0.1) < 0.02


def test_remeasure_only_every_k_steps():
    cur = make(["typical"] * 4, lessons=("open:typical",), remeasure_every=3, ema=0.5, min_attempts=100)
    cur.update([0, 0], "open:typical", [1, 1], passes=[1, 1], step=1)
    cur.update([0, 0], "open:typical", [1, 0], passes=[1, 0], step=2)
    assert cur.p["open"][0] == 0.5  # prior, not yet re-measured
    cur.update([0, 0], "open:typical", [0, 0], passes=[0, 0], step=3)
    assert cur.p["open"][0] == pytest.approx(3 / 6)  # first measurement: the pooled rate
    for s in (4, 5, 6):
        cur.update([0], "open:typical", [1], passes=[1], step=s)
    assert cur.p["open"][0] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)  # EMA with 0.5
    cnt = make(["typical"] * 2, lessons=("open:typical",), remeasure_every=1, estimator="counts")
    cnt.update([0, 0, 0], "open:typical", [1, 0, 0], passes=[1, 0, 0], step=1)
    cnt.update([0], "open:typical", [1], passes=[1], step=2)
    assert cnt.p["open"][0] == pytest.approx(2 / 4) and cnt.p["open"][1] == 0.5


# --------------------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------------------


def _drive(cur, steps, start, seed):
    """Sample + update for `steps` steps with a deterministic fake policy; returns the samples."""
    r = np.random.default_rng(seed)
    out = []
    for step in range(start, start + steps):
        batch = cur.sample_batch(6)  # the curriculum's own generator
        out.append(batch)
        idx = [ci for ci, _ in batch for _ in range(4)]
        les = [le for _, le in batch for _ in range(4)]
        rew = r.random(len(idx)) * (0.4 + 0.1 * (step % 7))
        cur.update(idx, les, rew, passes=(rew > 0.3).astype(float), step=step)
    return out


def test_state_round_trips_through_json_and_continues_identically():
    levels = ["typical"] * 12 + ["sparse"] * 8
    over = dict(lessons=THREE, window=3, min_steps=3, promote_threshold=0.25, replay=0.25, remeasure_every=4,
                min_attempts=6, revisit=0.1, seed=7)
    a = make(levels, **over)
    _drive(a, 15, 1, seed=0)
    blob = json.dumps(a.state_dict())
    b = make(levels, **over)
    b.load_state_dict(json.loads(blob))
    assert json.dumps(b.state_dict()) == blob
    fut_a = _drive(a, 20, 16, seed=1)
    fut_b = _drive(b, 20, 16, seed=1)
    assert fut_a == fut_b
    assert a.state_dict() == b.state_dict()
    assert a.promotions, "the driven run should have promoted at least once"
    # an explicit generator gives the same samples from two identical curricula
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    assert a.sample_batch(10, g1) == b.sample_batch(10, g2)
    # a state from another configuration is refused with a clear message
    other = make(["typical"] * 3, lessons=THREE[:2])
    with pytest.raises(ValueError, match="cases"):
        other.load_state_dict(json.loads(blob))


def test_reads_the_base_config():
    from configs.base import get_config

    cfg = get_config()
    cur = DualCurriculum(["typical"] * 3 + ["sparse"] * 2, cfg)
    assert cur.cfg.remeasure_every == cfg.curriculum.remeasure_every
    assert cur.cfg.shift_steps == cfg.grpo.steps and cur.cfg.seed == cfg.seed
    assert [x.name for x in cur.lessons] == ["closed_set:typical", "open:typical", "open:sparse"]


# --------------------------------------------------------------------------------------------------------
# the gain rule, saturated lessons and the RERS prior (the GRPO stage's defaults)
# --------------------------------------------------------------------------------------------------------


def test_gain_rule_compares_a_later_disjoint_window_with_the_lessons_first_and_not_before():
    """A lesson that starts high (0.9) but does not improve is never promoted by the rule, whatever a fixed
    threshold would have said; one that rises from 0.3 by the margin moves on once a window disjoint from the
    baseline window shows the gain, and min_steps holds it before that."""
    cur = make(["sparse"] * 4 + ["hard"] * 4, lessons=("open:sparse", "open:hard"), promote_rule="gain",
               promote_metric="pass", promote_margin=0.1, window=2, min_steps=4, replay=0.0, remeasure_every=100)
    for step in range(1, 12):  # flat at 0.9: baseline 0.9, later windows 0.9 < 1.0
        assert cur.update([0, 1], "open:sparse", [1.0, 1.0], passes=[1.0, 0.8], step=step) == []
    assert cur.lesson_index == 0 and cur.lesson_baseline == pytest.approx(0.9)
    cur = make(["sparse"] * 4 + ["hard"] * 4, lessons=("open:sparse", "open:hard"), promote_rule="gain",
               promote_metric="pass", promote_margin=0.1, window=2, min_steps=4, replay=0.0, remeasure_every=100)
    rates = [0.3, 0.3, 0.5, 0.5, 0.5]  # baseline (steps 1-2) 0.3; window (3,4) 0.5 is disjoint and >= 0.4
    promoted_at = None
    for step, p in enumerate(rates, start=1):
        if cur.update([0, 1], "open:sparse", [p, p], passes=[p, p], step=step):
            promoted_at = step
            break
    assert promoted_at == 4, promoted_at  # not at step 3: window (2, 3) overlaps the baseline
    e = cur.promotions[0]
    assert e["reason"] == "rule" and e["baseline"] == pytest.approx(0.3) and e["window_mean"] == pytest.approx(0.5)
    # min_steps holds a gain that shows early
    cur = make(["sparse"] * 4 + ["hard"] * 4, lessons=("open:sparse", "open:hard"), promote_rule="gain",
               promote_metric="pass", promote_margin=0.1, window=1, min_steps=4, replay=0.0, remeasure_every=100)
    got = [bool(cur.update([0], "open:sparse", [p], passes=[p], step=s)) for s, p in enumerate([0.2, 0.9, 0.9, 0.9], 1)]
    assert got == [False, False, False, True]


def test_a_saturated_lesson_is_promoted_at_once_and_the_rers_prior_seeds_estimates():
    cur = make(["noisy"] * 3 + ["hard"] * 3, lessons=("open:noisy", "open:hard"), promote_rule="gain",
               min_attempts=4, skip_hi=0.95, skip_lo=0.05, estimator="counts", replay=0.0, max_steps=0)
    # RERS's direct round: 4 samples per case; noisy cases all solved, hard ones mixed or never
    assert cur.seed_pass_rates("open", [0, 1, 2, 3, 4, 5], [4] * 6, [4, 4, 4, 2, 0, 1]) == 6
    assert cur.seed_pass_rates("open", [0], [4], [0]) == 0  # measured cases are not overwritten
    assert cur.seed_pass_rates("closed_set", [0], [4], [4]) == 0  # no such task in the lessons
    np.testing.assert_allclose(cur.p["open"], [1, 1, 1, 0.5, 0, 0.25])
    assert cur.saturated() and cur.skipped("open").tolist() == [True, True, True, False, True, False]
    ev = cur.update([0], "open:noisy", [1.0], passes=[1.0], step=1)
    assert ev and ev[0]["reason"] == "saturated" and cur.lesson.name == "open:hard"
    # the hard lesson samples only its unskipped cases (mixed outcomes) apart from revisits
    picks = [ci for ci, _ in cur.sample_batch(64, rng=np.random.default_rng(0))]
    assert set(picks) <= {3, 4, 5} and picks.count(4) < 10
    state = json.loads(json.dumps(cur.state_dict()))
    again = make(["noisy"] * 3 + ["hard"] * 3, lessons=("open:noisy", "open:hard"), promote_rule="gain",
                 min_attempts=4, skip_hi=0.95, skip_lo=0.05, estimator="counts", replay=0.0, max_steps=0)
    again.load_state_dict(state)
    assert again.state_dict() == cur.state_dict()


def test_rl_curriculum_stage_defaults_have_no_untaught_task_and_end_on_hard():
    from configs.rl_curriculum import get_config

    c = get_config()
    lessons = tuple(c.curriculum.lessons)
    assert all(x.startswith("open:") for x in lessons) and lessons[-1] == "open:hard"
    assert c.curriculum.min_attempts <= c.grpo.group_size  # a case can be skipped after one group
    assert c.curriculum.promote_rule == "gain" and c.grpo.filter_groups == "pass"


def test_rers_journal_seeds_buckets_but_skipping_waits_for_the_policys_own_rollouts(tmp_path):
    """The RERS journal measured another policy: it places each case (p = correct / tries) but counts as at most
    min_attempts - 1 attempts, so a case solved 4/4 by RERS is skipped only after the current policy also
    solves it in a group of its own."""
    from types import SimpleNamespace

    from raredx_jax.training.common import MissingInputError
    from raredx_jax.training.grpo import seed_from_rers
    from raredx_jax.training.rers_journal import JOURNAL_DIR

    jdir = tmp_path / JOURNAL_DIR
    jdir.mkdir()
    lines = [{"chunk": 0, "case_id": f"c{i}", "status": "direct", "direct": {"tries": 4, "correct": k}}
             for i, k in enumerate([4, 0, 2])]
    lines.append({"commit": 0, "n": 3})
    (jdir / "shard-00000-of-00001.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cases = [SimpleNamespace(id=f"c{i}", level="sparse") for i in range(4)]  # c3: not in the journal
    cur = make([c.level for c in cases], lessons=("open:sparse",), min_attempts=4, skip_hi=0.95, skip_lo=0.05,
               estimator="counts", count_decay=0.5, remeasure_every=1)
    assert seed_from_rers(cur, cases, str(tmp_path)) == 3
    np.testing.assert_allclose(cur.p["open"], [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(cur.attempts["open"], [3, 3, 3, 0])
    assert not cur.skipped("open").any()  # nothing skipped on RERS's word alone
    cur.update([0] * 4 + [1] * 4, "open:sparse", [1] * 4 + [0] * 4, passes=[1] * 4 + [0] * 4, step=1)
    assert cur.skipped("open").tolist() == [True, True, False, False]  # confirmed by one group each
    assert seed_from_rers(cur, cases, "") == 0
    with pytest.raises(MissingInputError, match="curriculum.prior_from"):
        seed_from_rers(cur, cases, str(tmp_path / "none"))
