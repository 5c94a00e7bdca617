#!/usr/bin/env bash
# tilt's learner against the peer (a synchronous JAX/XLA loop, ../shared/peer/run.sh) at the same
# shape, measured in one run on this machine: K = 100, L = 10, batch 256, policy hidden 128, depth
# 2, time_dim 32, the exact critic, 1500 learner steps. Prints both rates and their ratio; the last
# line is `ratio: R` (tilt learner steps/s over the peer's steps/s of its whole loop).
# The learner takes its default step (the fused one on the CPU); extra arguments after PEER_DIR go
# to `tilt run` (e.g. `--set learner.fused=false` for the plain candle path).
# Usage: scripts/bench-learner.sh [PEER_DIR=../shared/peer] [--set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
peer_dir=${1:-../shared/peer}
shift || true
[ -x "$peer_dir/run.sh" ] || [ -f "$peer_dir/run.sh" ] || { echo "bench-learner: no $peer_dir/run.sh" >&2; exit 2; }
cargo build --release --quiet --bin tilt
tilt=${CARGO_TARGET_DIR:-target}/release/tilt
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "bench-learner: tilt (1500 steps, exact critic, vrpo stage only)" >&2
echo "bench-learner: load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$tilt" run configs/quickstart.toml --out "$out/tilt" --set metrics.listen= \
  --set policy.hidden=128 --set policy.depth=2 --set policy.time_dim=32 --set critic.kind=exact \
  --set vrpo.batch=256 --set vrpo.segment_len=10 --set sampling.steps=100 --set vrpo.steps=1500 \
  --set 'stages=["vrpo"]' "$@" >/dev/null 2>"$out/tilt.err"
grep -m1 'learner step' "$out/tilt.err" >&2 || true
echo "bench-learner: peer (1500 steps)" >&2
peer_json=$(bash "$peer_dir/run.sh" 100 10 256 1500 | tail -1)
python3 - "$out/tilt/vrpo.json" "$peer_json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
p = json.load(open(sys.argv[2]))
tilt = t["learner_steps_per_s"]
peer = 1000.0 / p["s_per_1k"]
lat = t["latency"]["learner_step"]
print(f"tilt learner: {tilt:.1f} steps/s (learner_step p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms, "
      f"utilisation {t['learner_utilisation']:.2f}, {t['pairs_per_s']:.0f} pairs/s in)")
print(f"peer loop:    {peer:.1f} steps/s ({p['s_per_1k']:.2f} s per 1k steps, compile excluded)")
print(f"ratio: {tilt / peer:.2f}")
PY
echo "bench-learner: load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
