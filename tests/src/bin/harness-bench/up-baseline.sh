#!/bin/bash
# The `up` benchmark's baseline as the foundation issue words it: a shell loop that
# spawns the same services in the same order and waits for each port of a wave before
# the next. Usage: up-baseline.sh BUSYBOX WWW WAVES PORT...; prints the httpd pids.
set -u
bb=$1 www=$2 waves=$3
shift 3
ports=("$@")
per_wave=$(( ${#ports[@]} / waves ))
pids=()
# A 1 ms pause without a fork (a read that times out on a pipe nobody writes).
exec 9<> <(:)
for (( w = 0; w < waves; w++ )); do
  for (( i = 0; i < per_wave; i++ )); do
    "$bb" httpd -f -p "127.0.0.1:${ports[w * per_wave + i]}" -h "$www" >/dev/null 2>&1 &
    pids+=($!)
  done
  for (( i = 0; i < per_wave; i++ )); do
    until : 2>/dev/null >"/dev/tcp/127.0.0.1/${ports[w * per_wave + i]}"; do
      read -r -t 0.001 -u 9 || true
    done
  done
done
echo "${pids[@]}"
