#!/usr/bin/env bash
# Deletes every RabbitMQ queue whose name starts with the given topology base and a dot (the
# benchmarks' own environments).
# Usage: scripts/delete-queues.sh BASE
set -euo pipefail
base=${1:?usage: scripts/delete-queues.sh BASE}
rabbitmqctl -q list_queues name 2>/dev/null | while read -r queue; do
  # </dev/null: rabbitmqctl reads stdin, and would swallow the rest of the list.
  case "$queue" in "$base".*) rabbitmqctl -q delete_queue "$queue" </dev/null >/dev/null 2>&1 || true ;; esac
done
