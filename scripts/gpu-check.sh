#!/usr/bin/env bash
# The one command for a GPU machine (no Rust, no network needed), from the repo root with the
# carried dist/gpu/tilt (scripts/build-gpu-binary.sh):
#   1. finds the CUDA 13 libraries of the machine's python3 wheels (nvidia/cu13/lib), else a
#      system CUDA, and checks the binary resolves every library it needs;
#   2. `tilt gpu-check`: tilt's CUDA kernels against their CPU reference and the candle
#      computation they replace (values, gradients, bitwise repeat: the same comparisons as the
#      ignored test cuda_ops_match_the_cpu_reference), then learner steps/s of the quickstart's
#      MLP and the digits' U-Net, CPU vs GPU, batch 64..4096 (the U-Net on the CPU up to 256),
#      with the share of step time in tilt's own kernel;
#   3. five short runs end to end with every role on the GPU (`--set device=cuda`): the smoke
#      config, then with two data-parallel learner replicas on ["cuda:0","cuda:0"] and on
#      ["cuda:0","cpu"], the digits with the U-Net reference, DF-DPO on video.
# Writes gpu-check.json, gpu-check.log and smoke-*.log to OUT_DIR (default $OUT, else
# gpu-check/) and prints the tables. Exits 1 if the device, a comparison, a measurement or a
# smoke run fails.
# Usage: scripts/gpu-check.sh [OUT_DIR]   (env: TILT_BIN, default dist/gpu/tilt; BATCHES,
# default 64,256,1024,4096; SECONDS_PER, default 2; BUDGET, seconds for the whole benchmark,
# default 180: a batch predicted to overrun it is skipped and listed; SMOKE_ONLY=1 with
# SMOKE_DEVICE=cpu: only the five runs, on the CPU, which is how tests/gpu_check_script.rs keeps
# their commands working on a machine without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "gpu-check: $*" >&2; }
bin=${TILT_BIN:-dist/gpu/tilt}
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
[ -x "$bin" ] || { say "no executable $bin: build it with scripts/build-gpu-binary.sh and carry dist/gpu"; exit 1; }

libdirs=$(python3 - <<'PY' 2>/dev/null || true
import os
dirs = []
try:
    import nvidia
    for p in nvidia.__path__:
        for d in [os.path.join(p, "cu13", "lib")] + [os.path.join(p, q, "lib") for q in sorted(os.listdir(p))]:
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
except ImportError:
    pass
print(":".join(dirs))
PY
)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libdirs="${libdirs:+$libdirs:}$d"
done
if [ -n "$libdirs" ]; then
  export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# The driver's libcuda.so.1: from the loader's cache where the machine set it up, else from the
# driver folders a container runtime mounts (/usr/local/nvidia: the NVIDIA container toolkit).
if ldd "$bin" | grep -q 'libcuda\.so\.1 => not found'; then
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib; do
    if [ -e "$d/libcuda.so.1" ]; then
      export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
      break
    fi
  done
fi
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
# The C library: the binary asks for the glibc symbol versions of the machine it was built on
# (BUILD.txt: "glibc"); an older glibc here fails in ldd as "version GLIBC_2.xx not found".
missing=$(ldd "$bin" 2>&1 | grep 'not found' || true)
if [ -n "$missing" ]; then
  say "$bin cannot find these libraries (or library versions):"
  echo "$missing" >&2
  say "it needs the NVIDIA driver (libcuda.so.1), the CUDA 13 wheels of the libraries BUILD.txt lists"
  say "(nvidia-cublas, nvidia-curand) for python3 or their directories on LD_LIBRARY_PATH, and a glibc at least"
  say "as new as the build machine's ($(sed -n 's/^glibc: //p' dist/gpu/BUILD.txt 2>/dev/null || echo 'see BUILD.txt'))"
  exit 1
fi
ldd "$bin" | grep -E 'libcuda|cublas|curand|nvrtc|cudart' >&2 || true
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
  # The PTX (tilt's and candle's) is ISA 9.0 from nvcc 13.0: a driver older than 580 (CUDA 13.0)
  # refuses it at the first launch with CUDA_ERROR_UNSUPPORTED_PTX_VERSION; say so up front.
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
  if [ -n "$driver" ] && [ "${driver%%.*}" -lt 580 ] 2>/dev/null; then
    say "driver $driver is older than 580 (CUDA 13.0), which this build's PTX needs"
    exit 1
  fi
fi
[ -f dist/gpu/BUILD.txt ] && cat dist/gpu/BUILD.txt >&2

smoke_device=${SMOKE_DEVICE:-cuda}
case "$smoke_device" in
  cuda) dev0=cuda:0 ;;
  cpu) dev0=cpu ;;
  *) say "SMOKE_DEVICE must be cuda or cpu, not $smoke_device"; exit 1 ;;
esac
status=0
if [ "${SMOKE_ONLY:-0}" = 1 ]; then
  say "SMOKE_ONLY=1: no kernel comparisons, no benchmark"
else
  set +e
  "$bin" gpu-check --out "$out/gpu-check.json" --batches "${BATCHES:-64,256,1024,4096}" \
    --seconds "${SECONDS_PER:-2}" --budget "${BUDGET:-180}" 2>&1 | tee "$out/gpu-check.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  set -e
fi

# End-to-end runs with every role on the GPU (`--set device=cuda`), each to its summary:
# smoke-NAME.log in OUT_DIR. What each exercises there: the VRPO pipeline and its roles on the
# 2-D mixture; data-parallel replicas on ["cuda:0","cuda:0"] and on ["cuda:0","cpu"] (gradients
# averaged on cuda:0, copied to each replica); the digits with the U-Net reference, pretrained
# on the GPU (conv2d convs and one-hot class embeddings, forward and backward); DF-DPO on video
# (the video model's spatial and temporal convs). Tiny settings: minutes in all.
smoke() {
  local name=$1 config=$2
  shift 2
  say "smoke run $name: $config --set device=$smoke_device $*"
  local start rc
  start=$(date +%s)
  set +e
  "$bin" run "$config" --out "$(mktemp -d)/$name" --set "device=$smoke_device" --set metrics.listen= "$@" \
    >"$out/smoke-$name.log" 2>&1
  rc=$?
  set -e
  tail -n 3 "$out/smoke-$name.log"
  if [ "$rc" -eq 0 ]; then
    say "smoke run $name: ok in $(( $(date +%s) - start )) s"
  else
    say "smoke run $name: FAILED (exit $rc; $out/smoke-$name.log)"
    status=1
  fi
}
smoke mixture configs/smoke.toml
smoke dp-gpu-gpu configs/smoke.toml --set "learner.devices=[\"$dev0\",\"$dev0\"]"
smoke dp-gpu-cpu configs/smoke.toml --set "learner.devices=[\"$dev0\",\"cpu\"]"
smoke digits-unet configs/digits-smoke.toml --set data.model=unet --set pretrain.steps=20 \
  --set pretrain.batch=16
smoke dfdpo-video configs/video-dfdpo-ablation.toml --set video.clips=24 --set pretrain.steps=8 \
  --set pretrain.batch=4 --set dfdpo.steps=4 --set dfdpo.batch=2 --set dfdpo.curriculum.every=2 \
  --set eval.samples=3 --set sampling.steps=4 --set replay.min_size=8
exit "$status"
