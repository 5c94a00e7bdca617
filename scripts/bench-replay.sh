#!/usr/bin/env bash
# Replay throughput in one run: tilt's memory and Redis backends (criterion), next to
# redis-benchmark XADD on the same Redis, for 1 KiB / 64 KiB / 1 MiB entries.
#
# The comparison is like for like: one client (-c 1) pipelining a unit of N entries (-P N), N as
# in benches/replay_backends.rs (512, 64, 8), the entry's payload read from stdin (-x: the
# __data__ placeholder is not expanded in custom commands). tilt's round trip also samples and
# acknowledges the unit, which redis-benchmark does not. The last line gives, per size, tilt's
# batched Redis path (`redis_batch`: one insert_many per unit) in bytes/s over redis-benchmark's;
# the line before gives the per-record path (`redis`) the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/redis-local.sh >/dev/null
target="${CARGO_TARGET_DIR:-target}"
cargo bench --bench replay_backends 2>&1 | grep -E "^replay/|thrpt|time:"
declare -A rb
for spec in 1KiB:1024:512 64KiB:65536:64 1MiB:1048576:8; do
  IFS=: read -r label size batch <<<"$spec"
  n=$(( size >= 1048576 ? 400 : (size >= 65536 ? 6400 : 200000) ))
  rps=$(head -c "$size" /dev/zero | tr '\0' x |
    redis-benchmark -h 127.0.0.1 -p 6379 -q -n "$n" -c 1 -P "$batch" -x \
      XADD tilt:bench:raw MAXLEN '~' 1000 '*' f 2>&1 |
    tr '\r' '\n' | grep 'requests per second' | tail -1 | sed -E 's/.*: ([0-9.]+) requests per second.*/\1/')
  echo "redis-benchmark XADD ${size} B, -c 1 -P ${batch}: ${rps} entries/s"
  rb[$label]="$rps"
done
redis-cli -h 127.0.0.1 -p 6379 del tilt:bench:raw >/dev/null
ratios() {
  local path="$1" out=""
  for spec in 1KiB:1024:512 64KiB:65536:64 1MiB:1048576:8; do
    IFS=: read -r label size batch <<<"$spec"
    est="$target/criterion/replay/$path/$label/new/estimates.json"
    r=$(python3 -c '
import json, sys
ns = json.load(open(sys.argv[1]))["mean"]["point_estimate"]
size, batch, rps = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
print(f"{(size * batch / (ns * 1e-9)) / (rps * size):.2f}")' "$est" "$size" "$batch" "${rb[$label]}")
    out="$out $label $r"
  done
  echo "$out"
}
echo "ratios per record (redis):$(ratios redis)"
echo "ratios:$(ratios redis_batch)"
