#!/usr/bin/env python3
"""Reads `shoal serve --json` lines from stdin and prints the plan and each sum asked.

Each sum reads as arithmetic: `12+34 = 46 ✓ (3.1 ms)`, or `37+45 = 83 ✗ (expected 82)`.
The demo model writes its answers least-significant digit first (`37+45=` -> `280`), as
the built-in arithmetic corpus teaches it (a small transformer learns the carries more
easily that way); the answers are shown the usual way round. With `--verbose` (or
SHOAL_DEMO_VERBOSE=1) each line also shows what the model wrote.
"""
import json
import os
import sys

verbose = "--verbose" in sys.argv[1:] or os.environ.get("SHOAL_DEMO_VERBOSE", "") not in ("", "0")

for line in sys.stdin:
    v = json.loads(line)
    if "served" in v:
        for i, r in enumerate(v["replicas"]):
            print(f"  replica {i}: " + " -> ".join(s[-16:] for s in r))
        continue
    q, raw, ms = v["prompt"], v["completion"], v["ms"]
    a, b = (int(x) for x in q.rstrip("=").split("+"))
    answer = raw[::-1].lstrip("0") or "0"
    mark = "✓" if answer == str(a + b) else f"✗ (expected {a + b})"
    detail = f"; the model wrote {raw!r}, digits reversed as trained" if verbose else ""
    print(f"  {a:02d}+{b:02d} = {answer} {mark}   ({ms:.1f} ms{detail})")
