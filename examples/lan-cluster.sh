#!/usr/bin/env bash
# Three nodes by hand on one machine, the way you would start them on three machines:
# the first node prints its address; the others bootstrap from it. Loopback only, mDNS off
# (on a real LAN, drop --no-mdns and --bootstrap: mDNS finds the peers).
set -euo pipefail
BIN="${SHOAL_BIN:-target/release/shoal}"
DIR="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$DIR"' EXIT
"$BIN" up --data-dir "$DIR/a" --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 --no-mdns 2>"$DIR/a.log" &
until [ -s "$DIR/a/listen.addrs" ]; do sleep 0.1; done
BOOT="$(grep /tcp/ "$DIR/a/listen.addrs" | head -1)"
for n in b c; do
    "$BIN" up --data-dir "$DIR/$n" --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 --no-mdns \
        --bootstrap "$BOOT" 2>"$DIR/$n.log" &
done
until [ -s "$DIR/c/api.addr" ]; do sleep 0.1; done
sleep 2
"$BIN" status --api "$(cat "$DIR/a/api.addr")"
