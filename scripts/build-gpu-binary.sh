#!/usr/bin/env bash
# Build exactly what a GPU machine gets: dist/gpu/tilt, the stripped release binary of the `cuda`
# build (candle's CUDA backend + tilt's kernels), made here without a GPU from the PyPI toolchain
# of scripts/cuda-toolchain.sh. Carry `dist/gpu` and run scripts/gpu-check.sh there (it is tracked,
# so it travels with the tree). The binary needs, at run time, the driver's libcuda.so.1 and the
# CUDA 13 libraries that BUILD.txt's "needs:" line lists (libcublas.so.13, libcurand.so.10, ...:
# the nvidia-* wheels; gpu-check.sh finds them), and a glibc no older than this machine's symbols it
# uses (BUILD.txt says which); it refuses to start without them.
# Usage: scripts/build-gpu-binary.sh   (env: CARGO_TARGET_DIR, CUDA_COMPUTE_CAP, default 90)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "build-gpu-binary: $*" >&2; }

eval "$(scripts/cuda-toolchain.sh)"
target=${CARGO_TARGET_DIR:-target}
say "cargo build --profile gpu-dist --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
start=$(date +%s)
nice -n 15 cargo build --profile gpu-dist --features cuda --bin tilt
say "built in $(( $(date +%s) - start )) s"

# The profile (Cargo.toml: fat LTO, stripped) has its own directory; check it is a cuda build.
bin="$target/gpu-dist/tilt"
readelf -d "$bin" | grep -q 'NEEDED.*libcuda\.so\.1' \
  || { say "$bin does not link libcuda.so.1: not a cuda build"; exit 1; }
mkdir -p dist/gpu
strip -o dist/gpu/tilt.tmp "$bin" # a no-op beyond the profile's own strip, kept for safety
mv dist/gpu/tilt.tmp dist/gpu/tilt
size=$(stat -c %s dist/gpu/tilt)
limit=$((60 * 1000 * 1000))
{
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!dist' || echo ' (with uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) with nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  echo "size: $size bytes"
  echo "sha256: $(sha256sum dist/gpu/tilt | cut -d' ' -f1)"
  echo "needs: $(readelf -d dist/gpu/tilt | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  echo "glibc: symbols up to $(objdump -T dist/gpu/tilt | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1) (built on $(ldd --version | head -1))"
} >dist/gpu/BUILD.txt
cat dist/gpu/BUILD.txt >&2
[ "$size" -le "$limit" ] || { say "dist/gpu/tilt is $size bytes, over the $limit limit"; exit 1; }
say "carry dist/gpu; on the GPU machine: scripts/gpu-check.sh"
