#!/usr/bin/env bash
# Stops the ingress and processor started by scripts/up.sh (gracefully: SIGTERM, then waits).
# The database, Redis and RabbitMQ keep running.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in ingress processor; do
  pidfile=".run/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    echo "stopped $name"
  fi
  rm -f "$pidfile"
done
