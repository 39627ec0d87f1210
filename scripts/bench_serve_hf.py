"""Serving a Hugging Face Llama, side by side: shoal against transformers' `generate`.

Run through `scripts/bench-serve-hf` (it builds shoal first). In one run, alternating
rounds (this machine's speed drifts from minute to minute, so ratios are taken within a
round and their median reported):

  * a random-initialised Llama of about 150 M parameters (hidden 768, 16 blocks, 12 heads,
    4 key/value heads, vocabulary 32000, f32; no eos, so every answer is `--tokens` long)
    is written with `save_pretrained` into a temporary folder: nothing is downloaded;
  * transformers: `generate` (greedy, KV cache) one prompt at a time, then the 8 prompts
    as one left-padded batch (the best it does without a server);
  * shoal, 1 node (`shoal serve --local 1`): the same prompts as token ids through
    `/v1/completions` with `stream`, one at a time, then 8 concurrent requests;
  * shoal, 2 nodes, 2 stages: 3 x 8 concurrent requests (three micro-batches of 8 in
    flight), for the pipeline efficiency throughput(2 stages) / (2 x throughput(1 node at
    8 concurrent)), after one warm-up run of the same load (in which the planner re-cuts
    the stages from the speeds the members measured); the 1-node run at 8 concurrent is
    repeated after the pipeline's and the efficiency divides by the two runs' mean;
  * each node's peak resident memory (VmHWM, reset after the pipeline's warm-up run)
    against its stage's share of the weights and its KV caches.

Tokens/s counts generated tokens over the wall time of the run; time to first token (TTFT)
is from sending the request to its first token; inter-token latency (ITL) the gaps
between a request's later tokens (p50 and p99 over every gap of the run). Same torch
threads everywhere (`--threads`, default 1; each shoal node gets that many).

    python scripts/bench_serve_hf.py SHOAL_BIN [--tokens 64] [--repeat 3] [--threads 1]
        [--dtype f32|bf16] [--layers 16] [--hidden 768] [--skip-pipeline] [--memory-only]
        [--json]
"""

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import transformers
from bench_llama import make_llama
from safetensors import safe_open

P = argparse.ArgumentParser()
P.add_argument("shoal")
P.add_argument("--tokens", type=int, default=64)
P.add_argument("--repeat", type=int, default=3)
P.add_argument("--threads", type=int, default=1)
P.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
P.add_argument("--layers", type=int, default=16)
P.add_argument("--hidden", type=int, default=768)
P.add_argument("--json", action="store_true")
P.add_argument("--skip-pipeline", action="store_true")
# Only the 2-stage pipeline's memory: a warm-up and a measured run of 24 concurrent requests,
# no transformers and no throughput (for models too large for the timed rounds on this machine).
P.add_argument("--memory-only", action="store_true")
A = P.parse_args()
torch.set_num_threads(A.threads)
TORCH_DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16}[A.dtype]
BATCH = 8


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_model(dir):
    return make_llama(dir, A.hidden, A.layers, TORCH_DTYPE)


def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 32000, (24 + 2 * i,), generator=g).tolist() for i in range(BATCH)]


def pct(v, p):
    v = sorted(v)
    return v[max(0, min(len(v) - 1, int(round(p * len(v) + 0.5)) - 1))] if v else float("nan")


class Times(transformers.generation.streamers.BaseStreamer):
    """Time of every step `generate` streams (the first `put` is the prompt)."""

    def __init__(self):
        self.t, self.first = [], True

    def put(self, value):
        if self.first:
            self.first = False
            return
        self.t.append(time.perf_counter())

    def end(self):
        pass


def hf_one(model, ps):
    """transformers, one prompt at a time: (tokens/s, ttfts, itls, outputs)."""
    ttft, itl, outs, n = [], [], [], 0
    t0 = time.perf_counter()
    for p in ps:
        s = Times()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), max_new_tokens=A.tokens, min_new_tokens=A.tokens,
                                 do_sample=False, streamer=s, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        outs.append(out[0, len(p):].tolist())
        n += len(outs[-1])
        ttft.append(s.t[0] - start)
        itl += [b - a for a, b in zip(s.t, s.t[1:])]
    return n / (time.perf_counter() - t0), ttft, itl, outs


