"""Decode-graph cost vs cached context, two artifacts interleaved in one process.

    python benchmarks/attention_context.py --artifact before=build/artifacts/pico_cpu_before \\
        --artifact after=build/artifacts/pico_cpu --threads 1 --repeats 21

For each artifact and each context c, the decode graph runs on prebuilt inputs: past_len = c and a
cache window of P = max(256, c + 20) positions (the runtime's IOBinding store binds its capacity,
not past_len), the rows >= c filled with NaN so that any leak shows up as a non-finite output.
Blocks of --steps calls, the cells interleaved and their order rotated every repeat; medians of
wall and process-CPU ms per call. --profile writes the per-op ORT profile of each cell instead.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path, threads: int, profile: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds_for(sess: ort.InferenceSession, ctx: int, rng) -> dict:
    window = max(256, ctx + 20)
    out = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            out[i.name] = np.array([[1]], dtype=np.int64)
        elif i.name == "past_len":
            out[i.name] = np.array([ctx], dtype=np.int64)
        else:
            shape = [1 if d == "batch" else window if isinstance(d, str) else d for d in i.shape]
            a = rng.standard_normal(shape).astype(np.float32) * 0.5
            if i.name.startswith("past_"):
                a[:, :, ctx:] = np.nan
            out[i.name] = a
    return out


def profile_ops(path: Path, feeds: dict, threads: int, runs: int = 20) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as d:
        sess = session(path, threads, profile=os.path.join(d, "p"))
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"].get("op_name", "?")] += e["dur"]
    return [(op, us / (runs + 1) / 1e3) for op, us in per.most_common()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 3500])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    arts = dict(a.split("=", 1) for a in args.artifact)
    rng = np.random.default_rng(0)
    sessions = {n: session(Path(d) / "decode.onnx", args.threads) for n, d in arts.items()}
    feeds = {c: feeds_for(next(iter(sessions.values())), c, rng) for c in args.contexts}
    for n, s in sessions.items():
        for c in args.contexts:
            logits = s.run(None, feeds[c])[0]
            if not np.isfinite(logits).all():
                print(f"error: {n} at {c}: non-finite logits (cache rows >= past_len leaked)", file=sys.stderr)
                return 1
    if args.profile:
        for n, d in arts.items():
            for c in args.contexts:
                ops = profile_ops(Path(d) / "decode.onnx", feeds[c], args.threads)
                print(f"## {n} @ {c}: " + ", ".join(f"{op} {ms:.3f}" for op, ms in ops[:10]))
        return 0
    cells = [(n, c) for n in sessions for c in args.contexts]
    res = {cell: [] for cell in cells}
    for r in range(args.repeats + 1):
        for n, c in cells[r % len(cells):] + cells[: r % len(cells)]:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                sessions[n].run(None, feeds[c])
            if r:  # repeat 0 is the warm-up
                res[n, c].append(((time.perf_counter() - t0) / args.steps * 1e3,
                                  (time.process_time() - c0) / args.steps * 1e3))
    lo, hi = min(args.contexts), max(args.contexts)
    print(f"loadavg {os.getloadavg()}")
    for i, what in enumerate(("wall", "process CPU")):
        med = {cell: statistics.median(x[i] for x in v) for cell, v in res.items()}
        print(f"\n| decode graph {what} ms/step | " + " | ".join(f"{c} cached" for c in args.contexts) + f" | {hi} / {lo} |")
        print("|---|" + "---:|" * (len(args.contexts) + 1))
        for n in sessions:
            print(f"| {n} | " + " | ".join(f"{med[n, c]:.2f}" for c in args.contexts) + f" | {med[n, hi] / med[n, lo]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
