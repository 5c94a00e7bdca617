#!/usr/bin/env bash
# The actor pipeline (runtime = "async") against the same binary taking turns (runtime = "sync"),
# measured in one run: the quickstart (where training dominates), the quickstart with
# samples_per_insert = 1 (every pair trained on once: production weighs more), and `balanced`
# (samples_per_insert = 0.8 and the learner on one thread: producing a unit costs about what
# training on it costs, the synchronous learner is busy about half the time). Prints, per config
# and runtime, the wall time of the VRPO stage, pairs/s, learner steps/s, and gap closed / max
# mode-weight error at the end; then `ratio CONFIG: R` (sync wall time over async wall time).
# Usage: scripts/bench-sync.sh [extra --set arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
declare -A cfgs=(
  [quickstart]=""
  [spi1]="--set replay.samples_per_insert=1.0 --set replay.error_buffer=2048.0"
  [balanced]="--set replay.samples_per_insert=0.8 --set replay.error_buffer=2048.0 --set learner.threads=1"
)
for name in quickstart spi1 balanced; do
  for rt in async sync; do
    # shellcheck disable=SC2086
    target/release/tilt run configs/quickstart.toml --out "$out/$name-$rt" --set metrics.listen= \
      --set runtime=$rt ${cfgs[$name]} "$@" >/dev/null 2>"$out/$name-$rt.err" \
      || { echo "bench-sync: $name $rt failed:" >&2; tail -3 "$out/$name-$rt.err" >&2; exit 1; }
  done
done
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
for name in ["quickstart", "spi1", "balanced"]:
    walls = {}
    for rt in ["async", "sync"]:
        d = os.path.join(out, f"{name}-{rt}")
        v = json.load(open(os.path.join(d, "vrpo.json")))
        s = json.load(open(os.path.join(d, "summary.json")))
        walls[rt] = v["wall_s"]
        print(f"{name:<10} {rt:<5} vrpo stage {v['wall_s']:6.1f} s | {v['pairs_per_s']:7.0f} pairs/s in | "
              f"{v['learner_steps_per_s']:6.1f} steps/s | learner utilisation {v['learner_utilisation']:.2f} | "
              f"gap closed {s['gap_closed']:.3f}, max mode error {s['max_mode_weight_error']:.3f}")
    print(f"ratio {name}: {walls['sync'] / walls['async']:.2f}")
PY
