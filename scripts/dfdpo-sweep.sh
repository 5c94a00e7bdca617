#!/usr/bin/env bash
# Sweep DF-DPO's beta and lambda_sft on the reference of an existing DF-DPO run (no re-pretraining).
#
#   scripts/dfdpo-sweep.sh RUN_DIR "BETA:LAMBDA ..." [--set key=value ...]
#   scripts/dfdpo-sweep.sh runs/video "100:1 1000:10 5000:1"
#
# RUN_DIR must hold reference.safetensors, data_scale.json and config.toml (any run whose stages
# included "pretrain"). Each point runs stages dfdpo + eval in RUN_DIR/sweep/beta-B_lambda-L (the
# reference is copied, so every point starts from the same model and samples the same noise) and
# the script ends with a table of the eval metrics, reference first. Finished points (those with a
# summary.json) are reused; an interrupted point is started over.
set -euo pipefail
run=${1:?usage: scripts/dfdpo-sweep.sh RUN_DIR \"BETA:LAMBDA ...\" [--set key=value ...]}
run=$(realpath -- "$run")   # RUN_DIR is relative to the caller's directory, not the repo's
cd "$(dirname "$0")/.."
points=${2:?give the sweep points as \"BETA:LAMBDA ...\"}
shift 2
for f in reference.safetensors data_scale.json config.toml; do
  [[ -f "$run/$f" ]] || { echo "dfdpo-sweep: $run/$f is missing (run the pretrain stage first)" >&2; exit 2; }
done
cargo build --release --quiet
rows=()
for p in $points; do
  beta=${p%%:*}; lambda=${p##*:}
  dir="$run/sweep/beta-${beta}_lambda-${lambda}"
  if [[ ! -f "$dir/summary.json" ]]; then
    if [[ -e "$dir" ]]; then
      echo "== $dir has no summary.json (an interrupted point): starting it over" >&2
      rm -rf -- "$dir"
    fi
    mkdir -p "$dir"
    cp "$run/reference.safetensors" "$run/data_scale.json" "$dir/"
    echo "== beta $beta lambda_sft $lambda -> $dir" >&2
    target/release/tilt run "$run/config.toml" --out "$dir" --set 'stages=["dfdpo","eval"]' \
      --set "dfdpo.beta=$beta" --set "dfdpo.lambda_sft=$lambda" --set metrics.listen= "$@" >/dev/null
  fi
  rows+=("$dir/summary.json")
done
python3 - "${rows[@]}" <<'PY'
import json, sys
print(f"{'model':<28} {'temporal':>8} {'smooth':>7} {'sharp':>7} {'noise':>7} {'impl.acc':>8}")
for i, f in enumerate(sys.argv[1:]):
    s = json.load(open(f))
    if i == 0:
        r = s["eval"]["reference"]
        print(f"{'reference':<28} {r['temporal']:8.3f} {r['smoothness']:7.3f} {r['sharpness']:7.4f} {r['noise']:7.4f}")
    d = s["eval"]["dfdpo"]
    acc = s["training"]["dfdpo"]["final_accuracy"]
    name = f"dfdpo beta {s['beta']:g} lambda {s['lambda_sft']:g}"
    print(f"{name:<28} {d['temporal']:8.3f} {d['smoothness']:7.3f} {d['sharpness']:7.4f} {d['noise']:7.4f} {acc:8.3f}")
PY
