"""jax.distributed start-up: settings resolution (pure) and a real 2-process x 4-CPU-device run on loopback."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from raredx_jax.parallel import distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import base  # noqa: E402


# --------------------------------------------------------------------------------------------------------
# resolve_settings: which source wins, without starting anything
# --------------------------------------------------------------------------------------------------------
def _config(**distributed):
    c = base.get_config("cpu")
    for k, v in distributed.items():
        c.distributed[k] = v
    return c


def test_single_process_by_default():
    assert dist.resolve_settings(_config(), environ={}) is None


def test_off_ignores_environment():
    env = {"RAREDX_COORDINATOR": "h0:1", "RAREDX_NUM_PROCESSES": "2", "RAREDX_PROCESS_ID": "1"}
    assert dist.resolve_settings(_config(initialize="off"), environ=env) is None


def test_raredx_environment():
    env = {"RAREDX_COORDINATOR": "h0:1234", "RAREDX_NUM_PROCESSES": "4", "RAREDX_PROCESS_ID": "3",
           "RAREDX_LOCAL_DEVICE_IDS": "3"}
    s = dist.resolve_settings(_config(), environ=env)
    assert s == dist.DistributedSettings("h0:1234", 4, 3, (3,), "env")


def test_config_overrides_environment_and_default_port():
    env = {"RAREDX_COORDINATOR": "h0:1234", "RAREDX_NUM_PROCESSES": "4", "RAREDX_PROCESS_ID": "3"}
    s = dist.resolve_settings(_config(coordinator_address="10.0.0.7", process_id=1), environ=env)
    assert s.coordinator_address == f"10.0.0.7:{dist.DEFAULT_COORDINATOR_PORT}"
    assert (s.num_processes, s.process_id, s.source) == (4, 1, "config")


def test_one_process_is_single_in_auto_but_started_when_on():
    env = {"RAREDX_COORDINATOR": "h0:1", "RAREDX_NUM_PROCESSES": "1", "RAREDX_PROCESS_ID": "0"}
    assert dist.resolve_settings(_config(), environ=env) is None
    assert dist.resolve_settings(_config(initialize="on"), environ=env).num_processes == 1


def test_slurm_step():
    env = {"SLURM_JOB_ID": "4100", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5",
           "SLURM_LOCALID": "5", "SLURM_STEP_NODELIST": "gpu[007-008,010],login1"}
    s = dist.resolve_settings(_config(), environ=env)
    assert s == dist.DistributedSettings(f"gpu007:{61440 + 4100 % 4096}", 16, 5, None, "slurm")
    s = dist.resolve_settings(_config(), environ={**env, "RAREDX_COORDINATOR_PORT": "7777"})
    assert s.coordinator_address == "gpu007:7777"
    # the batch step of an allocation (no srun, no step nodelist) is one process
    batch_only = {k: v for k, v in env.items() if not k.startswith("SLURM_STEP")}
    assert dist.resolve_settings(_config(), environ=batch_only) is None


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("node1,node2", "node1"), ("gpu[003-005,9],cpu1", "gpu003"),
    ("a[10,2]", "a10"), ("n[1-2]-ib,x", "n1-ib"), ("host-a", "host-a")])
def test_first_slurm_host(nodelist, first):
    assert dist.first_slurm_host(nodelist) == first


@pytest.mark.parametrize("env, config, message", [
    ({"RAREDX_COORDINATOR": "h0:1"}, {}, "num_processes"),
    ({"RAREDX_COORDINATOR": "h0:1", "RAREDX_NUM_PROCESSES": "2", "RAREDX_PROCESS_ID": "2"}, {}, "process_id=2"),
    ({"RAREDX_NUM_PROCESSES": "two"}, {}, "RAREDX_NUM_PROCESSES"),
    ({}, {"initialize": "maybe"}, "config.distributed.initialize"),
])
def test_bad_settings_name_the_field(env, config, message):
    with pytest.raises(ValueError, match=message):
        dist.resolve_settings(_config(**config), environ=env)


def test_single_process_info_and_idempotent():
    info = dist.maybe_initialize(_config(initialize="off"))
    assert info == dist.maybe_initialize(_config(initialize="off"))
    assert (info.process_index, info.process_count, info.source) == (0, 1, "single")
    assert info.global_devices == info.local_devices >= 1
    assert dist.is_primary() and info.is_primary


# --------------------------------------------------------------------------------------------------------
# 2 processes x 4 CPU devices on loopback == 1 process x 8 devices
# --------------------------------------------------------------------------------------------------------
WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    from configs import base
    from raredx_jax.parallel.distributed import maybe_initialize, is_primary

    config = base.get_config("cpu")
    info = maybe_initialize(config)
    assert maybe_initialize(config) == info  # idempotent

    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))  # process-major: data spans hosts
    rows, cols = 16, 64
    full = np.arange(rows * cols, dtype=np.int32).reshape(rows, cols)
    per = rows // jax.process_count()
    local = full[jax.process_index() * per:(jax.process_index() + 1) * per]  # this host's shard only
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data", "fsdp")), local, (rows, cols))

    @jax.jit
    def reduce(x):
        y = x.astype(jnp.float32) / x.size
        return {{"sum": jnp.sum(x), "gram": jnp.sum(y @ y.T), "sin": jnp.sum(jnp.sin(y))}}

    with jax.set_mesh(mesh):
        out = jax.jit(reduce, out_shardings=NamedSharding(mesh, P()))(x)
    out = {{k: np.asarray(v).item() for k, v in out.items()}}
    with open(f"{{sys.argv[1]}}/result-{{info.process_count}}-{{info.process_index}}.json", "w") as f:
        json.dump({{"info": [info.process_index, info.process_count, info.local_devices,
                             info.global_devices, info.source], "primary": is_primary(), "out": out}}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, tag, argv, n_procs, devices_per_proc, deadline_s=50.0, xla_flags=""):
    """Start `argv` (+ process index) as `n_procs` JAX processes with `devices_per_proc` CPU devices each, joined
    over jax.distributed on a free loopback port when n_procs > 1 (via the RAREDX_* variables maybe_initialize
    reads). Waits for all; on a failure or a hang every process is stopped and all their output is shown."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAREDX_", "TPU_"))}
    base_env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), RAREDX_INIT_TIMEOUT="40",
                    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc} {xla_flags}".strip())
    port = _free_port()
    procs, logs = [], []
    for i in range(n_procs):
        env = dict(base_env)
        if n_procs > 1:
            env.update(RAREDX_COORDINATOR=f"127.0.0.1:{port}", RAREDX_NUM_PROCESSES=str(n_procs),
                       RAREDX_PROCESS_ID=str(i))
        logs.append(tmp_path / f"{tag}-{n_procs}x{devices_per_proc}-{i}.log")
        with open(logs[-1], "w") as log:  # a file, not a pipe: a chatty process never blocks on a full pipe
            procs.append(subprocess.Popen([sys.executable, *map(str, argv), str(i)], env=env, cwd=REPO,
                                          stdout=log, stderr=subprocess.STDOUT))
    end = time.monotonic() + deadline_s
    failure = None
    while failure is None and any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            failure = "a process failed; the others were stopped"
        elif time.monotonic() > end:
            failure = f"hung for {deadline_s:.0f} s"
        else:
            time.sleep(0.1)
    if failure is None and any(p.returncode != 0 for p in procs):
        failure = "a process failed"
    if failure is not None:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        report = "\n".join(f"--- process {i} (rc={p.returncode}):\n{log.read_text()[-6000:]}"
                            for i, (p, log) in enumerate(zip(procs, logs)))
        pytest.fail(f"{tag}: {n_procs}-process run {failure}\n{report}")
    return [log.read_text() for log in logs]


