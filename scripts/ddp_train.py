"""PyTorch DDP (gloo, 127.0.0.1) training benchmark: the reference shoal's own training is
compared with. Spawns N ranks, trains a byte-level GPT (same shapes as shoal's built-in
`gpt`), an MLP, or a Hugging Face folder's model as transformers builds it (whole, or LoRA
adapters with peft) on random data generated once per rank, AdamW(lr 1e-3, wd 0.01), and
prints one JSON line to stdout:
{"impl","nodes","threads","model","batch","micro_batch","context","steps","step_ms","samples_per_s",
"tokens_per_s","peak_rss_bytes"} (peak_rss_bytes: rank 0's). Everything else goes to stderr.

    python ddp_train.py --nodes 2 --model gpt --batch 64 --steps 10 --warmup 2 [--threads 1]
    python ddp_train.py --nodes 2 --model mlp --features 64 --hidden 256,256 --classes 10
    python ddp_train.py --nodes 2 --model hf --hf DIR --context 256 [--lora-rank 8]

--batch is the global batch, split evenly across ranks (the remainder to the first ranks);
--micro-batch M computes a rank's share in passes of at most M (gradient accumulation, the
all-reduce in the last pass's backward: DDP's no_sync).

The GPT below is shoal's built-in `gpt` (node/src/models/gpt.rs) in pure PyTorch, op for op:
the same parameter names and shapes (`tok.weight`, `pos.weight`, `blocks.{i}.ln1|qkv|proj|ln2|
fc|fc2.weight|bias`, `ln_f.weight|bias`, `head.weight`: a shoal checkpoint's `model.*` tensors
load into it with `strict=True`), pre-norm blocks, causal scaled-dot-product attention, exact
(erf) GELU, LayerNorm eps 1e-5, N(0, 0.02) weights and zero biases. scripts/gpt_parity.py
checks it against shoal's logits (run by shoal's unit tests); change both together.
"""
import argparse
import contextlib
import json
import os
import resource
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

VOCAB = 256


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Block(nn.Module):
    """shoal's `gpt` block (node/src/models/gpt.rs, `Gpt::block`)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def attn(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        hd = c // self.heads
        q, k, v = (z.view(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).contiguous().view(b, t, c)

    def forward(self, x):
        h = x + self.proj(self.attn(self.ln1(x)))
        return h + self.fc2(F.gelu(self.fc(self.ln2(h))))  # exact (erf) gelu


class GPT(nn.Module):
    """shoal's `gpt` (node/src/models/gpt.rs, `Gpt::init` and `Gpt::forward`)."""

    def __init__(self, layers, heads, width, context):
        super().__init__()
        assert width % heads == 0, "--width must be divisible by --heads"
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def mlp(features, hidden, classes):
    dims = [features] + hidden
    mods = []
    for i, o in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(i, o), nn.ReLU()]
    mods.append(nn.Linear(dims[-1], classes))
    return nn.Sequential(*mods)


