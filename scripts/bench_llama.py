"""The benchmarks' Llama: a random-initialised Llama of about 150 M parameters at the
defaults (hidden 768, 16 blocks, 12 heads, 4 key/value heads, MLP 2048, vocabulary 32000,
no eos: generation runs to its length), written with `save_pretrained` into a folder:
nothing is downloaded. Used by bench_serve_hf.py and bench-train-hf.

    python scripts/bench_llama.py DIR [--hidden 768] [--layers 16] [--dtype f32|bf16]
        [--tokenizer FOLDER]   (also copy a tokenizer's files into DIR, for text data)
"""
import argparse
import os
import shutil

import torch
import transformers


def make_llama(dir, hidden=768, layers=16, dtype=torch.float32):
    """Writes the model into `dir`; returns it (eval mode) and its parameter count."""
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(dir, max_shard_size="200MB")
    return model, sum(p.numel() for p in model.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--tokenizer")
    a = p.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    _, params = make_llama(a.dir, a.hidden, a.layers, dtype)
    if a.tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.exists(os.path.join(a.tokenizer, name)):
                shutil.copy(os.path.join(a.tokenizer, name), a.dir)
    print(f"{a.dir}: llama, {params / 1e6:.0f} M parameters ({a.layers} blocks, hidden {a.hidden}), {a.dtype}")


if __name__ == "__main__":
    main()
