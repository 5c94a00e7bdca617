#!/usr/bin/env bash
# The digits preset (configs/digits-vrpo.toml: pretrain, critic, VRPO with soft labels, eval) once
# per seed, then a table of each seed's reference, target and policy and their mean and spread.
#
#   scripts/digits-seeds.sh [OUT_DIR] [--seeds "0 1 2"] [--table] [--set key=value ...]
#   scripts/digits-seeds.sh runs/digits-seeds          # ~7 min a seed on 2 cores
#
# Each seed runs in OUT_DIR/seed-S; a seed with a summary.json is reused. `--table` only prints
# the table. TILT_BIN overrides the binary (default target/release/tilt, built when missing).
set -euo pipefail
out=runs/digits-seeds
if [[ $# -gt 0 && $1 != --* ]]; then out=$1; shift; fi
mkdir -p -- "$out"
out=$(realpath -- "$out")
cd "$(dirname "$0")/.."
seeds="0 1 2"
table_only=0
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --seeds) seeds=${2:?--seeds needs a list, e.g. \"0 1 2\"}; shift 2 ;;
    --table) table_only=1; shift ;;
    --set) extra+=(--set "${2:?--set needs key=value}"); shift 2 ;;
    *) echo "digits-seeds: unknown argument $1 (usage: scripts/digits-seeds.sh [OUT_DIR] [--seeds \"0 1 2\"] [--table] [--set key=value ...])" >&2; exit 2 ;;
  esac
done
summaries=()
for s in $seeds; do
  dir="$out/seed-$s"
  if [[ $table_only == 0 && ! -f "$dir/summary.json" ]]; then
    bin=${TILT_BIN:-target/release/tilt}
    [[ -x $bin ]] || cargo build --release --quiet
    echo "== seed $s -> $dir ($(date +%H:%M:%S))" >&2
    "$bin" run configs/digits-vrpo.toml --out "$dir" --set "seed=$s" "${extra[@]}" >&2
  fi
  [[ -f "$dir/summary.json" ]] || { echo "digits-seeds: $dir/summary.json is missing" >&2; exit 1; }
  summaries+=("$dir/summary.json")
done
python3 - "${summaries[@]}" <<'PY'
import json, math, sys
runs = [json.load(open(f)) for f in sys.argv[1:]]
def stats(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd
cols = [
    ("judge B on reference samples", lambda r: r["classifiers"]["reference_judge_acc"]),
    ("reward A: reference", lambda r: r["reward_mean_ref"]),
    ("target (per-class IW)", lambda r: r["reward_mean_target"]),
    ("policy", lambda r: r["reward_mean_policy"]),
    ("policy SE", lambda r: r.get("reward_se_policy", float("nan"))),
    ("gap closed", lambda r: r["gap_closed"]),
    ("judge B acc: reference", lambda r: r["reference"]["judge_acc"]),
    ("judge B acc: policy", lambda r: r["policy"]["judge_acc"]),
    ("pairwise diversity: reference", lambda r: r["reference"]["diversity"]["pairwise"]),
    ("pairwise diversity: policy", lambda r: r["policy"]["diversity"]["pairwise"]),
    ("distinct NN: reference", lambda r: r["reference"]["diversity"]["distinct_nn"]),
    ("distinct NN: policy", lambda r: r["policy"]["diversity"]["distinct_nn"]),
    ("critic CRPS", lambda r: r["critic"]["crps"]),
]
seeds = [r["provenance"]["seed"] if "provenance" in r else "?" for r in runs]
commits = sorted({r.get("provenance", {}).get("tilt_commit", "?")[:12] for r in runs})
print(f"{len(runs)} seeds of configs/digits-vrpo.toml ({runs[0]['steps']} learner steps); commit {', '.join(commits)}")
print("| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |")
print("|---|" + "---|" * (len(runs) + 1))
for name, f in cols:
    xs = [f(r) for r in runs]
    m, sd = stats(xs)
    print(f"| {name} | " + " | ".join(f"{x:.4f}" for x in xs) + f" | {m:.4f} ± {sd:.4f} |")
PY