def _run_workers(tmp_path, n_procs, devices_per_proc, deadline_s=50.0):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    _launch(tmp_path, "reduce", [script, tmp_path], n_procs, devices_per_proc, deadline_s)
    return [json.loads((tmp_path / f"result-{n_procs}-{i}.json").read_text()) for i in range(n_procs)]


def test_two_processes_on_loopback_match_one_process(tmp_path):
    two = _run_workers(tmp_path, n_procs=2, devices_per_proc=4)
    one = _run_workers(tmp_path, n_procs=1, devices_per_proc=8)[0]

    assert [r["info"] for r in two] == [[0, 2, 4, 8, "env"], [1, 2, 4, 8, "env"]]
    assert [r["primary"] for r in two] == [True, False]
    assert one["info"] == [0, 1, 8, 8, "single"]

    n = 16 * 64
    assert two[0]["out"]["sum"] == two[1]["out"]["sum"] == one["out"]["sum"] == n * (n - 1) // 2
    assert two[0]["out"] == two[1]["out"]  # every process sees the same global result
    for key in ("gram", "sin"):
        assert two[0]["out"][key] == pytest.approx(one["out"][key], rel=1e-5)


# --------------------------------------------------------------------------------------------------------
# training across processes: an SFT and a GRPO train step on 2 processes x 4 CPU devices == 1 process x 8,
# and a train checkpoint saved by 2 processes restores in 1 and vice versa. The worker is this file run as a
# script (`_train_worker` below); one run per topology does the steps and the saves, so JAX starts 3 times.
# --------------------------------------------------------------------------------------------------------
TRAIN_MESH = {"data": 1, "fsdp": 4, "tensor": 2}  # fsdp spans both processes: parameters, moments and checkpoint
#                                                   shards really are split across hosts (tensor stays within one)
TINY = dict(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, tie_word_embeddings=True, attention_bias=True, max_position_embeddings=128)
OPT = {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01, "grad_clip": 1.0}
SFT_BATCH, SFT_SEQ, SFT_ACCUM, SFT_STEPS = 8, 32, 2, 2  # 8 rows: 2 micro-batches of 4 rows over data x fsdp = 4
GRPO = dict(steps=4, prompts_per_step=3, group_size=4, minibatch_size=8, micro_batch_size=4, loss="grpo",
            old_logprobs="sampler", beta=0.0,  # 12 rows: 2 updates (the 2nd padded)
            filter_groups="none")  # the synthetic rollout's reward has no `pass`: train on every group
