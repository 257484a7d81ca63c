# shellcheck shell=bash
# Helpers shared by the launch/ scripts, sourced (not run) by each of them. The script sets PROG (its name, for
# error messages) and DRY_RUN (1: print the commands instead of running them) before it calls these.

die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 2; }

# Shell-quote one word so a printed command can be pasted back into bash as is.
q() {
  local s=$1 re='^([-A-Za-z0-9_]+=)(.+)$' head
  if [[ -n $s && $s != *[!A-Za-z0-9_./:=,@%+-]* ]]; then printf '%s' "$s"
  elif [[ $s =~ $re ]]; then  # --opt=VALUE / NAME=VALUE: quote the value only, for readability
    head=${BASH_REMATCH[1]} s=${BASH_REMATCH[2]}
    printf "%s'%s'" "$head" "${s//"'"/"'\\''"}"
  else printf "'%s'" "${s//"'"/"'\\''"}"; fi
}
qcmd() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}
# Run a command, or print it (exactly, quoted) under --dry-run.
run() {
  if (( DRY_RUN )); then printf '%s\n' "$(qcmd "$@")"; else "$@"; fi
}
note() { printf '# %s\n' "$*"; }

# The command line: each script's loop over its options hands its plain value options to set_option and
# whatever else it does not know to common_option.

# set_option --some-name VALUE: SOME_NAME=VALUE; a missing or empty VALUE stops the script with
# "--some-name needs a value".
set_option() {
  local var=${1#--}
  var=${var//-/_}
  printf -v "${var^^}" '%s' "${2:?$1 needs a value}"
}

# The options every launcher takes: --env K=V (repeatable: EXTRA_ENV), --dry-run (DRY_RUN=1), -h/--help;
# anything else is a usage error. Sets SHIFT to the number of words it used.
common_option() {
  # shellcheck disable=SC2034  # EXTRA_ENV and SHIFT are the sourcing script's
  case $1 in
    --env) [[ ${2:-} == *=* ]] || die "--env needs K=V"; EXTRA_ENV+=("$2"); SHIFT=2 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
}
