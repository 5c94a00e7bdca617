#!/usr/bin/env bash
# Soak: the three-process VRPO run (rollout, critic, learner workers on a Redis of its own) for
# MINUTES minutes, sampling every INTERVAL seconds the resident memory of each worker, Redis's
# used memory, stream lengths and key counts, and the learner's step. Writes
# runs/soak-<stamp>/soak.csv (and redis-keys.txt, the keys by shape at the end) and prints, per
# series, its peak in the first half (after the first minute) and in the second half: a series is
# "flat" when its second-half peak is less than 10% above its first-half peak (a leak keeps
# raising the peak). Exits 1 when any series is not flat.
# Usage: scripts/soak.sh [MINUTES=20] [CONFIG=configs/quickstart-redis.toml] [--set key=value ...]
#        scripts/soak.sh runs/soak-<stamp>/soak.csv   (the analysis of an earlier soak again)
# Runs at nice 10 (memory, not speed, is measured). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
analyse() {
python3 - "$1" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
t = [float(r["t_s"]) for r in rows]
span = t[-1] - t[0]
def window(col, lo, hi):
    return [float(r[col]) for r, x in zip(rows, t) if lo <= x <= hi and r[col] not in ("", "nan")]
steps = [(x, int(r["learner_step"])) for r, x in zip(rows, t) if r["learner_step"]]
print(f"soak: {span / 60:.1f} min, {len(rows)} samples, learner steps {steps[0][1] if steps else 0} -> {steps[-1][1] if steps else 0}")
if len(steps) > 1:
    rates = [(b[1] - a[1]) / max(b[0] - a[0], 1e-9) for a, b in zip(steps, steps[1:])]
    print(f"learner steps/s between samples: min {min(rates):.1f}, median {statistics.median(rates):.1f}, max {max(rates):.1f}")
print(f"{'series':<16} {'peak 1st half':>13} {'peak 2nd half':>13} {'last 2 min':>10} {'growth':>8}  verdict")
ok = True
# Nonce keys (sample and insert reservations) expire after 30 s: their count follows the call
# rate, so the other keys are judged on their own and the nonces only shown.
for col in ["rss_rollout_mb", "rss_critic_mb", "rss_learner_mb", "redis_used_mb", "redis_rss_mb", "other_keys"]:
    # The first minute is start-up (models built, caches filled); a leak raises the peak of the
    # second half above the first half's.
    first = window(col, 60, span / 2)
    second = window(col, span / 2, span)
    last = window(col, span - 120, span)
    if not first or not second or not last:
        print(f"{col:<16} too few samples (run longer than 3 min)"); ok = False; continue
    a, b = max(first), max(second)
    growth = (b - a) / a if a > 0 else 0.0
    flat = growth < 0.10
    ok &= flat
    print(f"{col:<16} {a:>13.1f} {b:>13.1f} {statistics.median(last):>10.1f} {growth:>+7.1%}  {'flat' if flat else 'GROWING'}")
if "nonce_keys" in rows[0]:
    nk = [float(r["nonce_keys"]) for r in rows if r["nonce_keys"]]
    print(f"nonce keys (30 s TTL, not judged): median {statistics.median(nk):.0f}, max {max(nk):.0f}")
print("soak: flat (no series' second-half peak is 10% above its first-half peak)" if ok else "soak: NOT FLAT")
sys.exit(0 if ok else 1)
EOF
}
if [[ "${1:-}" == *.csv ]]; then
  analyse "$1"
  exit $?
fi
minutes=${1:-20}
config=${2:-configs/quickstart-redis.toml}
shift $(($# > 2 ? 2 : $#))
interval=${INTERVAL:-10}
bin=${TILT_BIN:-target/release/tilt}
[ -x "$bin" ] || cargo build --release >&2
stamp=$(date +%Y%m%d-%H%M%S)
out="runs/soak-$stamp"
run_id="soak-$stamp-$$"
mkdir -p "$out"

# A Redis of the soak's own on a free port, nothing on disk: its memory is the run's alone.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >"$out/redis.log" 2>&1 &
redis_pid=$!
url="redis://127.0.0.1:$port/0"
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$port" ping >/dev/null || { echo "soak: redis-server did not start (see $out/redis.log)" >&2; exit 1; }

declare -A pid
cleanup() {
  for r in "${!pid[@]}"; do kill "${pid[$r]}" 2>/dev/null || true; done
  kill "$redis_pid" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
for role in critic rollout learner; do
  TILT_REDIS_URL=$url nice -n 10 "$bin" worker --role "$role" --config "$config" --run-id "$run_id" \
    --out "$out" --set vrpo.steps=1000000000 --set learner.checkpoint_every=0 \
    --set 'eval.at_steps=[]' --set metrics.listen= "$@" \
    >"$out/worker-$role.out" 2>"$out/worker-$role.err" &
  pid[$role]=$!
done
echo "soak: $minutes min, run directory $out, redis 127.0.0.1:$port, workers ${pid[*]}" >&2

rss() { awk '/^VmRSS/ {print $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo nan; }
step() {
  tac "$out/progress-learner.log" 2>/dev/null | grep -m1 -oE '^\[vrpo\] step [0-9]+' | awk '{print $3}' || true
}
echo "t_s,learner_step,rss_rollout_mb,rss_critic_mb,rss_learner_mb,redis_used_mb,redis_rss_mb,replay_len,segments_len,other_keys,nonce_keys" >"$out/soak.csv"
t0=$(date +%s)
end=$((t0 + minutes * 60))
while [ "$(date +%s)" -lt "$end" ]; do
  for r in "${!pid[@]}"; do
    if ! kill -0 "${pid[$r]}" 2>/dev/null; then
      echo "soak: the $r worker exited early; see $out/worker-$r.err" >&2
      tail -5 "$out/worker-$r.err" >&2
      exit 1
    fi
  done
  mem=$(redis-cli -p "$port" info memory | tr -d '\r')
  used=$(echo "$mem" | awk -F: '/^used_memory:/ {print $2 / 1048576}')
  rrss=$(echo "$mem" | awk -F: '/^used_memory_rss:/ {print $2 / 1048576}')
  lens=()
  for key in "tilt:{$run_id}:replay" "tilt:{$run_id-segments}:replay"; do
    lens+=("$(redis-cli -p "$port" xlen "$key" 2>/dev/null || echo 0)")
  done
  echo "$(($(date +%s) - t0)),$(step),$(rss "${pid[rollout]}"),$(rss "${pid[critic]}"),$(rss "${pid[learner]}"),$used,$rrss,${lens[0]},${lens[1]},$(redis-cli -p "$port" --scan | grep -vc ':nonce:'),$(redis-cli -p "$port" --scan --pattern '*:nonce:*' | wc -l)" >>"$out/soak.csv"
  sleep "$interval"
done
# What the keys are, by shape (digits and hex folded), for a key count that grows.
redis-cli -p "$port" --scan | sed -E 's/[0-9a-f]{6,}/H/g; s/[0-9]+/N/g' | sort | uniq -c | sort -rn >"$out/redis-keys.txt"
for r in learner rollout critic; do kill -TERM "${pid[$r]}" 2>/dev/null || true; done
for r in learner rollout critic; do wait "${pid[$r]}" 2>/dev/null || true; done
analyse "$out/soak.csv"
