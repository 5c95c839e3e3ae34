#!/usr/bin/env bash
# Starts dockerd when no Docker engine answers (for the docker tests), and waits for it.
# Used by test.sh and soak.sh.
set -euo pipefail
sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: /tmp/harness-dockerd.log)"
  # --live-restore keeps containers running while dockerd itself restarts.
  $sudo_cmd sh -c 'nohup dockerd --live-restore >/tmp/harness-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 /tmp/harness-dockerd.log; exit 1; }
fi
