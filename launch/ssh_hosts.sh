#!/usr/bin/env bash
# Run one raredx-jax process per host over plain ssh: process id = line index in the host file,
# coordinator = first host:port. Each process is started with nohup (it survives a dropped ssh), writes
# its log on its host, and the logs are copied back here when all have finished.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/ssh_hosts.sh --hostfile FILE [options] [--dry-run] -- COMMAND [ARGS...]

Starts COMMAND on every host of FILE (one host or user@host per line; blank lines and # comments
ignored) with RAREDX_COORDINATOR=<host 0>:PORT, RAREDX_NUM_PROCESSES=<hosts>, RAREDX_PROCESS_ID=<line>,
which raredx_jax.parallel.distributed.maybe_initialize turns into jax.distributed.initialize.
The repository must already be at --remote-dir on every host (shared filesystem, or rsync it first).

Options:
  --hostfile FILE       hosts, one per line (required)
  --port N              coordinator port on host 0 (default 8476)
  --coordinator HOST    address the other hosts reach host 0 by (default: host 0's name, without user@)
  --remote-dir DIR      repository on the hosts (default: this checkout's absolute path)
  --venv DIR            virtualenv to activate on the hosts, relative to --remote-dir or absolute
  --env K=V             extra environment for every process (repeatable), e.g. --env XLA_FLAGS=...
  --run-name NAME       names the log folder <remote-dir>/runs/launch/NAME (default raredx-<date-time>)
  --log-dir DIR         where the logs are collected here (default runs/launch/NAME/collected)
  --ssh-opt OPT         extra `-o OPT` for ssh and scp (repeatable), e.g. --ssh-opt Port=2222
  --poll SECONDS        how often to check whether the processes finished (default 15)
  --no-wait             start the processes and return (collect later with --collect)
  --collect             only fetch the logs and exit codes of --run-name NAME
  --dry-run             print the exact commands (ssh/scp) and run nothing
  -h, --help            this text

Example:
  launch/ssh_hosts.sh --hostfile hosts.txt --venv .venv -- \
      python -m raredx_jax.train --config=configs/sft.py:h100x8
EOF
}

PROG=ssh_hosts.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # die, q, qcmd, run (prints instead under --dry-run), note

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOSTFILE="" PORT=8476 COORDINATOR="" REMOTE_DIR="$REPO" VENV="" RUN_NAME="" LOG_DIR="" POLL=15
DRY_RUN=0 WAIT=1 COLLECT_ONLY=0
EXTRA_ENV=() SSH_OPTS=(-o BatchMode=yes -o ConnectTimeout=15)
while (( $# )); do
  case $1 in
    --hostfile|--port|--coordinator|--remote-dir|--venv|--run-name|--log-dir|--poll) set_option "$@"; shift 2 ;;
    --ssh-opt) SSH_OPTS+=(-o "${2:?--ssh-opt needs a value}"); shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    --collect) COLLECT_ONLY=1; shift ;;
    --) shift; break ;;
    *) common_option "$@"; shift "$SHIFT" ;;  # --env, --dry-run, --help; else a usage error
  esac
done
CMD=("$@")

