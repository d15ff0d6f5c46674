"""MTP speculative decoding on the CPU: acceptance, tokens per target call, tokens/s vs plain.

    qcn-compile recipes/pico_cpu_mtp.yaml --out /tmp/pico_mtp
    python benchmarks/speculative.py /tmp/pico_mtp                     # N = 0 (plain), 1, 2, 3 at batch 1 and 4
    python benchmarks/speculative.py /tmp/pico_mtp --rounds 5 --new-tokens 256

Every (batch, N) configuration generates greedily from the same code prompts; the rounds are
interleaved (round r runs every configuration once, in a rotated order) and the medians are
reported, so machine noise hits all configurations alike. Wall time is the whole generate()
call (prefill, the MTP prefill, decoding) over the generated tokens. Greedy output is checked
to be identical to plain decoding in every run. A sampled pass (the manifest's temperature /
top-p / top-k, seeds 0..) reports the acceptance a user sampling with the defaults sees.

"acceptance at position i" is the fraction of verify calls in which draft i was accepted
(all of drafts 1..i matched), so tokens per target call = 1 + the sum over positions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

PROMPTS = [
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser()\n",
    "    def __repr__(self):\n        return",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", help="artifact compiled with runtime.speculative (recipes/pico_cpu_mtp.yaml)")
    ap.add_argument("--draft", type=int, nargs="+", default=[1, 2, 3], metavar="N", help="draft lengths (default 1 2 3)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], metavar="B", help="batch sizes (default 1 4)")
    ap.add_argument("--new-tokens", type=int, default=128, metavar="T", help="tokens generated per sequence")
    ap.add_argument("--rounds", type=int, default=3, metavar="R", help="interleaved rounds (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from qcn.runtime.generate import load

    gen = load(args.artifact, threads=args.threads)
    configs = [(b, n) for b in args.batch for n in [0] + list(args.draft)]
    greedy = gen.params(max_new_tokens=args.new_tokens, temperature=0)
    prompts = {b: (PROMPTS * b)[:b] for b in args.batch}
    gen.generate(prompts[max(args.batch)], gen.params(max_new_tokens=8, temperature=0), speculative=max(args.draft))
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    stats, tokens, reference = {}, {}, {}
    loads = []
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for b, n in order:
            t0 = time.perf_counter()
            res = gen.generate(prompts[b], greedy, speculative=n)
            times[(b, n)].append(time.perf_counter() - t0)
            tokens[(b, n)] = sum(len(x.token_ids) for x in res)
            ids = [x.token_ids for x in res]
            if n == 0:
                reference[b] = ids
            elif b in reference and ids != reference[b]:
                raise SystemExit(f"greedy output of N={n} batch {b} differs from plain decoding: a bug")
            if n:
                stats[(b, n)] = res[0].speculative
        loads.append(os.getloadavg()[0])
    sampled = {}
    for n in args.draft:
        plist = [gen.params(max_new_tokens=args.new_tokens, seed=s) for s in range(4)]
        sampled[n] = gen.generate(PROMPTS[:4], plist, speculative=n)[0].speculative
    gen.close()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# benchmarks/speculative.py {' '.join(argv or sys.argv[1:])}")
    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')} commit {commit} cpu_count {os.cpu_count()} "
          f"threads {args.threads}; load average (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"# greedy, {args.new_tokens} new tokens per sequence, median of {args.rounds} interleaved rounds")
    print("| batch | N | tokens/s | vs plain | tokens per target call | acceptance (per position) |")
    print("|---|---|---|---|---|---|")
    for b, n in configs:
        tps = tokens[(b, n)] / statistics.median(times[(b, n)])
        base = tokens[(b, 0)] / statistics.median(times[(b, 0)])
        if n == 0:
            print(f"| {b} | 0 (plain) | {tps:.1f} | 1.00 | 1 | - |")
            continue
        s = stats[(b, n)]
        per = " / ".join(f"{x:.2f}" for x in s.acceptance_per_position)
        print(f"| {b} | {n} | {tps:.1f} | {tps / base:.2f} | {s.tokens_per_target_call:.2f} | "
              f"{s.acceptance_rate:.2f} ({per}) |")
    print("# sampled with the manifest's defaults (batch 4, seeds 0-3): tokens per target call, acceptance per position")
    for n, s in sampled.items():
        per = " / ".join(f"{x:.2f}" for x in s.acceptance_per_position)
        print(f"#   N={n}: {s.tokens_per_target_call:.2f} tokens/call, acceptance {s.acceptance_rate:.2f} ({per})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
