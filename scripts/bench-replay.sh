#!/usr/bin/env bash
# Replay throughput in one run: tilt's memory and Redis backends (criterion), next to
# redis-benchmark XADD on the same Redis, for 1 KiB / 64 KiB / 1 MiB payloads.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/redis-local.sh >/dev/null
cargo bench --bench replay_backends 2>&1 | grep -E "^replay/|thrpt|time:"
for size in 1024 65536 1048576; do
  n=$(( size >= 1048576 ? 200 : (size >= 65536 ? 2000 : 50000) ))
  echo "redis-benchmark XADD ${size} B payload, 50 clients:"
  redis-benchmark -h 127.0.0.1 -p 6379 -q -n "$n" -c 50 -d "$size" XADD tilt:bench:raw MAXLEN '~' 1000 '*' f __data__ | tail -1
done
redis-cli -h 127.0.0.1 -p 6379 del tilt:bench:raw >/dev/null
