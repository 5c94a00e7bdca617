#!/usr/bin/env bash
# The digits comparison (issue 12; the paper's Table 1 and Tables 6/7 in spirit): every method from
# the same pretrained reference, reward model A, judge B and critic, for the same number of learner
# updates, with the same seeds and the same evaluation noise.
#
#   scripts/digits-compare.sh [OUT] [--set key=value ...]      (default OUT: runs/digits-compare)
#
# OUT/base runs the "pretrain" and "critic" stages of configs/digits-vrpo.toml once; each method
# then runs "critic" (copied from base: critic.from; the feature-critic method trains its own
# with critic.encoder = "reward_features"), "vrpo" and "eval" in OUT/<method> with
# pretrain.from = OUT/base. Extra --set arguments apply to every run (e.g. --set vrpo.steps=500).
# Finished methods (with a summary.json) are reused; an interrupted one is started over. Ends with
# OUT/compare.json (one summary object per method under "methods") and OUT/compare.md (a Markdown
# table), and prints the table.
set -euo pipefail
out=${1:-runs/digits-compare}
[[ $# -gt 0 ]] && shift
mkdir -p "$out"
out=$(realpath -- "$out")
cd "$(dirname "$0")/.."
cfg=configs/digits-vrpo.toml
lambda=$(sed -n 's/^lambda *= *\([0-9.e+-]*\).*/\1/p' "$cfg" | head -1)
lambda2=$(python3 -c "print(2 * float('$lambda'))")
cargo build --release --quiet
tilt=target/release/tilt
if [[ ! -f "$out/base/critic.json" ]]; then
  rm -rf -- "$out/base"
  echo "== base: pretrain (reference, reward model A, judge B) and critic -> $out/base" >&2
  $tilt run $cfg --out "$out/base" --set 'stages=["pretrain","critic"]' --set metrics.listen= "$@"
fi
# name | extra settings (space-separated key=value)
methods=(
  "diffusion_dpo_final|vrpo.method=final_dpo vrpo.beta=1000"
  "mean_value_critic|critic.value=mean"
  "vrpo_hard_paper|vrpo.labels=hard vrpo.beta=10 vrpo.lambda=0.1"
  "vrpo_soft|"
  "vrpo_soft_L1|vrpo.segment_len=1"
  "vrpo_soft_L2|vrpo.segment_len=2"
  "vrpo_soft_L8|vrpo.segment_len=8"
  "vrpo_soft_lambda_x2|vrpo.lambda=$lambda2"
  "vrpo_soft_feature_critic|critic.encoder=reward_features"
)
rows=()
for m in "${methods[@]}"; do
  name=${m%%|*}; sets=${m#*|}
  dir="$out/$name"
  if [[ ! -f "$dir/summary.json" ]]; then
    [[ -e "$dir" ]] && { echo "== $dir has no summary.json (interrupted): starting it over" >&2; rm -rf -- "$dir"; }
    args=()
    for s in $sets; do args+=(--set "$s"); done
    # Every method scores with base's critic, except one that names its own critic encoder.
    if [[ "$sets" == *critic.encoder=* ]]; then critic=(); else critic=(--set "critic.from=$out/base"); fi
    echo "== $name ${sets:-(defaults)} -> $dir" >&2
    t0=$(date +%s)
    $tilt run $cfg --out "$dir" --set 'stages=["critic","vrpo","eval"]' \
      --set "pretrain.from=$out/base" "${critic[@]}" --set metrics.listen= \
      --set "name=$name" "${args[@]}" "$@" > "$dir.log" 2>&1 \
      || { echo "digits-compare: $name failed, see $dir.log" >&2; tail -5 "$dir.log" >&2; exit 1; }
    echo "   done in $(( $(date +%s) - t0 )) s" >&2
  fi
  rows+=("$name=$dir/summary.json")
done
python3 - "$out" "${rows[@]}" <<'PY'
import json, sys
out, rows = sys.argv[1], sys.argv[2:]
methods = {}
for r in rows:
    name, f = r.split("=", 1)
    methods[name] = json.load(open(f))
first = next(iter(methods.values()))
ref = {"reward": first["reference"], "target": first["target"], "classifiers": first["classifiers"]}
json.dump({"reference": ref, "methods": methods}, open(f"{out}/compare.json", "w"), indent=1)
lam0 = float(first["lambda"]) if first["method"] != "final_dpo" else None
base_target = None
for s in methods.values():
    if s["labels"] == "soft" and s["method"] == "segments" and s["critic_value"] == "optimal":
        base_target = base_target or (s["lambda"], s["target"]["reward"])
r = first["reference"]
def gap(p, t):
    return (p - r["reward"]) / (t - r["reward"])
hdr = ("| method | labels | beta | lambda | L | critic | reward A (+- SE) | gap closed, own lambda "
       f"| gap closed, lambda = {base_target[0]:g} target | judge B acc | judge B log p | diversity: pairwise "
       "| distinct NN | critic CRPS | CE | top-1 | top-3 |")
lines = [hdr, "|" + "---|" * 17]
lines.append(f"| reference | | | | | | {r['reward']:.4f} +- {r.get('reward_se', float('nan')):.4f} | 0 | 0 "
             f"| {r['judge_acc']:.3f} | {r['judge_logp']:.4f} | {r['diversity']['pairwise']:.3f} "
             f"| {r['diversity']['distinct_nn']:.3f} | | | | |")
lines.append(f"| target, lambda = {base_target[0]:g} (per-class IW) | | | | | | {base_target[1]:.4f} | 1 | 1 | | | | | | | | |")
for name, s in methods.items():
    p, c = s["policy"], s["critic"]
    dpo = s["method"] == "final_dpo"
    crit = "none" if dpo else f"{c.get('encoder', 'mlp')}, {s['critic_value']}"
    lines.append(f"| {name} | {'ranked final pairs' if dpo else s['labels']} | {s['beta']:g} | "
                 f"{'' if dpo else format(s['lambda'], 'g')} | {'' if dpo else s['segment_len']} | {crit} "
                 f"| {p['reward']:.4f} +- {p.get('reward_se', float('nan')):.4f} "
                 f"| {'' if dpo else format(s['gap_closed'], '.3f')} | {gap(p['reward'], base_target[1]):.3f} "
                 f"| {p['judge_acc']:.3f} | {p['judge_logp']:.4f} "
                 f"| {p['diversity']['pairwise']:.3f} | {p['diversity']['distinct_nn']:.3f} "
                 + ("| | | | |" if dpo else f"| {c['crps']:.4f} | {c['ce']:.3f} | {c['top1']:.3f} | {c['top3']:.3f} |"))
open(f"{out}/compare.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
