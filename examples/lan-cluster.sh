#!/usr/bin/env bash
# Three nodes by hand on one machine, the way you would start them on three machines:
# the first node publishes its address; the others bootstrap from it. Loopback only, mDNS
# off (on a real LAN, drop --no-mdns and --bootstrap: mDNS finds the peers, and drop the
# 127.0.0.1 listen addresses to use the defaults on all interfaces).
set -euo pipefail
BIN="${SHOAL_BIN:-target/release/shoal}"
DIR="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$DIR"' EXIT
LOCAL=(--listen /ip4/127.0.0.1/tcp/0 --data-listen 127.0.0.1:0 --api 127.0.0.1:0 --no-mdns)
"$BIN" up --data-dir "$DIR/a" "${LOCAL[@]}" 2>"$DIR/a.log" &
until [ -s "$DIR/a/listen.addrs" ]; do sleep 0.1; done
BOOT="$(grep /tcp/ "$DIR/a/listen.addrs" | head -1)"
for n in b c; do
    "$BIN" up --data-dir "$DIR/$n" "${LOCAL[@]}" --bootstrap "$BOOT" 2>"$DIR/$n.log" &
done
API="$(cat "$DIR/a/api.addr")"
# Wait (at most 30 s) until node a's view holds all three.
for _ in $(seq 300); do
    members="$("$BIN" status --json --api "$API" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["view"]["members"]))')"
    [ "$members" = 3 ] && break
    sleep 0.1
done
"$BIN" status --api "$API"
