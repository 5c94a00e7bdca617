#!/usr/bin/env bash
# Replay throughput in one run: tilt's memory and Redis backends (criterion), next to
# redis-benchmark XADD on the same Redis, for 1 KiB / 64 KiB / 1 MiB payloads.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/redis-local.sh >/dev/null
cargo bench --bench replay_backends 2>&1 | grep -E "^replay/|thrpt|time:"
# redis-benchmark cannot put a sized payload into XADD (its __data__ placeholder is not expanded in
# custom commands): XADD of a small entry gives the operation rate, SET -d SIZE the byte rate.
echo "redis-benchmark XADD (small entry), 50 clients:"
redis-benchmark -h 127.0.0.1 -p 6379 -q -n 100000 -c 50 XADD tilt:bench:raw MAXLEN '~' 1000 '*' f v | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -1
for size in 1024 65536 1048576; do
  n=$(( size >= 1048576 ? 500 : (size >= 65536 ? 5000 : 100000) ))
  echo "redis-benchmark SET ${size} B, 50 clients:"
  redis-benchmark -h 127.0.0.1 -p 6379 -q -t set -n "$n" -c 50 -d "$size" | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -1
done
redis-cli -h 127.0.0.1 -p 6379 del tilt:bench:raw key:__rand_int__ >/dev/null