[[ -n $HOSTFILE ]] || { usage >&2; die "--hostfile is required"; }
[[ -r $HOSTFILE ]] || die "cannot read host file $HOSTFILE"
(( COLLECT_ONLY )) || (( ${#CMD[@]} )) || { usage >&2; die "no COMMAND given after --"; }
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got $PORT"
[[ $POLL =~ ^[0-9]+$ ]] || die "--poll must be a number of seconds, got $POLL"
if (( COLLECT_ONLY )) && [[ -z $RUN_NAME ]]; then die "--collect needs the --run-name of the run"; fi

HOSTS=()
while IFS= read -r line || [[ -n $line ]]; do
  line=${line%%#*}
  line=${line//[[:space:]]/}
  if [[ -n $line ]]; then HOSTS+=("$line"); fi
done < "$HOSTFILE"
N=${#HOSTS[@]}
(( N > 0 )) || die "no hosts in $HOSTFILE"

RUN_NAME=${RUN_NAME:-raredx-$(date +%Y%m%d-%H%M%S)}
LOG_DIR=${LOG_DIR:-$REPO/runs/launch/$RUN_NAME/collected}  # never the remote folder itself (shared FS)
COORDINATOR=${COORDINATOR:-${HOSTS[0]#*@}}
ADDRESS="$COORDINATOR:$PORT"
RDIR="$REMOTE_DIR/runs/launch/$RUN_NAME"  # log folder on every host (relative: to the home dir)

start() {  # paths after `cd --remote-dir` are relative to it (it may itself be relative to the home dir)
  local i=$1 host=${HOSTS[$1]} inner remote logs="runs/launch/$RUN_NAME"
  inner=""
  if [[ -n $VENV ]]; then inner+="source $(q "$VENV")/bin/activate; "; fi
  inner+="\"\$@\"; rc=\$?; echo \$rc > $(q "$logs/process-$i.rc"); exit \$rc"
  remote="cd $(q "$REMOTE_DIR") && mkdir -p $(q "$logs") && rm -f $(q "$logs/process-$i.rc")"
  remote+=" && { nohup env RAREDX_COORDINATOR=$(q "$ADDRESS") RAREDX_NUM_PROCESSES=$N RAREDX_PROCESS_ID=$i"
  if (( ${#EXTRA_ENV[@]} )); then remote+=" $(qcmd "${EXTRA_ENV[@]}")"; fi
  remote+=" bash -c $(q "$inner") raredx $(qcmd "${CMD[@]}")"
  remote+=" > $(q "$logs/process-$i.log") 2>&1 < /dev/null & echo \$! > $(q "$logs/process-$i.pid"); }"
  run ssh "${SSH_OPTS[@]}" "$host" "$remote"
}

finished() {  # exit 0 when process $1 has written its exit code, or is gone without one (killed)
  local rc pid
  rc=$(q "$RDIR/process-$1.rc") pid=$(q "$RDIR/process-$1.pid")
  run ssh "${SSH_OPTS[@]}" "${HOSTS[$1]}" "test -e $rc || ! kill -0 \"\$(cat $pid)\" 2>/dev/null"
}

collect() {
  local i failed=0 rc
  run mkdir -p "$LOG_DIR"
  for (( i = 0; i < N; i++ )); do
    run scp -q "${SSH_OPTS[@]}" "${HOSTS[$i]}:$RDIR/process-$i.log" "$LOG_DIR/" \
      || echo "process $i (${HOSTS[$i]}): could not copy its log" >&2
    run scp -q "${SSH_OPTS[@]}" "${HOSTS[$i]}:$RDIR/process-$i.rc" "$LOG_DIR/" 2>/dev/null || true
  done
  (( DRY_RUN )) && return 0
  for (( i = 0; i < N; i++ )); do
    if [[ -f $LOG_DIR/process-$i.rc ]]; then rc=$(<"$LOG_DIR/process-$i.rc"); else rc="none (still running, or killed)"; fi
    echo "process $i (${HOSTS[$i]}): exit $rc, log $LOG_DIR/process-$i.log"
    [[ $rc == 0 ]] || failed=1
  done
  return $failed
}

if (( COLLECT_ONLY )); then
  collect
  exit
fi

note "$N processes, coordinator $ADDRESS (process 0 on ${HOSTS[0]}), logs in $RDIR on each host"
for (( i = 0; i < N; i++ )); do
  start "$i"
done
if (( ! WAIT )); then
  note "started; collect the logs later with: launch/ssh_hosts.sh --hostfile $HOSTFILE --run-name $RUN_NAME --collect"
  exit 0
fi

if (( DRY_RUN )); then
  note "then, every $POLL s until each host's .rc exists:"
  for (( i = 0; i < N; i++ )); do finished "$i"; done
else
  for (( i = 0; i < N; i++ )); do
    until finished "$i" 2>/dev/null; do sleep "$POLL"; done
  done
fi
note "collect the logs into $LOG_DIR"
collect
