#!/usr/bin/env python3
"""Writes the fine-tuning example's chat data from the play text shipped in the repo
(data/tinyshakespeare.txt): one conversation per speech of the most frequent speakers, the
user quoting the speech's first line and the assistant naming who says it.

    {"messages": [{"role": "user", "content": "Who says: \"O Romeo, Romeo! ...\""},
                  {"role": "assistant", "content": "JULIET"}]}

usage: make_chat.py OUT.jsonl [--speakers N]   (default: the 12 most frequent speakers)
"""
import argparse
import collections
import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def speeches(path):
    """(speaker, first line) of every speech: blocks separated by a blank line whose first
    line is `NAME:`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for block in text.split("\n\n"):
        lines = [l for l in block.strip().split("\n") if l.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            yield lines[0][:-1], lines[1].strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--speakers", type=int, default=12)
    a = ap.parse_args()
    all_speeches = list(speeches(os.path.join(ROOT, "data", "tinyshakespeare.txt")))
    counts = collections.Counter(s for s, _ in all_speeches)
    keep = {s for s, _ in counts.most_common(a.speakers)}
    n = 0
    with open(a.out, "w", encoding="utf-8") as f:
        for speaker, line in all_speeches:
            if speaker in keep:
                messages = [
                    {"role": "user", "content": f'Who says: "{line}"'},
                    {"role": "assistant", "content": speaker},
                ]
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                n += 1
    print(f"{a.out}: {n} conversations, speakers {sorted(keep)}")


if __name__ == "__main__":
    main()
