"""Fault suite (issue 18, Build): SIGKILL at a random point of every long job, then rerun; a full disk in the
middle of a checkpoint save.

Kills. One uninterrupted pipeline run (`reference`) and one that is SIGKILLed once inside each stage of
KILL_STAGES -- by default the data build, RERS-SFT, GRPO and export; knowledge SFT and RERS are killed by
test_train_resume and test_rers, and FAULT_KILL_STAGES=all kills them here too -- and rerun with the same command
after each kill, as a user would (`killed`). Both are `python -m raredx_jax.train --config=configs/pipeline.py`
at the fault-suite scale of `fault_utils.pipeline_cmd` (smoke pipeline, a 2-layer 64-wide model, no evaluation
between stages; RERS samples the real policy with gold answers spliced into half the cases so RERS-SFT has
trajectories; an EOS-prone model and a length reward so GRPO's groups have reward variance and its updates are
not zero). Every stage then has to
equal the reference: metrics.jsonl and summary.json field by field (wall-clock fields aside), the kept
checkpoint steps, every array of the final checkpoint bit for bit (parameters, optimiser state, step, RNG key:
same program, same inputs, same CPU, so there is no rounding to tolerate) and its JSON items (data iterator,
curriculum, RL state), the RERS journal and trajectories, the data build (every file byte for byte, the
array_record datasets record by record) and the exported HF directory byte for byte.

Random points. Each stage passes through observable events (`fault_utils.progress`: log lines of the data build,
finished checkpoint steps, committed RERS journal chunks). For each stage a seeded RNG draws an event i and a
fraction u; the kill comes u x (the reference's gap from event i to i+1) after event i, or at event i+1 if that
comes first, so it lands inside the stage. The seed is printed (`-s` shows it, failures repeat it); rerun a draw
with FAULT_SEED=<seed>.

Full disk. In process: orbax's writes are made to fail with OSError(ENOSPC) partway through a checkpoint save
(the k-th array or JSON write of the save, k drawn from the same seed), then the last good checkpoint must
still be found, restore bit for bit, and load as a model; the next save must succeed once space is back.
"""
from __future__ import annotations

import errno
import os
import random
import signal

import fault_utils as fu
import numpy as np
import pytest
from test_train_resume import _finished_steps  # finished checkpoint steps of a run dir

SEED = int(os.environ.get("FAULT_SEED") or random.SystemRandom().randrange(2 ** 31))
# Stages killed by default: those no other test kills (data build, RERS-SFT, export) and GRPO, whose own kill test
# (test_grpo) runs a policy that never updates. Knowledge SFT is killed at a random point by test_train_resume and
# RERS mid-journal by test_rers; FAULT_KILL_STAGES=all kills every stage here too (about 2 pipeline starts more).
_KILL = os.environ.get("FAULT_KILL_STAGES", "data,rers_sft,grpo,export")
KILL_STAGES = fu.STAGES if _KILL == "all" else tuple(s for s in fu.STAGES if s in _KILL.split(","))


def _where(plan=None, stage=None) -> str:
    s = f"FAULT_SEED={SEED}"
    if plan and stage:
        i, delay = plan[stage]
        s += f"; {stage} killed after its event {i} + {delay:.3f}s"
    return s


