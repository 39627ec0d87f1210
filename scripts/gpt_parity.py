"""Checks that scripts/ddp_train.py's GPT is shoal's built-in `gpt`: loads a shoal-written
safetensors file holding a gpt's weights (`model.*`, the architecture in the metadata key
`model`), a batch of tokens (`parity.tokens`, [B, T] as f32) and the logits shoal computed
for them (`parity.logits`, [B, T, 256]); loads the weights into ddp_train.GPT with
`strict=True` (so every parameter name and shape must match), runs its forward and prints
one JSON line {"params", "max_abs_diff"}. Exits 1 when the logits differ by more than
--tolerance (default 1e-5), 2 on a usage or loading error.

    python gpt_parity.py FILE.safetensors [--tolerance 1e-5]

Run by shoal's test `models::tests::python_baseline_is_the_same_gpt`.
"""
import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_train import GPT  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--tolerance", type=float, default=1e-5)
    a = p.parse_args()
    try:
        tensors = load_file(a.file)
        with safe_open(a.file, framework="pt") as f:
            arch = json.loads((f.metadata() or {})["model"])
        model = GPT(arch["layers"], arch["heads"], arch["width"], arch["context"])
        state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
        tokens = tensors["parity.tokens"].long()
        want = tensors["parity.logits"]
    except Exception as e:  # missing keys, wrong shapes, unreadable file
        print(f"gpt_parity: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    with torch.no_grad():
        got = model(tokens)
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    print(json.dumps({"params": sum(t.numel() for t in model.parameters()), "max_abs_diff": diff}), flush=True)
    sys.exit(0 if diff <= a.tolerance else 1)


if __name__ == "__main__":
    main()