def hf_batch(model, ps):
    """transformers, the prompts as one left-padded batch."""
    L = max(len(p) for p in ps)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps])
    s = Times()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=A.tokens, min_new_tokens=A.tokens,
                             do_sample=False, streamer=s)
    wall = time.perf_counter() - start
    n = (out.shape[1] - L) * len(ps)
    return n / wall, [s.t[0] - start] * len(ps), [b - a for a, b in zip(s.t, s.t[1:])] * len(ps)


def stream(api, prompt, rec):
    """One streamed greedy completion of token ids; appends (start, [token times], ids)."""
    host, port = api.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": A.tokens,
                       "temperature": 0, "stream": True})
    start = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"shoal answered {r.status}: {r.read()[:300]!r}")
    times, ids = [], []
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ch = json.loads(line[6:])["choices"][0]
        toks = ch.get("tokens") or []
        now = time.perf_counter()
        times += [now] * len(toks)
        ids += toks
    c.close()
    rec.append((start, times, ids))


def shoal_run(api, ps, concurrency):
    """`concurrency` clients, each streaming the next prompt of `ps` when its last ends."""
    recs, lock, nxt = [], threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(ps):
                return
            stream(api, ps[i], recs)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    n = sum(len(r[2]) for r in recs)
    ttft = [r[1][0] - r[0] for r in recs if r[1]]
    itl = [b - a for r in recs for a, b in zip(r[1], r[1][1:]) if b > a]
    # Tokens of one chunk share a time: ITL counts distinct arrivals only.
    return n / wall, ttft, itl, recs


def status(api):
    """The node's `GET /v1/status`."""
    host, port = api.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/v1/status")
    return json.loads(c.getresponse().read())