def hf_model(a):
    """The folder's model as transformers builds it (f32, its default attention), with peft's
    LoRA adapters on q_proj and v_proj (alpha twice the rank) when --lora-rank is given;
    and its vocabulary size."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
    model.config.use_cache = False
    if a.lora_rank:
        import peft

        cfg = peft.LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0,
                              target_modules=["q_proj", "v_proj"])
        model = peft.get_peft_model(model, cfg)
    return model.train(), model.config.vocab_size


def local_batch(batch, nodes, rank):
    return batch // nodes + (1 if rank < batch % nodes else 0)


def micro_batches(n, limit):
    """[lo, hi) passes over a local batch of n: the fewest of at most `limit` (0: one),
    sizes differing by at most one, the larger first (shoal's `sharding::micro_batches`)."""
    passes = 1 if limit == 0 else -(-n // limit)
    base, extra = divmod(n, passes)
    out, lo = [], 0
    for i in range(passes):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def worker(rank, a, port, queue):
    torch.set_num_threads(a.threads)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", rank=rank, world_size=a.nodes)
    try:
        torch.manual_seed(a.seed)  # same init everywhere (DDP also broadcasts rank 0's)
        vocab = VOCAB
        if a.model == "gpt":
            model = GPT(a.layers, a.heads, a.width, a.context)
        elif a.model == "hf":
            model, vocab = hf_model(a)
        else:
            model = mlp(a.features, a.hidden, a.classes)
        nparams = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ddp = DDP(model)
        if a.compress == "bf16":
            # Gradients travel in bf16 and are summed back in f32 (PyTorch's own hook).
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)

        b = local_batch(a.batch, a.nodes, rank)
        g = torch.Generator().manual_seed(a.seed * 1000003 + rank)
        if a.model in ("gpt", "hf"):
            data = torch.randint(0, vocab, (b, a.context + 1), dtype=torch.int64, generator=g)
            x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        else:
            x = torch.randn(b, a.features, generator=g)
            y = torch.randint(0, a.classes, (b,), dtype=torch.int64, generator=g)

        parts = micro_batches(b, a.micro_batch)

        def step():
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i, (lo, hi) in enumerate(parts):
                # Gradients accumulate locally; DDP all-reduces in the last backward only.
                last = i == len(parts) - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    out = ddp(x[lo:hi])
                    if a.model == "hf":
                        out = out.logits
                    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[lo:hi].reshape(-1))
                    (loss * ((hi - lo) / b)).backward()
                total += loss.item() * (hi - lo) / b
            opt.step()
            return torch.tensor(total)

        if rank == 0:
            log(f"ddp: {a.nodes} rank(s), {a.threads} thread(s) each, model {a.model} "
                f"({nparams} trained params), global batch {a.batch}, local batch {b}")
        for _ in range(a.warmup):
            step()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            loss = step()
        dist.barrier()
        elapsed = time.perf_counter() - t0
        if rank == 0:
            log(f"ddp: final loss {loss.item():.4f}")
            queue.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=["gpt", "mlp", "hf"], default="gpt")
    p.add_argument("--hf", help="the model folder of --model hf")
    p.add_argument("--lora-rank", type=int, default=0, help="--model hf: LoRA of this rank")
    p.add_argument("--compress", choices=["none", "bf16"], default="none",
                   help="gradients on the wire: none (f32) or bf16 (DDP's bf16_compress_hook)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=lambda s: [int(v) for v in s.split(",") if v], default=[256, 256])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=0,
                   help="at most this many samples per forward/backward (gradient accumulation "
                        "with DDP's no_sync); 0: a rank's whole batch in one pass")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.model == "hf" and not a.hf:
        p.error("--model hf needs --hf DIR")
    if a.nodes < 1 or a.batch < a.nodes or a.steps < 1 or a.warmup < 0 or a.threads < 1:
        p.error("need --nodes >= 1, --batch >= --nodes, --steps >= 1, --warmup >= 0, --threads >= 1")

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, a, port, q)) for r in range(a.nodes)]
    for pr in procs:
        pr.start()
    got = None
    try:
        while got is None:
            try:
                got = q.get(timeout=1)
            except Exception:  # queue.Empty: check that nobody died
                if any(pr.exitcode not in (None, 0) for pr in procs):
                    break
                if all(pr.exitcode is not None for pr in procs):
                    break
    finally:
        for pr in procs:
            pr.join(timeout=60)
            if pr.is_alive():
                pr.terminate()
    if got is None or any(pr.exitcode != 0 for pr in procs):
        log(f"ddp: a rank failed (exit codes {[pr.exitcode for pr in procs]})")
        sys.exit(1)
    elapsed, peak = got
    model = "hf-lora" if a.model == "hf" and a.lora_rank else a.model
    print(json.dumps({"impl": "ddp", "nodes": a.nodes, "threads": a.threads, "model": model,
                      "batch": a.batch, "micro_batch": a.micro_batch, "context": a.context,
                      "steps": a.steps,
                      "step_ms": elapsed / a.steps * 1e3,
                      "samples_per_s": a.batch * a.steps / elapsed,
                      "tokens_per_s": a.batch * a.steps * a.context / elapsed,
                      "peak_rss_bytes": peak}), flush=True)


if __name__ == "__main__":
    main()
