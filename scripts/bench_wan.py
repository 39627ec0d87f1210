"""The report of scripts/bench-wan: reads its summaries (one line per configuration: the
`shoal train --json` summary and where the run's metrics.jsonl lies) and prints a table per
workload, the ratios against synchronous f32 training and, with --json, one JSON line per
configuration (the rows' paths are relative to the summaries' folder, so a run kept with
`bench-wan --keep DIR` can be reported again: `bench_wan.py DIR/summaries.jsonl ...`). Exit status 1 when a configuration that ran did not train (the job failed,
or, for the gpt workload, its held-out loss did not fall below 0.8 x ln 256 and below its
first evaluation), or when sync-none is missing where ratios are asked of it.

    python scripts/bench_wan.py SUMMARIES --rate MBIT --members N --target LOSS --cores C
        [--load TEXT] [--json]
"""
import argparse
import json
import math
import os
import sys

# A held-out loss below this (nats per byte) is learning: ln 256 is the uniform guess.
LEARNED = 0.8 * math.log(256)


def read_jsonl(path):
    """The JSON objects of a file's lines (torn or foreign lines skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    for line in open(path):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def not_supported(err_path):
    """Why a job was refused by this build (its [sync] compression key), or None."""
    text = open(err_path).read() if os.path.exists(err_path) else ""
    if "compression" in text and ("unknown field" in text or "unknown variant" in text):
        return "this build has no [sync] compression"
    return None


def measure(row, target):
    """The measurements of one configuration from its metrics.jsonl."""
    lines = read_jsonl(os.path.join(row["run_dir"], "metrics.jsonl"))
    work, evals = {}, {}
    for v in lines:
        if "step_ms" in v or "outer_round" in v:
            work[v["step"]] = v  # the last line of a step wins (a redone step's)
        elif "eval" in v:
            evals[v["step"]] = v
    work = [work[k] for k in sorted(work)]
    evals = [evals[k] for k in sorted(evals)]
    busy = sum(v.get("step_ms", v.get("round_ms", 0.0)) for v in work)
    at = {v["step"]: v for v in work}
    reached = next((e for e in evals if e["eval"]["loss"] <= target), None)
    to_target = None
    if reached is not None:
        to_target = reached.get("elapsed_s", at.get(reached["step"], {}).get("elapsed_s"))
    samples = sum(v["samples"] for v in work)
    sent = sum(v["bytes_sent"] for v in work)
    return {
        "steps": work[-1]["step"] if work else 0,
        "samples": samples,
        "wall_s": work[-1]["elapsed_s"] if work else None,
        "wall_s_to_target": to_target,
        "bytes_per_member": sent,
        "bytes_per_sample": sent / samples if samples else None,
        "evals": [(e["step"], e["eval"]["loss"]) for e in evals],
        "eval_loss": evals[-1]["eval"]["loss"] if evals else None,
        "utilisation": sum(v["compute_ms"] for v in work) / busy if busy else None,
        "unit_ms": busy / len(work) if work else None,  # per step (sync) or round (DiLoCo)
        "members": work[-1]["members"] if work else 0,
    }


def trained(m, members):
    """Why a gpt run did not train, or None."""
    if not m["evals"]:
        return "no evaluation"
    first, last = m["evals"][0][1], m["evals"][-1][1]
    if not last < LEARNED:
        return f"held-out loss {last:.3f} not below {LEARNED:.3f}"
    if len(m["evals"]) > 1 and not last < first:
        return f"held-out loss did not fall ({first:.3f} -> {last:.3f})"
    if members > 1 and m["bytes_per_member"] <= 0:
        return "no bytes on the data plane"
    return None


def fmt(x, spec, suffix=""):
    """`x` formatted by `spec` then `suffix`, or "-" as wide as the spec's width."""
    if x is None:
        width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
        return "-".rjust(width + len(suffix))
    return format(x, spec) + suffix


