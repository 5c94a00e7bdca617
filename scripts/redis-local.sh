#!/usr/bin/env bash
# Start a local Redis on 127.0.0.1:6379 (no persistence) unless one already answers.
set -euo pipefail
if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "redis already running on 127.0.0.1:6379"
else
  redis-server --daemonize yes --port 6379 --save "" --appendonly no
  echo "redis started on 127.0.0.1:6379"
fi
