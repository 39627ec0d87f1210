"""Bring your own model: a small PyTorch classifier for 8x8 digit images (64 float features,
10 classes), exported as TorchScript so shoal can load and train it without Python.

    $SHOAL_PYTHON examples/byo_model/export.py [OUT]     (default examples/byo_model/model.pt)

The export is deterministic, byte for byte: weights come from torch.manual_seed(0), and the
script re-runs itself under PYTHONHASHSEED=0 because TorchScript writes a module's constants
in Python set order. The module is saved in train mode with every parameter requiring grad,
so it can be trained after torch::jit::load / tch's CModule.
The parameter count goes to stderr.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class DigitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, 64] floats (an 8x8 image, row-major) -> logits [B, 10]
        x = x.reshape(-1, 1, 8, 8)
        x = F.relu(self.conv(x))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.pt")
    out = sys.argv[1] if len(sys.argv) > 1 else default
    torch.manual_seed(0)
    model = DigitNet()
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    scripted = torch.jit.script(model)
    scripted.train()
    torch.jit.save(scripted, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"byo_model: {n} parameters, saved to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
