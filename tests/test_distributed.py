"""jax.distributed start-up: settings resolution (pure) and a real 2-process x 4-CPU-device run on loopback."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
    with open(sys.argv[1], "w") as f:
        json.dump({{"info": [info.process_index, info.process_count, info.local_devices,
                             info.global_devices, info.source], "primary": is_primary(), "out": out}}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path, n_procs, devices_per_proc, deadline_s=50.0):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAREDX_", "TPU_"))}
    base_env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}",
                    PYTHONPATH=str(REPO), RAREDX_INIT_TIMEOUT="40")
    port = _free_port()
    procs, outs = [], []
    for i in range(n_procs):
        env = dict(base_env)
        if n_procs > 1:
            env.update(RAREDX_COORDINATOR=f"127.0.0.1:{port}", RAREDX_NUM_PROCESSES=str(n_procs),
                       RAREDX_PROCESS_ID=str(i))
        out = tmp_path / f"result-{n_procs}-{i}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    end = time.monotonic() + deadline_s
    logs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
            logs.append(stdout)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{n_procs}-process run hung for {deadline_s} s; output so far: {logs}")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{log[-4000:]}"
    return [json.loads(o.read_text()) for o in outs]


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