class Cluster:
    """`shoal serve --local n DIR --stages s`, running until closed."""

    def __init__(self, dir, n, stages, work):
        env = dict(os.environ, SHOAL_SERVE_THREADS=str(A.threads), SHOAL_SERVE_MAX_BATCH=str(BATCH),
                   SHOAL_SERVE_CACHE="0")
        self.p = subprocess.Popen([A.shoal, "serve", "--local", str(n), "--stages", str(stages), "--name", "bench", "--json",
                                   "--dtype", A.dtype, "--device", "cpu", "--dir", work, dir],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        for line in self.p.stdout:
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if "served" in v:
                self.apis, self.replicas = v["apis"], v["replicas"]
                break
        else:
            raise SystemExit(f"shoal serve exited; logs under {work}")
        # Each node's resident memory before any layer is loaded (they load on first use).
        self.base = {n["node"]["id"]: n["node"]["memory"]["rss_bytes"] for n in map(status, self.apis)}

    def cut(self):
        """The members and layer ranges serving now."""
        return status(self.apis[0])["serving"][0]["replicas"][0]

    def close(self):
        """Each stage's (layers, idle RSS, peak RSS) in the plan serving now (the planner
        may have re-cut the one `serve` started with), then stops the nodes."""
        reports = list(map(status, self.apis))
        nodes = {n["node"]["id"]: n["node"]["memory"] for n in reports}
        self.stages = []
        for member in reports[0]["serving"][0]["replicas"][0]:
            m = re.match(r"(.+)\[(\d+)\.\.(\d+)\]$", member)
            self.stages.append((range(int(m.group(2)), int(m.group(3))), self.base[m.group(1)],
                                nodes[m.group(1)]["peak_rss_bytes"]))
        self.p.send_signal(2)
        self.p.wait(60)


def reset_peaks(work):
    """Resets the peak resident size (VmHWM) of every node process running under `work`
    to its resident size now (Linux: `5` into /proc/PID/clear_refs)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if b"up" in cmd and any(work.encode() in a for a in cmd):
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
        except OSError:
            pass


def stage_share(dir, layers):
    """Bytes of the weights stage `layers` (a range) holds, from the safetensors headers."""
    idx = json.load(open(os.path.join(dir, "model.safetensors.index.json")))["weight_map"]
    total = 0
    for name, file in idx.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        keep = (int(m.group(1)) in layers) if m else (
            (name == "model.embed_tokens.weight" and layers.start == 0)
            or (name in ("model.norm.weight", "lm_head.weight") and layers.stop == A.layers))
        if keep:
            with safe_open(os.path.join(dir, file), "pt") as f:
                t = f.get_slice(name)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * (2 if A.dtype == "bf16" else 4)
    return total


def main():
    work = tempfile.mkdtemp(prefix="shoal-bench-hf-")
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pipeline(folder, ps, work):
    """The 2-stage pipeline (`shoal serve --local 2 --stages 2`) on 3 x `ps` at once: a
    warm-up run, in which the members measure their stages and the planner re-cuts them
    from those speeds (it does when the new cut promises 5% more), then the measured run,
    the pipeline's steady state. Each node's peak is reset between them (to its resident
    size then), so that the peaks are those of the stages as cut for the measured run.
    Returns the measured run and the closed cluster (its `stages`)."""
    c = Cluster(folder, 2, 2, work)
    shoal_run(c.apis[0], ps * 3, 3 * BATCH)
    cut = c.cut()
    reset_peaks(work)
    measured = shoal_run(c.apis[0], ps * 3, 3 * BATCH)
    if c.cut() != cut:
        log(f"the planner re-cut the stages during the measured run: {cut} -> {c.cut()}")
    c.close()
    return measured, c


def memory_only(work):
    folder = os.path.join(work, "llama")
    model, params = make_model(folder)
    del model
    log(f"model: llama {params / 1e6:.0f} M parameters ({A.layers} blocks, hidden {A.hidden}), "
        f"{A.dtype}; memory only: 2 stages, 24 concurrent requests of {A.tokens} tokens")
    measured, c = pipeline(folder, prompts(), os.path.join(work, "two"))
    log(f"pipeline: {measured[0]:.2f} tok/s")
    out = {"memory": memory_table([(f"stage {i + 1} of 2", 3 * BATCH, *st) for i, st in enumerate(c.stages)],
                                  folder)}
    if A.json:
        print(json.dumps(out))


def run(work):
    if A.memory_only:
        return memory_only(work)
    folder = os.path.join(work, "llama")
    model, params = make_model(folder)
    ps = prompts()
    log(f"model: llama {params / 1e6:.0f} M parameters ({A.layers} blocks, hidden {A.hidden}), {A.dtype}; "
        f"{len(ps)} prompts of {len(ps[0])}..{len(ps[-1])} tokens, {A.tokens} tokens each (greedy), "
        f"{A.threads} torch thread(s), {A.repeat} rounds")
    rows, mems, agree = [], [], []  # mems: the last round's stages
    for rnd in range(1, A.repeat + 1):
        r = {}
        r["hf_one"] = hf_one(model, ps)
        r["hf_batch"] = hf_batch(model, ps)
        one = Cluster(folder, 1, 1, os.path.join(work, f"one{rnd}"))
        shoal_run(one.apis[0], ps[:1], 1)  # warm-up: layers load on first use
        r["shoal_one"] = shoal_run(one.apis[0], ps, 1)
        r["shoal_conc"] = shoal_run(one.apis[0], ps, BATCH)
        # Greedy answers: shoal's against transformers' (leading tokens equal).
        ref = r["hf_one"][3]
        got = {tuple(x[2]) for x in r["shoal_one"][3]}
        agree.append(sum(1 for o in ref if tuple(o) in got) / len(ref))
        if not A.skip_pipeline:
            r["shoal_pipe"], c = pipeline(folder, ps, os.path.join(work, f"two{rnd}"))
            # The 1-node baseline again (its node idled meanwhile): the efficiency divides
            # by the mean of the runs before and after the pipeline's, so that the
            # machine's drift within the round falls on both sides of the ratio.
            r["shoal_conc_after"] = shoal_run(one.apis[0], ps, BATCH)
        one.close()
        mems = [("1 node", BATCH, *one.stages[0])]
        if not A.skip_pipeline:
            mems += [(f"stage {i + 1} of 2", 3 * BATCH, *st) for i, st in enumerate(c.stages)]
        rows.append(r)
        log(f"round {rnd}: " + ", ".join(f"{k} {v[0]:.1f} tok/s" for k, v in r.items()))
    report(rows, agree, mems, folder, params)


def report(rows, agree, mems, folder, params):
    names = {"hf_one": "transformers, 1 at a time", "hf_batch": "transformers, batch of 8 (left-padded)",
             "shoal_one": "shoal 1 node, 1 at a time", "shoal_conc": "shoal 1 node, 8 concurrent",
             "shoal_pipe": "shoal 2 nodes x 2 stages, 24 concurrent",
             "shoal_conc_after": "shoal 1 node, 8 concurrent, after the pipeline"}
    print(f"| run | tok/s (median) | TTFT p50 ms | ITL p50 ms | ITL p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    out = {}
    for k, name in names.items():
        if k not in rows[0]:
            continue
        tps = statistics.median(r[k][0] for r in rows)
        ttft = [x for r in rows for x in r[k][1]]
        itl = [x for r in rows for x in r[k][2]]
        out[k] = dict(tokens_per_s=tps, ttft_p50_ms=pct(ttft, .5) * 1e3, itl_p50_ms=pct(itl, .5) * 1e3,
                      itl_p99_ms=pct(itl, .99) * 1e3)
        print(f"| {name} | {tps:.1f} | {out[k]['ttft_p50_ms']:.0f} | {out[k]['itl_p50_ms']:.1f} | "
              f"{out[k]['itl_p99_ms']:.1f} |")
    med = lambda f: statistics.median(f(r) for r in rows)
    fmt = lambda f: f"{med(f):.2f} (rounds: {', '.join(f'{f(r):.2f}' for r in rows)})"
    one = lambda r: r["shoal_one"][0] / r["hf_one"][0]
    eight = lambda r: r["shoal_conc"][0] / r["hf_batch"][0]
    print(f"\nshoal/transformers, 1 at a time: {fmt(one)}")
    print(f"shoal 8 concurrent / transformers batch of 8: {fmt(eight)}")
    out["ratio_one"], out["ratio_eight"] = med(one), med(eight)
    if "shoal_pipe" in rows[0]:
        eff = lambda r: r["shoal_pipe"][0] / (r["shoal_conc"][0] + r["shoal_conc_after"][0])
        print(f"pipeline efficiency (2 stages, 24 in flight / 2 x 1 node, 8 in flight, "
              f"the mean of a run before and one after): {fmt(eff)}")
        out["pipeline_efficiency"] = med(eff)
    print(f"greedy answers equal to transformers': {min(agree) * 100:.0f} % of prompts (worst round)")
    out["memory"] = memory_table(mems, folder)
    if A.json:
        print(json.dumps(out))


def memory_table(mems, folder):
    """Prints each node's peak memory against its stage's share of the weights and KV
    caches (`mems`: (label, requests in flight, layers, idle RSS, peak RSS)); returns the
    rows."""
    # KV caches: 2 (K, V) x 4 kv heads x head dim (hidden / 12) x the buffers' capacity for
    # the longest prompt and its answer (the next power of two, at least 64: kv_capacity in
    # node/src/models/stage.rs) per layer and request in flight.
    cap = max(64, 1 << (max(map(len, prompts())) + A.tokens - 1).bit_length())
    kv_row = lambda layers: 2 * 4 * (A.hidden // 12) * cap * (2 if A.dtype == "bf16" else 4) * len(layers)
    print("\n| node | layers | weights share MB | KV caches MB | idle RSS MB | peak RSS MB | peak / (share + KV) | (peak - idle) / (share + KV) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    mem_rows = []
    for label, in_flight, layers, base, peak in mems:
        share, kv = stage_share(folder, layers), kv_row(layers) * in_flight
        mem_rows.append(dict(label=label, layers=f"{layers.start}..{layers.stop}", share=share, kv=kv,
                             idle=base, peak=peak))
        print(f"| {label} | {layers.start}..{layers.stop} | {share / 2**20:.0f} | {kv / 2**20:.0f} | "
              f"{base / 2**20:.0f} | {peak / 2**20:.0f} | {peak / (share + kv):.2f} | "
              f"{(peak - base) / (share + kv):.2f} |")
    return mem_rows


main()