GRPO_OPTIM = dict(lr=1e-3, weight_decay=0.0, warmup_steps=0, schedule="constant", min_lr_ratio=1.0, b2=0.99)
GRPO_METRICS = ("loss", "pg_loss", "grad_norm", "clip_fraction", "approx_kl", "ratio_mean", "entropy", "tokens",
                "rows")


def _data_state(process: int, count: int) -> dict:
    return {"process": process, "of": count, "next_index": 100 + process}


def _tiny_params(cfg, shardings):
    """Random-init parameters filled from numpy with a fixed seed (identical on every process), placed as global
    arrays: each process builds only its addressable shards."""
    import jax
    import numpy as np
    from flax import nnx

    from raredx_jax.models.transformer import Transformer

    _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def init(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return np.ones(x.shape, x.dtype)
        if "bias" in name:
            return (0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
        return (rng.standard_normal(x.shape) * 0.7 / np.sqrt(x.shape[1] if x.ndim > 2 else x.shape[-1])).astype(x.dtype)

    host = jax.tree_util.tree_map_with_path(init, state.to_pure_dict())
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), host, shardings)


def _sft_batch() -> dict:
    """A full global [B, T] SFT batch: two packed sequences per row, a masked prompt in each, padding at the end."""
    import numpy as np

    rng = np.random.default_rng(7)
    b, t = SFT_BATCH, SFT_SEQ
    tokens = rng.integers(1, TINY["vocab_size"], (b, t)).astype(np.int32)
    seg, pos, mask = (np.zeros((b, t), np.int32) for _ in range(3))
    for r in range(b):
        cut, end = int(rng.integers(8, 20)), t - int(rng.integers(0, 6))
        for sid, (lo, hi) in enumerate(((0, cut), (cut, end)), start=1):
            seg[r, lo:hi] = sid
            pos[r, lo:hi] = np.arange(hi - lo)
            mask[r, lo + int(rng.integers(1, 5)):hi] = 1
    return {"tokens": np.where(seg > 0, tokens, 0), "segment_ids": seg, "positions": pos, "loss_mask": mask}


def _grpo_rollout():
    """A fixed synthetic rollout (conftest.synthetic_rollout) of the GRPO test shape."""
    from grpo_fixtures import synthetic_rollout

    return synthetic_rollout(GRPO["prompts_per_step"], GRPO["group_size"], 8, 16, seed=11,
                             vocab=64, logprob_range=(3.0, 5.0))


