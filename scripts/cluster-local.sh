#!/usr/bin/env bash
# Run the quickstart experiment as three processes (rollout, critic, learner) that meet only
# through Redis and a shared run directory. Starts a local Redis if none answers on 127.0.0.1:6379.
# Usage: scripts/cluster-local.sh [CONFIG] [RUN_ID] [--set key=value ...]
# The last line printed is the path of the run's summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/quickstart-redis.toml}
run_id=${2:-cluster-$(date +%Y%m%d-%H%M%S)-$$}
shift $(( $# > 2 ? 2 : $# ))
out="runs/$run_id"
bin=${TILT_BIN:-target/release/tilt}

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  echo "cluster-local: started redis on 127.0.0.1:6379" >&2
fi
[ -x "$bin" ] || cargo build --release >&2

mkdir -p "$out"
pids=()
for role in critic rollout learner; do
  "$bin" worker --role "$role" --config "$config" --run-id "$run_id" --out "$out" "$@" \
    >"$out/worker-$role.out" 2>"$out/worker-$role.err" &
  pids+=($!)
  echo "cluster-local: $role worker pid ${pids[-1]} (logs in $out/worker-$role.err)" >&2
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
# Remove the run's Redis keys.
redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "tilt:$run_id*" | xargs -r redis-cli -h 127.0.0.1 -p 6379 del >/dev/null
if [ "$status" -ne 0 ] || [ ! -f "$out/summary.json" ]; then
  echo "cluster-local: a worker failed (status $status); see $out/worker-*.err" >&2
  exit 1
fi
realpath "$out/summary.json"
