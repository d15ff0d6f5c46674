#!/usr/bin/env python
"""CPU benchmark: INT4 vs fp32 artifacts of the same model (qcn-pico), side by side in one run.

For each artifact (``--artifact NAME=DIR``, the first is the baseline):
- size on disk: the bytes of the files its manifest lists (what a user copies; hard links
  to files outside the artifact's list are not counted because they are not part of it);
- loaded RSS: a fresh subprocess per artifact loads it (``qcn.runtime.generate.load``), runs
  one prefill + one decode step, and reports VmRSS after minus before the load (imports done);
- decode tokens/s at batch 1 with ``--threads`` (default 1 and 2): greedy, ``--steps`` decode
  steps after a ``--prompt-len`` token prefill, EOS not special. Protocol: one untimed warm-up
  per (artifact, threads), then ``--repeats`` rounds; each round runs every (artifact, threads)
  once, in turn, so background load hits all alike; the median per cell is reported, with the
  load average before and after.

Run from the repository root:
  python benchmarks/int4_cpu.py --artifact fp32=build/artifacts/pico_cpu --artifact int4=build/artifacts/pico_int4_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def disk_bytes(artifact: Path) -> int:
    m = json.loads((artifact / "manifest.json").read_text())
    files = set(m.get("files", {})) | {"manifest.json"}
    return sum((artifact / f).stat().st_size for f in files if (artifact / f).is_file())


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_child(artifact: str, threads: int) -> None:
    """(subprocess) print the RSS growth of loading ``artifact`` and running one step."""
    from qcn.runtime.generate import load

    before = _rss_kib()
    gen = load(artifact, threads=threads)
    s = gen.session
    h = s.allocate()
    logits = s.prefill(h, list(range(1, 17)))
    s.decode([h], [int(np.argmax(logits))])
    print(json.dumps({"rss_mib": (_rss_kib() - before) / 1024}))


def loaded_rss(artifact: Path, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(artifact), "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_mib"]


def decode_run(gen, prompt: list[int], steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps after prefilling ``prompt`` (one sequence)."""
    s = gen.session
    h = s.allocate()
    try:
        tok = int(np.argmax(s.prefill(h, prompt)))
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = int(np.argmax(s.decode([h], [tok])[0]))
        return time.perf_counter() - t0
    finally:
        s.release(h)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if args.rss_child:
        rss_child(args.rss_child, threads[0])
        return 0
    arts = {}
    for a in args.artifact:
        name, _, d = a.partition("=")
        if not d or not (Path(d) / "manifest.json").is_file():
            raise SystemExit(f"--artifact {a}: give NAME=DIR with DIR a compiled artifact (manifest.json inside)")
        arts[name] = Path(d)
    if len(arts) < 2:
        raise SystemExit("--artifact: give at least two (the first is the baseline)")
    from qcn.runtime.generate import load

    load0 = os.getloadavg()
    sizes = {n: disk_bytes(d) for n, d in arts.items()}
    rss = {n: loaded_rss(d, 1) for n, d in arts.items()}
    gens = {(n, t): load(str(d), threads=t) for n, d in arts.items() for t in threads}
    prompt = list(range(3, 3 + args.prompt_len))
    for g in gens.values():
        decode_run(g, prompt, args.steps)                      # warm-up
    times = {k: [] for k in gens}
    for _ in range(args.repeats):
        for k, g in gens.items():
            times[k].append(decode_run(g, prompt, args.steps))
    load1 = os.getloadavg()
    res = {"steps": args.steps, "prompt_len": args.prompt_len, "repeats": args.repeats,
           "loadavg_before": load0, "loadavg_after": load1, "artifacts": {}}
    base = next(iter(arts))
    for n in arts:
        row = {"dir": str(arts[n]), "disk_mib": sizes[n] / 2**20, "loaded_rss_mib": rss[n]}
        for t in threads:
            row[f"decode_tok_s_{t}t"] = args.steps / statistics.median(times[(n, t)])
        res["artifacts"][n] = row
    print(f"{'artifact':10s} {'disk MiB':>9s} {'RSS MiB':>8s} " + " ".join(f"{f'tok/s {t}t':>10s} {'ratio':>6s}" for t in threads))
    for n, row in res["artifacts"].items():
        cells = " ".join(f"{row[f'decode_tok_s_{t}t']:10.1f} {row[f'decode_tok_s_{t}t'] / res['artifacts'][base][f'decode_tok_s_{t}t']:6.2f}"
                         for t in threads)
        print(f"{n:10s} {row['disk_mib']:9.1f} {row['loaded_rss_mib']:8.1f} {cells}")
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f}; median of {args.repeats} interleaved rounds of "
          f"{args.steps} decode steps at batch 1")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    for g in gens.values():
        g.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