def main():
    p = argparse.ArgumentParser()
    p.add_argument("summaries")
    p.add_argument("--rate", type=int, required=True)
    p.add_argument("--members", type=int, required=True)
    p.add_argument("--target", type=float, required=True)
    p.add_argument("--cores", type=int, required=True)
    p.add_argument("--load", default="?", help="the load average at the start and the end")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = sys.stderr if a.json else sys.stdout
    say = lambda s="": print(s, file=out)
    rows = read_jsonl(a.summaries)
    here = os.path.dirname(os.path.abspath(a.summaries))  # paths in the rows are relative to it
    for r in rows:
        for k in ("run_dir", "stderr"):
            if k in r:
                r[k] = os.path.join(here, r[k])
    failures, results = [], []
    for r in rows:
        if "not_run" in r:
            say(f"{r['workload']} {r.get('config', '')}: not run: {r['not_run']}")
            continue
        s = r["summary"]
        why = not_supported(r["stderr"]) if s.get("state") != "done" else None
        if why:
            say(f"{r['workload']} {r['config']}: not run: {why}")
            continue
        m = measure(r, a.target)
        bad = None
        if s.get("state") != "done":
            tail = open(r["stderr"]).read().strip().splitlines() if os.path.exists(r["stderr"]) else []
            err = s.get("error") or (tail[-1] if tail else "no summary")
            bad = f"job did not finish: {err}"
        elif r["workload"] == "gpt":
            bad = trained(m, a.members)
        if bad:
            failures.append(f"{r['workload']} {r['config']}: {bad} (stderr: {r['stderr']})")
        results.append((r, m, bad))
    say(f"{a.members} members, {a.rate} Mbit/s each way per link (tbf), {a.cores} cores shared by "
        f"the members{' (fewer cores than members: they compete for CPU)' if a.cores < a.members else ''}"
        f" and with whatever else runs (load average {a.load})")
    for workload in ("gpt", "llama"):
        rs = [(r, m, bad) for r, m, bad in results if r["workload"] == workload]
        if rs:
            table(workload, rs, a, say)
    base = next((m for r, m, bad in results if r["workload"] == "gpt" and r["config"] == "sync-none"
                 and not bad), None)
    gpt = [(r, m) for r, m, bad in results if r["workload"] == "gpt" and not bad]
    if base and len(gpt) > 1:
        ratios(base, gpt, say)
    if a.json:
        for r, m, bad in results:
            print(json.dumps({
                "workload": r["workload"], "config": r["config"], "sync": r["sync"],
                "compression": r["compression"],
                "inner_steps": r["inner_steps"] if r["sync"] == "diloco" else 1,
                "rate_mbit": a.rate, "members": a.members,
                "wall_s_to_target": m["wall_s_to_target"], "target": a.target if r["workload"] == "gpt" else None,
                "bytes_per_member": m["bytes_per_member"], "bytes_per_sample": m["bytes_per_sample"],
                "samples": m["samples"], "eval_loss": m["eval_loss"], "utilisation": m["utilisation"],
                "wall_s": m["wall_s"], "unit_ms": m["unit_ms"], "failed": bad,
            }))
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    sys.exit(1 if failures else 0)


def table(workload, rs, a, say):
    if workload == "gpt":
        say(f"gpt on tinyshakespeare, target held-out loss {a.target} (wall time from the members "
            f"gathering; utilisation = compute / training wall time)")
    else:
        say("~150 M Llama (f32), fixed short run: ms per step (sync) or per round (DiLoCo); "
            "f32/this = sync-none's bytes per sample over this one's")
    say(f"{'config':<15} {'steps':>5} {'samples':>7} {'s->target':>9} {'wall s':>7} {'ms/unit':>8} "
        f"{'MB/member':>9} {'B/sample':>9} {'f32/this':>8} {'eval loss':>9} {'util':>5}  evals (step:loss)")
    base = next((m for r, m, bad in rs if r["config"] == "sync-none"), None)
    for r, m, bad in rs:
        less = (base["bytes_per_sample"] / m["bytes_per_sample"]
                if base and base["bytes_per_sample"] and m["bytes_per_sample"] else None)
        evals = " ".join(f"{s}:{l:.3f}" for s, l in m["evals"])
        mb = m["bytes_per_member"] / 1e6
        say(f"{r['config']:<15} {m['steps']:>5} {m['samples']:>7} {fmt(m['wall_s_to_target'], '9.1f')} "
            f"{fmt(m['wall_s'], '7.1f')} {fmt(m['unit_ms'], '8.0f')} {mb:>9.1f} "
            f"{fmt(m['bytes_per_sample'], '9.0f')} {fmt(less, '7.1f', 'x')} {fmt(m['eval_loss'], '9.4f')} "
            f"{fmt(m['utilisation'], '5.2f')}  {evals}{'  FAILED: ' + bad if bad else ''}")


def ratios(base, gpt, say):
    say("against sync-none (f32) at equal samples; goal for DiLoCo H=50: speedup >= 5, "
        "bytes/sample ratio >= 100, eval loss within 5%, utilisation >= 0.9")
    say(f"{'config':<15} {'speedup':>8} {'bytes/sample':>13} {'eval loss':>10} {'goal':>7}")
    for r, m in gpt:
        if r["config"] == "sync-none":
            continue
        speed = (base["wall_s_to_target"] / m["wall_s_to_target"]
                 if base["wall_s_to_target"] and m["wall_s_to_target"] else None)
        less = (base["bytes_per_sample"] / m["bytes_per_sample"]
                if base["bytes_per_sample"] and m["bytes_per_sample"] else None)
        diff = ((m["eval_loss"] - base["eval_loss"]) / base["eval_loss"] * 100
                if base["eval_loss"] and m["eval_loss"] is not None else None)
        goal = ""
        if r["sync"] == "diloco" and r["inner_steps"] == 50:
            ok = (speed is not None and speed >= 5 and less is not None and less >= 100
                  and diff is not None and abs(diff) <= 5 and (m["utilisation"] or 0) >= 0.9)
            goal = "met" if ok else "not met"
        say(f"{r['config']:<15} {fmt(speed, '7.2f', 'x')} {fmt(less, '12.1f', 'x')} "
            f"{fmt(diff, '+9.1f', '%')} {goal:>7}")


if __name__ == "__main__":
    main()