# --- the two pipeline runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    hf = fu.write_mini_model(str(root / "mini"))
    return {"root": root, "hf": hf, "env": fu.child_env(str(root / "xla_cache"))}


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted run, and when each event of each stage happened in it."""
    run_dir = str(world["root"] / "reference")
    child = fu.Child(fu.pipeline_cmd(run_dir, world["hf"]), world["env"], str(world["root"] / "reference.log"))
    times = fu.watch(child, run_dir)
    assert child.wait(600) == 0, child.tail()
    for stage in fu.STAGES:
        assert len(times[stage]) >= (2 if stage == "export" else 4), (stage, len(times[stage]))
    return run_dir, times


@pytest.fixture(scope="module")
def killed(world, reference):
    """The same command killed once inside each stage of KILL_STAGES (rerun after each kill), then run to the end."""
    _, times = reference
    rng = random.Random(SEED)
    plan: dict[str, tuple[int, float]] = {}
    for stage in KILL_STAGES:
        t = times[stage]
        if stage == "export":  # events: start, done; a kill within the first 40% of the reference's export
            i, u = 0, rng.uniform(0.0, 0.4)
        else:  # any event but the last three (data: four, its last lines come milliseconds apart), so the kill,
            # at the latest when the next event is seen, lands before the final checkpoint / chunk / log line
            i, u = rng.randint(0, len(t) - (5 if stage == "data" else 4)), rng.random()
        plan[stage] = (i, u * (t[i + 1] - t[i]))
    print(f"\nfault suite {_where()}: kill plan (stage: after event i + delay) "
          + ", ".join(f"{s}: {i} + {d:.3f}s" for s, (i, d) in plan.items()), flush=True)
    run_dir = str(world["root"] / "killed")
    outcome = {}
    for n, stage in enumerate(KILL_STAGES):
        child = fu.Child(fu.pipeline_cmd(run_dir, world["hf"]), world["env"], str(world["root"] / f"killed{n}.log"))
        rc, reached = fu.kill_between(child, run_dir, stage, *plan[stage])
        outcome[stage] = (rc, reached, "" if rc == -signal.SIGKILL else child.tail())
        print(f"  {stage}: exit {rc}, progress at the kill {reached}", flush=True)
    child = fu.Child(fu.pipeline_cmd(run_dir, world["hf"]), world["env"], str(world["root"] / "rerun.log"))
    assert child.wait(600) == 0, f"{_where()}: the rerun after the kills failed\n{child.tail()}"
    return run_dir, plan, outcome


# --- kills: every stage ---------------------------------------------------------------------------------------------
def _compare_training_stage(stage: str, ref: str, run: str, where: str) -> None:
    a, b = os.path.join(ref, stage), os.path.join(run, stage)
    ma, mb = fu.metrics(a), fu.metrics(b)
    assert [(r["kind"], r["step"]) for r in mb] == [(r["kind"], r["step"]) for r in ma], where
    for ra, rb in zip(ma, mb):
        assert rb == ra, f"{where}: metrics of {rb['kind']} step {rb['step']} differ in {fu.diff_keys(ra, rb)}"
    sa, sb = fu.read_json(os.path.join(a, "summary.json"), ref), fu.read_json(os.path.join(b, "summary.json"), run)
    assert sb == sa, f"{where}: summary.json differs in {fu.diff_keys(sa, sb)}"
    da = fu.read_json(os.path.join(a, "stage_done.json"), ref)
    db = fu.read_json(os.path.join(b, "stage_done.json"), run)
    assert db == da, f"{where}: stage_done.json differs in {fu.diff_keys(da, db)}"
    steps = _finished_steps(a)
    assert _finished_steps(b) == steps, where
    last_a, last_b = (os.path.join(d, "checkpoints", str(steps[-1])) for d in (a, b))
    xa, xb = fu.checkpoint_arrays(last_a), fu.checkpoint_arrays(last_b)
    assert sorted(xb) == sorted(xa), where
    bad = [k for k in xa if xa[k].dtype != xb[k].dtype or not np.array_equal(xa[k], xb[k])]
    assert not bad, f"{where}: checkpoint {steps[-1]} arrays differ: {bad[:8]} ({len(bad)} of {len(xa)})"
    for item in sorted(os.listdir(last_a)):  # JSON items: model config, data iterator, curriculum, RL state
        if item in ("meta", "params", "opt_state", "train_state") or not os.path.isdir(os.path.join(last_a, item)):
            continue
        for name in sorted(os.listdir(os.path.join(last_a, item))):
            if name.endswith(".json") or name == "metadata":
                ja = fu.read_json(os.path.join(last_a, item, name), ref)
                jb = fu.read_json(os.path.join(last_b, item, name), run)
                assert jb == ja, f"{where}: checkpoint item {item}/{name} differs"


def _compare_rers(ref: str, run: str, where: str) -> None:
    a, b = os.path.join(ref, "rers"), os.path.join(run, "rers")
    ja, jb = fu.journal_cases(a), fu.journal_cases(b)
    assert sorted(jb) == sorted(ja), f"{where}: journaled case ids differ"
    bad = [cid for cid in ja if fu.strip_timing(jb[cid]) != fu.strip_timing(ja[cid])]
    assert not bad, f"{where}: journal lines differ for {len(bad)} cases, e.g. {bad[0]}: fields " \
                    f"{fu.diff_keys(ja[bad[0]], jb[bad[0]])}"  # ids and field names only: lines hold notes
    ta, tb = fu.trajectories(a), fu.trajectories(b)
    assert {k: len(v) for k, v in tb.items()} == {k: len(v) for k, v in ta.items()}, where
    for split in ta:
        for ra, rb in zip(ta[split], tb[split]):
            same = rb == ra  # not `assert rb == ra`: pytest would print both records, and their prompts hold notes
            assert same, f"{where}: trajectory {split} {ra.get('case_id')} differs in {fu.diff_keys(ra, rb)}"
    sa, sb = fu.read_json(os.path.join(a, "summary.json"), ref), fu.read_json(os.path.join(b, "summary.json"), run)
    assert sb == sa, f"{where}: summary.json differs in {fu.diff_keys(sa, sb)}"
    assert sa["kept"] > 0  # RERS-SFT has something to train on


def _compare_files(ref: str, run: str, where: str) -> None:
    """Same files with the same bytes; JSON compared as data (wall-clock fields aside) and array_record files by
    their decoded records: tf.train.Example protos serialise their feature map in a per-process order, so two
    uninterrupted builds already differ in those bytes (measured) while holding the same records."""
    da, db = fu.file_digests(ref), fu.file_digests(run)
    only_run, only_ref = sorted(set(db) - set(da))[:10], sorted(set(da) - set(db))[:10]
    assert not only_run and not only_ref, f"{where}: only in the killed run {only_run}, only in the reference " \
                                          f"{only_ref}"
    bad = []
    for rel in sorted(rel for rel in da if da[rel] != db[rel]):
        if rel.endswith(".json"):
            same = fu.read_json(os.path.join(ref, rel), ref) == fu.read_json(os.path.join(run, rel), run)
        elif ".array_record-" in rel:
            same = fu.dataset_records(ref, rel) == fu.dataset_records(run, rel)
        else:
            same = False
        if not same:
            bad.append(rel)
    assert not bad, f"{where}: contents differ: {bad[:10]}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", fu.STAGES)
def test_after_sigkills_and_reruns_the_stage_equals_the_uninterrupted_run(stage, reference, killed):
    """Killed stages (KILL_STAGES): the kill landed inside the stage, and the rerun's outputs equal the reference.
    The others ran once, uninterrupted, between kills: their outputs equal the reference too."""
    ref, _ = reference
    run, plan, outcome = killed
    where = _where(plan, stage) if stage in plan else f"{_where()}; {stage} not killed (FAULT_KILL_STAGES)"
    if stage in outcome:
        rc, reached, tail = outcome[stage]
        assert rc == -signal.SIGKILL, f"{where}: the kill missed: the run ended first (exit {rc})\n{tail}"
        assert reached < fu.DONE, f"{where}: the kill came after the stage had finished"
    if stage == "data":
        _compare_files(os.path.join(ref, "data"), os.path.join(run, "data"), where)
    elif stage == "rers":
        _compare_rers(ref, run, where)
    elif stage == "export":
        _compare_files(os.path.join(ref, "hf"), os.path.join(run, "hf"), where)
        da = fu.read_json(os.path.join(ref, "export", "stage_done.json"), ref)
        db = fu.read_json(os.path.join(run, "export", "stage_done.json"), run)
        assert db == da, f"{where}: export stage_done.json differs in {fu.diff_keys(da, db)}"
    else:
        _compare_training_stage(stage, ref, run, where)
    if stage == "grpo":  # the comparison means something only if GRPO moved the policy
        start = fu.checkpoint_arrays(os.path.join(ref, "rers_sft", "checkpoints", str(_finished_steps(
            os.path.join(ref, "rers_sft"))[-1])))
        end = fu.checkpoint_arrays(os.path.join(ref, "grpo", "checkpoints", str(_finished_steps(
            os.path.join(ref, "grpo"))[-1])))
        moved = [k for k in start if k.startswith("params") and not np.array_equal(start[k], end[k])]
        assert moved, "GRPO left every parameter as RERS-SFT gave it: no group had reward variance"


@pytest.mark.slow
def test_reruns_leave_no_partial_files(reference, killed):
    """After the kills and the rerun the run dir holds the paths the reference holds: no half-written checkpoint
    step, temp file or temporary export directory is left behind. Names that differ between any two runs are
    left out: TensorBoard event files (named by host and time) and the data files of orbax's OCDBT store (named
    by content hash / at random, under `<item>/d/` and `<item>/ocdbt.process_<i>/d/`)."""
    ref, _ = reference
    run, _, _ = killed

    def listing(root):
        out = set()
        for dirpath, dirs, files in os.walk(root):
            parts = os.path.relpath(dirpath, root).split(os.sep)
            if "tb" in parts:
                continue
            names = dirs if parts[-1] == "d" and "checkpoints" in parts else dirs + files
            out |= {os.path.normpath(os.path.join(*parts, n)) for n in names}
        return out

    extra = sorted(listing(run) - listing(ref))
    missing = sorted(listing(ref) - listing(run))
    assert not extra and not missing, f"{_where()}: left behind {extra[:10]}; missing {missing[:10]}"


# --- full disk in the middle of a checkpoint save -------------------------------------------------------------------
def _states(hf_dir: str):
    """(two different TrainStates of the mini model with a real optimiser state, the restore target, model config)."""
    import jax

    from configs.knowledge_sft import get_config
    from raredx_jax.checkpoints import hf_io
    from raredx_jax.parallel.mesh import single_device_mesh
    from raredx_jax.training.optim import make_optimizer
    from raredx_jax.training.state import (
        abstract_params,
        abstract_train_state,
        cast_params,
        create_train_state,
        split_model,
        train_state_shardings,
    )

    mesh = single_device_mesh()
    model = hf_io.load_hf_model(hf_dir, mesh)
    cfg = model.config
    tx, _ = make_optimizer(get_config("cpu").optim, 10)
    _, params_abs, param_sh = abstract_params(cfg, mesh)
    shardings = train_state_shardings(tx, params_abs, param_sh, mesh)
    state = create_train_state(cast_params(split_model(model)[1], param_sh, cfg.param_dtype), tx, 0, shardings)

    def step(s):  # one real optimiser update (gradient = the parameters), so the moments are not zero
        updates, opt = tx.update(s.params, s.opt_state, s.params)
        return s.replace(step=s.step + 1, params=jax.tree.map(lambda p, u: p + u, s.params, updates), opt_state=opt)

    s1 = step(state)
    return s1, step(s1), abstract_train_state(tx, params_abs, shardings), cfg, mesh


def _host(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _same(a, b) -> bool:
    ha, hb = _host(a), _host(b)
    return len(ha) == len(hb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(ha, hb))


def full_disk_case(states, run: str, async_save: bool, draw) -> str:
    """Save step 1, then step 2 with the disk full from its write `draw(number of writes a save makes)` on; check
    step 1 is what a rerun finds, restores and loads, and that step 2 saves once space is back. Returns the case."""
    from raredx_jax.checkpoints import orbax as orbax_io
    from raredx_jax.checkpoints.manager import TrainCheckpointManager
    from raredx_jax.training.state import split_model

    s1, s2, target, cfg, mesh = states
    # keep=1: the strictest case, the good step is the only one and must not be removed for a save that failed
    mngr = TrainCheckpointManager(run, keep=1, async_save=async_save)
    with fu.DiskFull() as count:
        mngr.save(1, s1, cfg, data_state={"pos": 1}, meta={"stage": "fault"})
        mngr.wait()
    fail_at = draw(count.calls)
    where = f"{_where()}: disk full from write {fail_at} of {count.calls} of the save of step 2 (async={async_save})"
    with fu.DiskFull(fail_at) as disk:
        with pytest.raises(Exception) as err:  # the failed save must not pass silently
            mngr.save(2, s2, cfg, data_state={"pos": 2}, meta={"stage": "fault"})
            mngr.wait()
        try:
            mngr.close()
        except Exception:  # noqa: BLE001 - the same error may surface again on close
            pass
    fu.wait_quiet(os.path.join(run, "checkpoints"))  # the failed process is gone: no write of it still in flight
    assert disk.failed, where
    chain, e = [], err.value
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain) or "No space left" in str(
        err.value), f"{where}: the error does not say the disk is full: {type(err.value).__name__}: {err.value}"

    # a rerun (new manager, as a new process makes) finds step 1, restores it bit for bit; later stages load it
    mngr = TrainCheckpointManager(run, keep=1, async_save=async_save)
    assert mngr.steps() == [1], f"{where}: steps after the failed save {mngr.steps()} (dir: " \
                                f"{sorted(os.listdir(os.path.join(run, 'checkpoints')))})"
    got = mngr.restore(target)
    assert got is not None and got.step == 1 and got.data_state == {"pos": 1}, where
    assert _same(got.state.params, s1.params) and _same(got.state.opt_state, s1.opt_state), where
    assert _same(got.state.rng, s1.rng), where
    latest = orbax_io.latest_checkpoint(os.path.join(run, "checkpoints"))
    assert latest == os.path.join(run, "checkpoints", "1"), where
    assert _same(split_model(orbax_io.load_model(latest, mesh))[1], s1.params), where
    # space is back: step 2 saves and replaces step 1 (keep=1)
    mngr.save(2, s2, cfg, data_state={"pos": 2}, meta={"stage": "fault"})
    mngr.close()
    mngr = TrainCheckpointManager(run, keep=1, async_save=async_save)
    got = mngr.restore(target)
    assert mngr.steps() == [2] and got.step == 2 and _same(got.state.params, s2.params), where
    mngr.close()
    assert not os.path.isdir(os.path.join(run, "checkpoints_corrupt")), f"{where}: a good step was quarantined"
    return where


@pytest.fixture(scope="module")
def states(world):
    return _states(world["hf"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop closing on error
@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_mid_checkpoint_keeps_the_last_good_one(states, tmp_path, async_save):
    rng = random.Random(SEED + async_save)
    where = full_disk_case(states, str(tmp_path / "run"), async_save, lambda n: rng.randint(1, n))
    print(f"\n{where}", flush=True)
