"""Loads a folder shoal exported with transformers (and a PEFT adapter onto it) and prints
the logits of the token ids given, as JSON: what the Rust export test compares with.

    python scripts/check_hf_export.py MODEL_DIR ADAPTER_DIR|- '[[1, 2, 3], ...]'
"""

import json
import sys

import torch
import transformers

model_dir, adapter_dir, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
if adapter_dir != "-":
    import peft

    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
with torch.no_grad():
    logits = model(torch.tensor(tokens)).logits.float()
print(json.dumps(logits.flatten().tolist()))
