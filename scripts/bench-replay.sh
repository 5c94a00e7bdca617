#!/usr/bin/env bash
# Replay throughput in one run: tilt's memory and Redis backends (criterion,
# benches/replay_backends.rs), next to redis-benchmark on the same Redis, for 1 KiB / 64 KiB /
# 1 MiB records.
#
# Like for like: one connection (-c 1) and a pipeline depth of one unit (-P N), N = 512, 64, 8
# records as in the bench, where tilt sends one unit per call; the entry's payload read from stdin
# (-x: __data__ is not expanded in custom commands). Per size, on a fresh stream with a group:
#   XADD:       redis-benchmark XADD <stream> * f <payload> (no trimming): writes the bytes.
#   XREADGROUP: redis-benchmark XREADGROUP GROUP g c COUNT 1 STREAMS <stream> > over the entries
#               just added: reads each back once, through the consumer group (a pending entry each).
# tilt's side, each iteration one unit of fresh records made outside the timing:
#   insert      (`redis_batch_insert`): insert_many of the unit (admission script, then one
#               MULTI/EXEC of plain XADDs + commit script); the sample and ack run untimed.
#   round trip  (`redis_batch`): insert_many, sample the unit back, ack it (XACK + XDEL, uses
#               and counters in a script) - what the actors do with a unit.
# Ratios, tilt's Redis backend over redis-benchmark in records/s at equal record size,
# connections and pipeline depth:
#   insert:     tilt insert over XADD.
#   round trip: tilt round trip over the command sequence XADD then XREADGROUP, timed as the sum
#               of the two runs' times per entry. The sequence leaves out the acknowledgement and
#               deletion (redis-benchmark cannot name the entry ids), which tilt's round trip
#               pays, so this ratio understates tilt.
# The last line, `ratios: 1KiB R1 64KiB R2 1MiB R3`, gives the round-trip ratios; the line before
# it the insert ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/redis-local.sh >/dev/null
target="${CARGO_TARGET_DIR:-target}"
cargo bench --bench replay_backends 2>&1 | grep -E "^replay/|thrpt|time:"
rcli() { redis-cli -h 127.0.0.1 -p 6379 "$@"; }
# Requests per second of a redis-benchmark run (its final line).
rps() {
  tr '\r' '\n' | grep 'requests per second' | tail -1 |
    sed -E 's/.*: ([0-9.]+) requests per second.*/\1/'
}
declare -A xadd xread
stream=tilt:bench:raw
for spec in 1KiB:1024:512 64KiB:65536:64 1MiB:1048576:8; do
  IFS=: read -r label size batch <<<"$spec"
  n=$(( size >= 1048576 ? 400 : (size >= 65536 ? 6400 : 200000) ))
  rcli del "$stream" >/dev/null
  rcli xgroup create "$stream" g '$' MKSTREAM >/dev/null
  xadd[$label]=$(head -c "$size" /dev/zero | tr '\0' x |
    redis-benchmark -h 127.0.0.1 -p 6379 -q -n "$n" -c 1 -P "$batch" -x \
      XADD "$stream" '*' f 2>&1 | rps)
  xread[$label]=$(redis-benchmark -h 127.0.0.1 -p 6379 -q -n "$n" -c 1 -P "$batch" \
    XREADGROUP GROUP g c COUNT 1 STREAMS "$stream" '>' 2>&1 | rps)
  # Every entry added was read back once (redis-benchmark rounds n up to a multiple of -P).
  len=$(rcli xlen "$stream")
  pending=$(rcli xpending "$stream" g | head -1)
  if [ "$len" != "$pending" ] || [ "$len" -lt "$n" ]; then
    echo "redis-benchmark check failed at $label: $len entries, $pending read" >&2
    exit 1
  fi
  echo "redis-benchmark ${size} B, -c 1 -P ${batch}: XADD ${xadd[$label]} entries/s," \
    "XREADGROUP ${xread[$label]} entries/s ($len entries)"
  rcli del "$stream" >/dev/null
done
ratios() {
  local path="$1" what="$2" out=""
  for spec in 1KiB:1024:512 64KiB:65536:64 1MiB:1048576:8; do
    IFS=: read -r label size batch <<<"$spec"
    est="$target/criterion/replay/$path/$label/new/estimates.json"
    r=$(python3 -c '
import json, sys
ns = json.load(open(sys.argv[1]))["mean"]["point_estimate"]
batch, add, read, what = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
tilt = batch / (ns * 1e-9)
ref = add if what == "insert" else 1.0 / (1.0 / add + 1.0 / read)
print(f"{tilt / ref:.2f}")' "$est" "$batch" "${xadd[$label]}" "${xread[$label]}" "$what")
    out="$out $label $r"
  done
  echo "$out"
}
echo "ratios round trip per record (redis, one insert per record):$(ratios redis roundtrip)"
echo "ratios insert (redis_batch_insert over XADD):$(ratios redis_batch_insert insert)"
echo "ratios:$(ratios redis_batch roundtrip)"
