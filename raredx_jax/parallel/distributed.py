"""Multi-process JAX: start `jax.distributed` from the config or the launcher's environment, once.

Call `maybe_initialize(config)` first thing in every entry point, before any other JAX call (it must run
before the XLA backends start). Where the settings come from, first match wins, field by field:

1. `config.distributed.{coordinator_address, num_processes, process_id}` (set on the command line with
   `--config.distributed.coordinator_address=host0:8476` ...; "" / 0 / -1 = unset);
2. the environment the launchers in `launch/` export: `RAREDX_COORDINATOR` (host:port),
   `RAREDX_NUM_PROCESSES`, `RAREDX_PROCESS_ID`, optionally `RAREDX_LOCAL_DEVICE_IDS` ("0" or "0,1": the
   GPUs this process drives, for one process per GPU) and `RAREDX_COORDINATOR_PORT`;
3. a SLURM job step (`srun`): `SLURM_STEP_NUM_TASKS`/`SLURM_NTASKS`, `SLURM_PROCID`, and the first host of
   `SLURM_STEP_NODELIST` as coordinator (port `RAREDX_COORDINATOR_PORT` or derived from SLURM_JOB_ID);
4. a Cloud TPU VM: `jax.distributed.initialize()` with no arguments; JAX reads the pod's workers from the
   TPU metadata server.

`config.distributed.initialize`: `auto` starts jax.distributed only when one of the above says there is more
than one process; `on` always starts it (falling back to JAX's own cluster detection); `off` never does.

On CPU, cross-process collectives need an implementation: gloo is selected (unless one was chosen already),
which is what lets tests run 2 processes x 4 CPU devices on loopback like a 2-host cluster.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import re
from collections.abc import Mapping

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "RAREDX_COORDINATOR"
ENV_NUM_PROCESSES = "RAREDX_NUM_PROCESSES"
ENV_PROCESS_ID = "RAREDX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "RAREDX_LOCAL_DEVICE_IDS"
ENV_COORDINATOR_PORT = "RAREDX_COORDINATOR_PORT"
ENV_INIT_TIMEOUT = "RAREDX_INIT_TIMEOUT"  # seconds to wait for every process to connect (default 300)
DEFAULT_COORDINATOR_PORT = 8476
MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What this process is part of. Device fields are counts."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    coordinator_address: str = ""
    source: str = "single"  # single | config | env | slurm | tpu | jax

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0

    def __str__(self) -> str:
        where = f" via {self.source}" + (f" at {self.coordinator_address}" if self.coordinator_address else "")
        return (f"process {self.process_index}/{self.process_count}, {self.local_devices} local of "
                f"{self.global_devices} devices{where if self.process_count > 1 else ''}")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Arguments for jax.distributed.initialize; None fields are left to JAX's cluster detection."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    source: str  # config | env | slurm | tpu | jax


_STATE: dict = {}


def _get(config, key, default):
    dist = getattr(config, "distributed", None) if config is not None else None
    if dist is None:
        return default
    try:
        return dist[key]
    except (KeyError, AttributeError):
        return default


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: 'gpu[003-005,9],cpu1' -> 'gpu003' (zero padding kept)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM nodelist")
    m = re.match(r"([^\[,]*)(?:\[([^\]]*)\])?", nodelist)
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    rest = nodelist[m.end():]
    # a suffix after the bracket belongs to the same host name ('n[1-2]-ib' -> 'n1-ib')
    suffix = re.match(r"[^,\[]*", rest).group(0)
    return f"{prefix}{first}{suffix}"


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
    if environ.get("TPU_SKIP_MDS_QUERY"):
        return bool(environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES"))
    hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES") or ""
    if "," in hosts or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    has_chips = bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_chips and importlib.util.find_spec("libtpu") is not None


def resolve_settings(config=None, environ: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """How to start jax.distributed for this process, or None for a single process. Pure (no JAX calls)."""
    environ = os.environ if environ is None else environ
    mode = str(_get(config, "initialize", "auto")).lower()
    if mode not in MODES:
        raise ValueError(f"config.distributed.initialize={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return None

    cfg_coord = str(_get(config, "coordinator_address", "") or "")
    cfg_num = int(_get(config, "num_processes", 0) or 0)
    cfg_pid = int(_get(config, "process_id", -1))
    env_coord = environ.get(ENV_COORDINATOR, "").strip()
    env_num = _int_env(environ, ENV_NUM_PROCESSES)
    env_pid = _int_env(environ, ENV_PROCESS_ID)
    port = _int_env(environ, ENV_COORDINATOR_PORT)
    local_ids_raw = environ.get(ENV_LOCAL_DEVICE_IDS, "").strip()
    try:
        local_ids = tuple(int(x) for x in local_ids_raw.split(",")) if local_ids_raw else None
    except ValueError:
        raise ValueError(f"{ENV_LOCAL_DEVICE_IDS}={local_ids_raw!r}: expected comma-separated integers") from None

    coord = cfg_coord or env_coord or None
    num = cfg_num if cfg_num > 0 else env_num
    pid = cfg_pid if cfg_pid >= 0 else env_pid
    explicit = coord is not None or num is not None or pid is not None
    source = "config" if (cfg_coord or cfg_num > 0 or cfg_pid >= 0) else "env"

    slurm = None
    if "SLURM_STEP_NODELIST" in environ and "SLURM_PROCID" in environ:
        slurm_num = _int_env(environ, "SLURM_STEP_NUM_TASKS") or _int_env(environ, "SLURM_NTASKS")
        if slurm_num:
            job = _int_env(environ, "SLURM_JOB_ID") or 0
            slurm_port = port or (61440 + job % 4096)  # same rule as JAX's SLURM detection
            slurm = (f"{first_slurm_host(environ['SLURM_STEP_NODELIST'])}:{slurm_port}",
                     slurm_num, _int_env(environ, "SLURM_PROCID"))

    if not explicit and slurm is not None:
        coord, num, pid = slurm
        source = "slurm"
        explicit = True
    elif explicit and slurm is not None:  # e.g. RAREDX_COORDINATOR set, ids from srun
        coord = coord or slurm[0]
        num = num if num is not None else slurm[1]
        pid = pid if pid is not None else slurm[2]

    if explicit:
        missing = [f"{field} (config.distributed.{field} or {var})" for field, var, value in (
            ("coordinator_address", ENV_COORDINATOR, coord),
            ("num_processes", ENV_NUM_PROCESSES, num),
            ("process_id", ENV_PROCESS_ID, pid)) if value is None]
        if missing:
            raise ValueError("multi-process settings are incomplete, missing: " + "; ".join(missing))
        if ":" not in coord.rsplit("]", 1)[-1]:
            coord = f"{coord}:{port or DEFAULT_COORDINATOR_PORT}"
        if num < 1:
            raise ValueError(f"num_processes={num} ({source}) must be >= 1")
        if not 0 <= pid < num:
            raise ValueError(f"process_id={pid} ({source}) must be in [0, num_processes={num})")
        if num == 1 and mode == "auto":
            return None
        return DistributedSettings(coord, num, pid, local_ids, source)

    if _on_cloud_tpu_vm(environ):
        return DistributedSettings(None, None, None, None, "tpu")
    if mode == "on":
        return DistributedSettings(None, None, None, local_ids, "jax")
    return None


def _enable_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend (no-op for GPU/TPU compute); keep a choice already made."""
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:  # pragma: no cover - older/newer JAX without the option
        return
    if not current:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _info(source: str, coordinator: str = "") -> DistributedInfo:
    return DistributedInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
        coordinator_address=coordinator,
        source=source,
    )