def _process_rows(sharding, shape) -> tuple[int, int]:
    """The contiguous block of global rows this process's devices hold under `sharding`."""
    spans = sorted({(s[0].start or 0, shape[0] if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map(shape).values()})
    lo, hi = spans[0][0], spans[-1][1]
    assert sum(b - a for a, b in spans) == hi - lo, f"rows of this process are not contiguous: {spans}"
    return lo, hi


def _train_worker(spec_path: str, process_id: str) -> None:
    """One process of a topology: `spec` says whether to train + save and which checkpoints to restore."""
    t0 = time.time()
    spec = json.loads(Path(spec_path).read_text())
    info = dist.maybe_initialize(base.get_config("cpu"))  # first JAX call
    assert info.process_index == int(process_id) and info.global_devices == 8, info

    import jax
    from jax.sharding import NamedSharding

    from raredx_jax.checkpoints.manager import TrainCheckpointManager
    from raredx_jax.models.config import ModelConfig
    from raredx_jax.parallel.mesh import make_mesh
    from raredx_jax.parallel.sharding import logical_to_spec
    from raredx_jax.sampling.sampler import SamplingParams
    from raredx_jax.training import lm
    from raredx_jax.training.grpo import GRPOLearner, GRPOSettings
    from raredx_jax.training.optim import OptimizerSettings, make_optimizer
    from raredx_jax.training.state import (
        abstract_params,
        abstract_train_state,
        create_train_state,
        train_state_shardings,
    )

    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest does in-process
    out_dir = Path(spec["out"])
    me, n = jax.process_index(), jax.process_count()
    result: dict = {"info": [me, n, info.local_devices, info.source]}

    def to_host(tree):
        """Every leaf as a full numpy array (all processes take part): one replicating jit per tree structure."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), replicate(tree))

    def dump(name, tree):
        flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(to_host(tree))[0]}
        if me == 0:
            np.savez(out_dir / f"{name}.npz", **flat)

    mesh = make_mesh(TRAIN_MESH)
    cfg = ModelConfig(**TINY)
    graphdef, params_abs, param_sh = abstract_params(cfg, mesh)
    tx, schedule = make_optimizer(OPT, total_steps=10, lr=OPT["lr"])
    shardings = train_state_shardings(tx, params_abs, param_sh, mesh)
    replicate = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, jax.sharding.PartitionSpec()))
    timings = result["seconds"] = {}  # where the time goes (compilation, mostly), for whoever reads the result

    def lap(what):
        nonlocal t0
        timings[what] = round(time.time() - t0, 2)
        t0 = time.time()

    lap("start")

    if spec["train"]:
        with jax.set_mesh(mesh):
            # --- SFT: the trainer's jitted step; this process feeds only its rows (lm.to_global)
            b_sh = lm.batch_sharding(mesh, SFT_BATCH, SFT_SEQ)
            lo, hi = _process_rows(b_sh, (SFT_BATCH, SFT_SEQ))
            step = lm.make_train_step(graphdef, tx, schedule, shardings, mesh, (SFT_BATCH, SFT_SEQ),
                                       grad_accum=SFT_ACCUM)
            state = create_train_state(_tiny_params(cfg, param_sh), tx, 0, shardings)
            sft_metrics = []
            local_rows = {k: v[lo:hi] for k, v in _sft_batch().items()}
            for _ in range(SFT_STEPS):  # the same batch twice: the second loss shows the first update
                state, m = step(state, lm.to_global(local_rows, b_sh))
                sft_metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
            result["sft"] = {"rows": [lo, hi], "metrics": sft_metrics}
            dump("sft_params", state.params)
            lap("sft")

            # --- GRPO: the learner's own update (GRPOLearner.learn: mini-batches, padding, micro-batches) on a fixed
            # rollout. The learner holds the whole rollout on every host (rollouts are gathered after sampling)
            # and places only this process's shards; then one more update through the same jitted function fed
            # with this process's rows only.
            sp = SamplingParams(temperature=1.0, max_new_tokens=16, max_prompt_len=8, batch_size=4)
            learner = GRPOLearner(cfg, None, None, GRPOSettings(**GRPO), sp, mesh, seed=0,
                                  optimizer=OptimizerSettings(**GRPO_OPTIM))
            learner.set_state(create_train_state(_tiny_params(cfg, learner.param_sh), learner.tx, 0,
                                                 learner.state_sh))
            batch = _grpo_rollout()
            learn = learner.learn(batch, 1)
            update, _ = learner._functions(batch.prompt_len, batch.completion_len)  # learn()'s compiled update
            rows = learner.layout.padded
            g_lo, g_hi = _process_rows(NamedSharding(mesh, logical_to_spec(("batch",), (rows,), mesh)), (rows,))
            full = batch.train_arrays(np.arange(rows), rows)
            local = {}
            for k, v in full.items():
                sh = NamedSharding(mesh, logical_to_spec(("batch", "length")[:v.ndim], v.shape, mesh))
                local[k] = jax.make_array_from_process_local_data(sh, v[g_lo:g_hi], v.shape)
            learner.state, m = update(learner.state, local, jax.device_put(np.int32(1), NamedSharding(
                mesh, jax.sharding.PartitionSpec())))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            result["grpo"] = {"learn": {k: learn[k] for k in GRPO_METRICS + ("updates",)},
                              "local": {k: m[k] for k in GRPO_METRICS}, "rows": [g_lo, g_hi],
                              "step": int(jax.device_get(learner.state.step))}
            dump("grpo_params", learner.state.params)
            lap("grpo")

        # --- checkpoint of the SFT state (sharded over both processes when n == 2), with per-process data state
        ckpt = TrainCheckpointManager(spec["save"], keep=2, async_save=True)
        ckpt.save(SFT_STEPS, state, cfg, data_state=_data_state(me, n), meta={"stage": "test", "processes": n})
        ckpt.close()
        dump("saved", state)
        lap("save")

    for name, run_dir in spec["restore"].items():
        ckpt = TrainCheckpointManager(run_dir, keep=2)
        target = abstract_train_state(tx, params_abs, shardings)
        with jax.set_mesh(mesh):
            r = ckpt.restore(target)
        ckpt.close()
        placed = jax.tree.map(lambda x, t: x.sharding.is_equivalent_to(t.sharding, x.ndim), r.state, target)
        result[f"restored_{name}"] = {"step": r.step, "data_state": r.data_state, "meta": r.meta,
                                      "model_config": r.model_config, "placed": all(jax.tree.leaves(placed)),
                                      "quarantined": os.path.isdir(os.path.join(run_dir, "checkpoints_corrupt"))}
        dump(f"restored_{name}", r.state)
        lap(f"restore_{name}")

    (out_dir / f"result-{me}.json").write_text(json.dumps(result))


def _topology_run(tmp_path, name, n_procs, train, save=None, restore=None):
    out = tmp_path / name
    out.mkdir()
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "train": train, "save": save, "restore": restore or {}}))
    # LLVM at -O0 halves the compile time that dominates these runs; the HLO (SPMD partitioning, collectives) is
    # unchanged and every topology runs under the same flags
    logs = _launch(tmp_path, name, [__file__, "train-worker", spec], n_procs, 8 // n_procs, deadline_s=150.0,
                   xla_flags="--xla_backend_optimization_level=0")
    return {"results": [json.loads((out / f"result-{i}.json").read_text()) for i in range(n_procs)], "logs": logs,
            "npz": lambda what: dict(np.load(out / f"{what}.npz"))}


@pytest.fixture(scope="module")
def topologies(tmp_path_factory):
    """Three runs (each a fresh set of JAX processes): 1 process trains, saves checkpoint `by_1` and restores it;
    2 processes train, save `by_2`, restore it and `by_1`; 1 process restores `by_2`."""
    tmp = tmp_path_factory.mktemp("multiprocess_training")
    by_1, by_2 = str(tmp / "ckpt_by_1"), str(tmp / "ckpt_by_2")
    one = _topology_run(tmp, "one", 1, True, save=by_1, restore={"same": by_1})
    two = _topology_run(tmp, "two", 2, True, save=by_2, restore={"same": by_2, "from_one": by_1})
    back = _topology_run(tmp, "one_restores", 1, False, restore={"from_two": by_2})
    return {"one": one, "two": two, "back": back}


def _assert_trees(a: dict, b: dict, exact: bool, what: str):
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what} {k}"
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what} {k}")
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"{what} {k}")


def test_sft_step_on_two_processes_matches_one(topologies):
    two, one = topologies["two"]["results"], topologies["one"]["results"][0]
    assert [r["info"] for r in two] == [[0, 2, 4, "env"], [1, 2, 4, "env"]] and one["info"] == [0, 1, 8, "single"]
    # each process fed only its own half of the global batch; the single process fed all of it
    assert [r["sft"]["rows"] for r in two] == [[0, SFT_BATCH // 2], [SFT_BATCH // 2, SFT_BATCH]]
    assert one["sft"]["rows"] == [0, SFT_BATCH]
    assert two[0]["sft"]["metrics"] == two[1]["sft"]["metrics"]  # the same global scalars on every process
    for m2, m1 in zip(two[0]["sft"]["metrics"], one["sft"]["metrics"]):
        assert m2["ok"] and m1["ok"] and m2["targets"] == m1["targets"] > 0
        for k in ("loss", "grad_norm"):
            assert m2[k] == pytest.approx(m1[k], rel=1e-5), k
    losses = [m["loss"] for m in one["sft"]["metrics"]]
    assert losses[1] < losses[0]  # the same batch twice: the first update was applied (identically, see above)
    _assert_trees(topologies["two"]["npz"]("sft_params"), topologies["one"]["npz"]("sft_params"), False,
                  "params after the SFT steps")


def test_grpo_step_on_two_processes_matches_one(topologies):
    two, one = topologies["two"]["results"], topologies["one"]["results"][0]
    assert one["grpo"]["learn"]["updates"] == 2 and one["grpo"]["step"] == two[0]["grpo"]["step"] == 2
    assert one["grpo"]["learn"]["rows"] == (8 + 4) / 2  # mean real rows of the 2 updates (12 = 8 + 4 padded)
    assert one["grpo"]["learn"]["clip_fraction"] > 0  # the clipped branch of the loss is exercised
    assert [r["grpo"]["rows"] for r in two] == [[0, 4], [4, 8]] and one["grpo"]["rows"] == [0, 8]
    assert two[0]["grpo"]["learn"] == two[1]["grpo"]["learn"] and two[0]["grpo"]["local"] == two[1]["grpo"]["local"]
    for part in ("learn", "local"):
        for k in GRPO_METRICS:
            assert two[0]["grpo"][part][k] == pytest.approx(one["grpo"][part][k], rel=1e-5, abs=1e-8), (part, k)
    _assert_trees(topologies["two"]["npz"]("grpo_params"), topologies["one"]["npz"]("grpo_params"), False,
                  "params after the GRPO updates")


def _check_restored(run, name, saved, data_state):
    restored = run["npz"](f"restored_{name}")
    for i, rec in enumerate(r[f"restored_{name}"] for r in run["results"]):
        assert rec["step"] == rec["meta"]["step"] == SFT_STEPS and rec["placed"] and not rec["quarantined"]
        assert rec["model_config"]["hidden_size"] == TINY["hidden_size"]
        assert rec["data_state"] == data_state(i), f"process {i}"
    _assert_trees(saved, restored, True, f"state restored ({name})")  # params, opt_state, step, rng: bit-exact


def test_checkpoint_saved_by_two_processes_restores_in_one(topologies):
    two, back = topologies["two"], topologies["back"]
    saved = two["npz"]("saved")
    assert any("opt_state" in k for k in saved) and any("step" in k for k in saved) and len(saved) > 20
    # same topology: each process gets its own data iterator state back
    _check_restored(two, "same", saved, lambda i: _data_state(i, 2))
    # one process: arrays resharded onto its mesh; the 2 processes' data iterator states do not apply (a warning)
    _check_restored(back, "from_two", saved, lambda i: None)
    assert "data iterator state was saved by 2 process(es), this run has 1" in back["logs"][0]


def test_checkpoint_saved_by_one_process_restores_in_two(topologies):
    one, two = topologies["one"], topologies["two"]
    saved = one["npz"]("saved")
    _check_restored(one, "same", saved, lambda i: _data_state(i, 1))
    _check_restored(two, "from_one", saved, lambda i: None)
    assert "data iterator state was saved by 1 process(es), this run has 2" in two["logs"][0]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "train-worker":
    _train_worker(sys.argv[2], sys.argv[3])
