#!/usr/bin/env bash
# Run an experiment as worker processes that meet only through Redis and a shared run directory:
# VRPO (the quickstart by default) as rollout, critic and learner; DF-DPO (a config with
# algorithm = "dfdpo") as distortion and learner. The Redis is TILT_REDIS_URL when set (it must answer;
# the workers read the same variable), else 127.0.0.1:6379, started here if none answers.
# Usage: [TILT_REDIS_URL=redis://host:port/db] scripts/cluster-local.sh [CONFIG] [RUN_ID] [--set key=value ...]
# The last line printed is the path of the run's summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/quickstart-redis.toml}
run_id=${2:-cluster-$(date +%Y%m%d-%H%M%S)-$$}
shift $(( $# > 2 ? 2 : $# ))
out="runs/$run_id"
bin=${TILT_BIN:-target/release/tilt}

if [ -n "${TILT_REDIS_URL:-}" ]; then
  url=$TILT_REDIS_URL
  if ! redis-cli --no-auth-warning -u "$url" ping >/dev/null 2>&1; then
    echo "cluster-local: no Redis answers at TILT_REDIS_URL (host $(echo "$url" | sed -E 's|.*@||; s|^[a-z]+://||'))" >&2
    exit 1
  fi
else
  url=redis://127.0.0.1:6379/0
  if ! redis-cli --no-auth-warning -u "$url" ping >/dev/null 2>&1; then
    redis-server --daemonize yes --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 50); do redis-cli --no-auth-warning -u "$url" ping >/dev/null 2>&1 && break; sleep 0.1; done
    echo "cluster-local: started redis on 127.0.0.1:6379" >&2
  fi
fi
[ -x "$bin" ] || cargo build --release >&2

mkdir -p "$out"
roles="critic rollout learner"
if grep -Eq '^algorithm *= *"dfdpo"' "$config" || printf '%s\n' "$@" | grep -Eq '^algorithm="?dfdpo"?$'; then
  roles="distortion learner"
fi
pids=()
for role in $roles; do
  "$bin" worker --role "$role" --config "$config" --run-id "$run_id" --out "$out" "$@" \
    >"$out/worker-$role.out" 2>"$out/worker-$role.err" &
  pids+=($!)
  echo "cluster-local: $role worker pid ${pids[-1]} (logs in $out/worker-$role.err)" >&2
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
# Remove the run's Redis keys.
for pattern in "tilt:$run_id*" "tilt:{$run_id*"; do
  redis-cli --no-auth-warning -u "$url" --scan --pattern "$pattern" | xargs -r redis-cli --no-auth-warning -u "$url" del >/dev/null
done
if [ "$status" -ne 0 ] || [ ! -f "$out/summary.json" ]; then
  echo "cluster-local: a worker failed (status $status); see $out/worker-*.err" >&2
  exit 1
fi
realpath "$out/summary.json"
