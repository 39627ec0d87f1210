"""torch.distributed (gloo) all-reduce on 127.0.0.1, one thread per rank: the reference
shoal's ring is compared with. Prints one JSON line per size, in the same shape as
`shoal bench allreduce`: {"nodes","bytes","time_ms","algbw_gbps","busbw_gbps"}.

    python gloo_allreduce.py --nodes 2 --size 1048576 --size 16777216 [--iters 10]
"""
import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, n, port, sizes, iters, warmup, queue):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", rank=rank, world_size=n)
    for size in sizes:
        t = torch.ones(size // 4, dtype=torch.float32)
        for _ in range(warmup):
            dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        queue.put((rank, size, (time.perf_counter() - t0) / iters))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--size", type=int, action="append", required=True)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, a.nodes, port, a.size, a.iters, a.warmup, q))
             for r in range(a.nodes)]
    for pr in procs:
        pr.start()
    results = [q.get(timeout=600) for _ in range(a.nodes * len(a.size))]
    for pr in procs:
        pr.join(timeout=60)
    n = a.nodes
    for size in a.size:
        worst = max(t for (_, s, t) in results if s == size)
        algbw = size / worst / 1e9
        print(json.dumps({"nodes": n, "bytes": size, "time_ms": worst * 1e3, "algbw_gbps": algbw,
                          "busbw_gbps": algbw * 2 * (n - 1) / n, "transport": "gloo"}), flush=True)


if __name__ == "__main__":
    main()
