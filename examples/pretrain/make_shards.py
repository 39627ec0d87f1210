#!/usr/bin/env python3
"""Writes the pretraining example's dataset: the play shipped in the repo
(data/tinyshakespeare.txt) as Parquet shards the way datasets are published (pyarrow, a
`text` column, one row per speech, snappy pages, row groups of 512 rows).

usage: make_shards.py OUT_DIR [--shards N]   (default: 4 shards, train-0000i-of-0000N.parquet)
"""
import argparse
import os

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shards", type=int, default=4)
    a = ap.parse_args()
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        speeches = [s.strip() for s in f.read().split("\n\n") if s.strip()]
    os.makedirs(a.out, exist_ok=True)
    per = -(-len(speeches) // a.shards)
    for i in range(a.shards):
        rows = speeches[i * per : (i + 1) * per]
        path = os.path.join(a.out, f"train-{i:05d}-of-{a.shards:05d}.parquet")
        pq.write_table(pa.table({"text": rows}), path, row_group_size=512, compression="snappy")
    print(f"{a.out}: {len(speeches)} speeches in {a.shards} Parquet shards")


if __name__ == "__main__":
    main()
