#!/usr/bin/env python3
"""Reads `shoal serve --json` lines from stdin and prints the plan and each sum asked.

The demo model writes answers least-significant digit first (`37+45=` -> `280`), as the
built-in arithmetic corpus teaches it; this prints them the usual way round too.
"""
import json
import sys

for line in sys.stdin:
    v = json.loads(line)
    if "served" in v:
        for i, r in enumerate(v["replicas"]):
            print(f"  replica {i}: " + " -> ".join(s[-16:] for s in r))
        continue
    q, raw, ms = v["prompt"], v["completion"], v["ms"]
    a, b = (int(x) for x in q.rstrip("=").split("+"))
    answer = raw[::-1].lstrip("0") or "0"
    mark = "right" if answer == str(a + b) else f"wrong, {a + b} expected"
    print(f"  {q}{answer}   (the model wrote {raw!r} in {ms:.1f} ms: {mark})")