def maybe_initialize(config=None) -> DistributedInfo:
    """Start jax.distributed if the config / environment asks for it (see module doc); safe to call again."""
    if jax.distributed.is_initialized():
        return _info(_STATE.get("source", "jax"), _STATE.get("coordinator", ""))
    settings = resolve_settings(config)
    if settings is None:
        return _info("single")
    _enable_cpu_collectives()
    timeout = int(os.environ.get(ENV_INIT_TIMEOUT, "300"))
    log.info("jax.distributed.initialize (%s): coordinator=%s num_processes=%s process_id=%s",
             settings.source, settings.coordinator_address or "auto", settings.num_processes or "auto",
             "auto" if settings.process_id is None else settings.process_id)
    try:
        if settings.source == "tpu":
            jax.distributed.initialize(initialization_timeout=timeout)
        elif settings.source == "jax":
            jax.distributed.initialize(local_device_ids=settings.local_device_ids,
                                       initialization_timeout=timeout)
        else:
            # Everything is known: switch JAX's own detection off, or under SLURM it would pin each process
            # to the single GPU SLURM_LOCALID even when one process drives all of a host's GPUs.
            jax.distributed.initialize(
                coordinator_address=settings.coordinator_address,
                num_processes=settings.num_processes,
                process_id=settings.process_id,
                local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
                cluster_detection_method="deactivate",
                initialization_timeout=timeout,
            )
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                "maybe_initialize(config) must run before any other JAX call (jax.devices(), jnp arrays, ...): "
                "call it first thing in the entry point") from e
        raise
    _STATE.update(source=settings.source, coordinator=settings.coordinator_address or "")
    info = _info(settings.source, settings.coordinator_address or "")
    log.info("jax.distributed up: %s", info)
    return info


def is_primary() -> bool:
    """True on process 0, the one that writes logs, metrics and exports (all processes save checkpoints)."""
    return jax.process_index() == 0
