#!/usr/bin/env bash
# The DF-DPO protocol over seeds: configs/video-dfdpo-protocol.toml (a reference pretrained with a
# share of temporally corrupted clips; SFT, DF-DPO and the three ablations continue it for the same
# steps; 256 eval clips per model from the same noise) once per seed, then the table of means and
# spreads across seeds and the verdict on "DF-DPO beats SFT on the temporal metric by more than
# twice the spread across seeds".
#
#   scripts/dfdpo-protocol.sh [OUT_DIR] [--seeds "0 1 2"] [--set key=value ...]
#   scripts/dfdpo-protocol.sh runs/protocol                 # ~25 min on 2 cores
#
# Each seed runs in OUT_DIR/seed-S; a seed with a summary.json is reused (an interrupted seed
# resumes from its checkpoints). `scripts/dfdpo-protocol.sh OUT_DIR --table` only prints the table.
# TILT_BIN overrides the binary (default target/release/tilt, built when missing).
set -euo pipefail
out=runs/protocol
if [[ $# -gt 0 && $1 != --* ]]; then out=$1; shift; fi
mkdir -p -- "$out"
out=$(realpath -- "$out")   # relative to the caller's directory, not the repo's
cd "$(dirname "$0")/.."
seeds="0 1 2"
table_only=0
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --seeds) seeds=${2:?--seeds needs a list, e.g. \"0 1 2\"}; shift 2 ;;
    --table) table_only=1; shift ;;
    --set) extra+=(--set "${2:?--set needs key=value}"); shift 2 ;;
    *) echo "dfdpo-protocol: unknown argument $1 (usage: scripts/dfdpo-protocol.sh [OUT_DIR] [--seeds \"0 1 2\"] [--table] [--set key=value ...])" >&2; exit 2 ;;
  esac
done
summaries=()
for s in $seeds; do
  dir="$out/seed-$s"
  if [[ $table_only == 0 && ! -f "$dir/summary.json" ]]; then
    bin=${TILT_BIN:-target/release/tilt}
    [[ -x $bin ]] || cargo build --release --quiet
    echo "== seed $s -> $dir ($(date +%H:%M:%S))" >&2
    "$bin" run configs/video-dfdpo-protocol.toml --out "$dir" --set "seed=$s" "${extra[@]}" >&2
  fi
  [[ -f "$dir/summary.json" ]] || { echo "dfdpo-protocol: $dir/summary.json is missing" >&2; exit 1; }
  summaries+=("$dir/summary.json")
done
python3 - "${summaries[@]}" <<'PY'
import json, math, sys
runs = [json.load(open(f)) for f in sys.argv[1:]]
k = len(runs)
def stats(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd
def cell(xs, digits=3):
    m, sd = stats(xs)
    return f"{m:.{digits}f} ± {sd:.{digits}f}"
def model(run, name):
    if name == "real clips":
        return run["real"]
    return run["eval"].get(name) or run["ablation"].get(name)
names = ["real clips", "reference", "sft", "dfdpo", "temporal_only", "spatial_only", "hybrid"]
n = runs[0]["eval_clips"]
p = runs[0].get("pretrain") or {}
print(f"{k} seeds, {n} eval clips per model; "
      f"reference pretrained {p.get('steps')} steps, {p.get('corrupted')} of {p.get('clips')} clips corrupted "
      f"(share {p.get('corrupt_share')}, ops {p.get('corrupt_ops')}); mean ± sd across seeds")
print(f"| model | temporal | smoothness | sharpness | noise | one blob | continuity |")
print(f"|---|---|---|---|---|---|---|")
for name in names:
    rows = [model(r, name) for r in runs]
    if any(x is None for x in rows):
        continue
    print(f"| {name} | {cell([x['temporal'] for x in rows])} | {cell([x['smoothness'] for x in rows])} | "
          f"{cell([x['sharpness'] for x in rows], 4)} | {cell([x['noise'] for x in rows], 4)} | "
          f"{cell([x['single_blob'] for x in rows])} | {cell([x['track_continuity'] for x in rows])} |")
broken = [r["reference_arrow_broken"] for r in runs]
real_broken = [r["real_arrow_broken"] for r in runs]
print(f"reference breaks the arrow of time in {cell(broken)} of its clips (real clips {cell(real_broken)}); "
      f"standard error of one share at {n} clips <= {0.5 / math.sqrt(n):.3f}")
sft = [model(r, "sft")["temporal"] for r in runs]
dfd = [model(r, "dfdpo")["temporal"] for r in runs]
gap = stats(dfd)[0] - stats(sft)[0]
spread = max(stats(dfd)[1], stats(sft)[1])
print(f"DF-DPO - SFT on temporal: {gap:+.3f}; twice the larger spread across seeds: {2 * spread:.3f}; "
      f"per seed: {', '.join(f'{d - s:+.3f}' for d, s in zip(dfd, sft))}")
print("verdict: DF-DPO beats SFT by more than twice the spread" if gap > 2 * spread else
      "verdict: DF-DPO does not beat SFT by more than twice the spread")
# The same seed gives SFT and DF-DPO the same reference, data and eval noise: the per-seed
# differences are paired, and their own spread is the one that measures the gap's noise.
diffs = [d - s for d, s in zip(dfd, sft)]
if k > 1:
    m, sd = stats(diffs)
    se = sd / math.sqrt(k)
    t = f"t = {m / se:.2f}" if se > 0 else "t undefined: no spread"
    print(f"paired over seeds: DF-DPO - SFT = {m:+.3f} ± {se:.3f} (SE of the mean of {k} paired differences, "
          f"sd {sd:.3f}; {t} on {k - 1} df); positive at {sum(d > 0 for d in diffs)} of {k} seeds")
gates = [model(r, "reference") for r in runs]
ok = all(g["single_blob"] >= 0.9 and g["track_continuity"] >= 0.8 for g in gates)
print("reference gates (one blob >= 0.9, continuity >= 0.8): " + ("met" if ok else "NOT met: the reference does not model the data well enough for the result to mean much"))
PY
