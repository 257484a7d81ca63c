#!/usr/bin/env bash
# Run the same raredx-jax command on every worker of an existing Cloud TPU VM pod slice
# (gcloud compute tpus tpu-vm ssh --worker=all). First copies this checkout to every worker and installs it
# in a virtualenv (pip install -e .[tpu]); jax.distributed then finds the other workers by itself.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name TPU_NAME --zone ZONE [options] [--dry-run] -- COMMAND [ARGS...]

Steps (each printed, not run, under --dry-run):
  1. tar this checkout (no .git, runs/, caches) and copy it to every worker:
       gcloud compute tpus tpu-vm scp ... --worker=all
  2. on every worker: unpack into --remote-dir, create the venv, pip install -e ".[tpu]"
  3. on every worker at once: cd --remote-dir, activate the venv, run COMMAND (output streamed here and
     kept in <remote-dir>/runs/launch/<run name>/<worker hostname>.log)
Process ids, the process count and the coordinator (worker 0) come from the TPU metadata server:
use a TPU hardware target (configs/hardware/tpu_*.py sets distributed.initialize=on).

Options:
  --name NAME        TPU VM name (required)
  --zone ZONE        its zone, e.g. us-east5-a (required)
  --project PROJECT  GCP project (default: gcloud's configured one)
  --remote-dir DIR   repository location on the workers, relative to the home directory (default raredx-jax)
  --venv DIR         virtualenv on the workers, relative to --remote-dir (default .venv)
  --python PYTHON    interpreter that creates the venv (default python3)
  --run-name NAME    log folder name (default raredx-<date-time>)
  --env K=V          extra environment for the command (repeatable), e.g. --env LIBTPU_INIT_ARGS=...
  --internal-ip      ssh/scp over internal IPs (from a VM in the same VPC)
  --no-setup         skip steps 1-2 (code and venv already in place)
  --setup-only       do steps 1-2 only
  --dry-run          print the exact commands and run nothing
  -h, --help         this text

Example:
  launch/tpu_pod.sh --name raredx-v5p --zone us-east5-a -- \
      python -m raredx_jax.train --config=configs/sft.py:tpu_v5p_128
EOF
}

PROG=tpu_pod.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # die, q, qcmd, run (prints instead under --dry-run), note

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME="" ZONE="" PROJECT="" REMOTE_DIR=raredx-jax VENV=.venv PYTHON=python3 RUN_NAME=""
DRY_RUN=0 SETUP=1 RUN_CMD=1 INTERNAL_IP=0
EXTRA_ENV=()
while (( $# )); do
  case $1 in
    --name|--zone|--project|--remote-dir|--venv|--python|--run-name) set_option "$@"; shift 2 ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    --no-setup) SETUP=0; shift ;;
    --setup-only) RUN_CMD=0; shift ;;
    --) shift; break ;;
    *) common_option "$@"; shift "$SHIFT" ;;  # --env, --dry-run, --help; else a usage error
  esac
done
CMD=("$@")
[[ -n $NAME && -n $ZONE ]] || { usage >&2; die "--name and --zone are required"; }
(( RUN_CMD == 0 )) || (( ${#CMD[@]} )) || { usage >&2; die "no COMMAND given after -- (or use --setup-only)"; }
(( SETUP || RUN_CMD )) || die "--no-setup with --setup-only leaves nothing to do"
RUN_NAME=${RUN_NAME:-raredx-$(date +%Y%m%d-%H%M%S)}

GCLOUD_FLAGS=(--zone="$ZONE" --worker=all)
if [[ -n $PROJECT ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi
if (( INTERNAL_IP )); then GCLOUD_FLAGS+=(--internal-ip); fi
TARBALL="${TMPDIR:-/tmp}/raredx-jax-$NAME.tar.gz"
R=$(q "$REMOTE_DIR") V=$(q "$VENV")

note "TPU VM $NAME ($ZONE): every worker runs the same command; jax.distributed finds the others itself"
if (( SETUP )); then
  run tar -czf "$TARBALL" --exclude=./.git --exclude=./runs --exclude=./.venv --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=./.pytest_cache -C "$REPO" .
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:raredx-jax.tar.gz" "${GCLOUD_FLAGS[@]}"
  SETUP_CMD="set -euo pipefail; mkdir -p $R && tar -xzf raredx-jax.tar.gz -C $R && cd $R"
  SETUP_CMD+=" && { test -x $V/bin/python || $(q "$PYTHON") -m venv $V; }"
  SETUP_CMD+=" && $V/bin/pip install -q -U pip && $V/bin/pip install -q -e '.[tpu]'"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --command="$SETUP_CMD"
fi
if (( RUN_CMD )); then
  LOGS="runs/launch/$RUN_NAME"
  RUN="set -euo pipefail; cd $R && source $V/bin/activate && mkdir -p $(q "$LOGS")"
  for kv in ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}; do RUN+=" && export $(q "$kv")"; done
  RUN+=" && $(qcmd "${CMD[@]}") 2>&1 | tee $(q "$LOGS")/\$(hostname).log"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --command="$RUN"
fi
