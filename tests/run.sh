#!/usr/bin/env bash
# The test command README gives. 8 host CPU devices so mesh tests exercise real sharding.
# With no arguments (the full suite, as CI runs it) the lint (`ruff check .`, ruff.toml) runs first; the suite
# runs either way, and the command fails if either does.
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$#" -eq 0 ]; then
  lint=0
  python -m ruff check . || lint=$?
  python -m pytest -q
  exit "$lint"
fi
exec python -m pytest -q "$@"
