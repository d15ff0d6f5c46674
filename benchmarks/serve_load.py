#!/usr/bin/env python
"""Load test of qcn-serve on loopback: many concurrent streaming requests, checked and timed.

``--suite load`` (default): starts ``qcn-serve`` as a subprocess on a free 127.0.0.1 port, then
sends ``--requests`` (default 64) streaming greedy completions at once (``--repeats`` bursts) with the real ``openai``
async client. The server has ``--max-batch`` slots (default: the artifact's, 4 for pico), so
most requests wait in its queue first. Each request's streamed text must equal the text of the
same prompt generated alone by the runtime in this process beforehand (``generate()``, one
prompt at a time): none lost, none corrupted. Reported: time to first token (request sent ->
first streamed chunk) and inter-token latency (gaps between chunks of one request) p50/p99,
and total generated tokens/s (sum of ``usage.completion_tokens`` / wall time of the burst),
against a peer measured in the same run, interleaved with the bursts: the same prompts through
``generate()`` directly, ``max_batch`` at a time. (The client runs in this process and shares
the CPUs with the server during a burst but not during the peer's pass, which the ratio
therefore understates in the server's disfavour on a small machine.)

``--suite multiturn``: a ``--turns``-turn chat (default 10) where every turn resends the whole
conversation plus a new user message, greedy, run twice on fresh servers: with exact state
reuse (``--prefix-cache-mb``) and without (``--prefix-cache-mb 0``). The replies must be
identical; TTFT per turn is reported for both. Servers run one after the other (never at the
same time), on a machine that may be shared: read the ratio, not the absolute times.

Bounded: every request has ``max_tokens``; the whole run has ``--timeout`` seconds.
Run from the repository root:  python benchmarks/serve_load.py [--suite load,multiturn] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASES = [
    "def fibonacci(n):\n",
    "class Stack:\n    def __init__(self):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
]
USER_TURNS = [
    "Write a function that reverses a string.",
    "Now make it handle None.",
    "Add a docstring.",
    "Write a test for it.",
    "Rename it to flip.",
    "Make it a method of a class.",
    "Add type hints.",
    "Explain the complexity.",
    "Make it work on lists too.",
    "Summarise the final code.",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--artifact", type=Path, default=Path("build/artifacts/pico_cpu"), help="artifact directory (qcn-compile recipes/pico_cpu.yaml)")
    p.add_argument("--suite", default="load", help="comma-separated: load, multiturn")
    p.add_argument("--requests", type=int, default=64, help="concurrent streaming requests (load)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (load)")
    p.add_argument("--repeats", type=int, default=3, help="bursts, each after a direct generate() pass (load; medians reported)")
    p.add_argument("--max-batch", type=int, default=None, help="server slots (default: the artifact's runtime.max_batch)")
    p.add_argument("--threads", type=int, default=None, help="ORT threads of the server (default: one per physical core)")
    p.add_argument("--turns", type=int, default=10, help="turns of the multi-turn chat")
    p.add_argument("--turn-tokens", type=int, default=48, help="max_tokens per turn (multiturn)")
    p.add_argument("--prefix-cache-mb", type=int, default=1024, help="state-reuse memory of the 'with reuse' server (multiturn)")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run, seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, artifact: Path, *, max_batch=None, threads=None, prefix_cache_mb=0, queue_size=1024):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "qcn.runtime.serve.cli", str(artifact), "--host", "127.0.0.1", "--port", str(self.port),
               "--queue-size", str(queue_size), "--prefix-cache-mb", str(prefix_cache_mb), "--served-model-name", "bench"]
        if max_batch:
            cmd += ["--max-batch", str(max_batch)]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"qcn-serve exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit("qcn-serve did not start within 120 s")
            time.sleep(0.1)

    def metrics(self) -> str:
        import httpx

        return httpx.get(self.url + "/metrics", timeout=10).text

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def stream_one(client, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, text, usage = [], "", None
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    async for ch in stream:
        if ch.choices:
            stamps.append(time.perf_counter())
            text += ch.choices[0].text
        if ch.usage:
            usage = ch.usage
    return {"text": text, "ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": usage.completion_tokens, "end": time.perf_counter()}


def suite_load(args) -> dict:
    import openai

    from qcn.runtime.generate import load

    prompts = [f"# example {i}\n" + BASES[i % len(BASES)] for i in range(args.requests)]
    t0 = time.perf_counter()
    g = load(args.artifact, threads=args.threads, max_batch=args.max_batch)
    params = g.params(temperature=0.0, max_new_tokens=args.max_tokens)
    refs = [g.generate([p], params)[0].text for p in prompts]
    ref_s = time.perf_counter() - t0
    srv = ServerProcess(args.artifact, max_batch=args.max_batch, threads=args.threads)
    reps = []
    try:
        for _ in range(args.repeats):
            # the peer: the same prompts through generate() directly, max_batch at a time (no
            # HTTP, no scheduler thread), interleaved with the bursts (the server sits idle)
            b = g.session.max_batch
            t1 = time.perf_counter()
            direct = [r for i in range(0, len(prompts), b) for r in g.generate(prompts[i : i + b], params)]
            direct_tps = sum(len(r.token_ids) for r in direct) / (time.perf_counter() - t1)

            async def burst():
                client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
                t = time.perf_counter()
                res = await asyncio.wait_for(asyncio.gather(*(stream_one(client, p, args.max_tokens) for p in prompts), return_exceptions=True), args.timeout)
                await client.close()
                return res, t

            results, t_start = asyncio.run(burst())
            ok = [r for r in results if not isinstance(r, BaseException)]
            wall = max(r["end"] for r in ok) - t_start if ok else float("nan")
            total = sum(r["tokens"] for r in ok)
            reps.append({
                "errors": [repr(r) for r in results if isinstance(r, BaseException)][:5], "lost": len(prompts) - len(ok),
                "corrupted": sum(1 for r, want in zip(results, refs) if not isinstance(r, BaseException) and r["text"] != want),
                "ttft": [r["ttft"] for r in ok], "itl": [x for r in ok for x in r["itl"]], "wall_s": wall, "tokens": total,
                "tokens_per_s": total / wall if ok else 0.0, "direct_tokens_per_s": direct_tps,
            })
        running_after = int(float(next(l.split()[-1] for l in srv.metrics().splitlines() if l.startswith("qcn_running_sequences "))))
    finally:
        srv.close()
        g.close()
    ttft = [x for r in reps for x in r["ttft"]]
    itl = [x for r in reps for x in r["itl"]]
    return {
        "requests": args.requests, "repeats": args.repeats, "completed": sum(args.requests - r["lost"] for r in reps), "errors": [e for r in reps for e in r["errors"]][:5],
        "lost": sum(r["lost"] for r in reps), "corrupted": sum(r["corrupted"] for r in reps), "running_after": running_after, "max_tokens": args.max_tokens,
        "generated_tokens": [r["tokens"] for r in reps], "wall_s": [r["wall_s"] for r in reps],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in reps), "direct_batched_tokens_per_s": statistics.median(r["direct_tokens_per_s"] for r in reps),
        "server_vs_direct_per_repeat": [r["tokens_per_s"] / r["direct_tokens_per_s"] for r in reps],
        "server_vs_direct": statistics.median(r["tokens_per_s"] / r["direct_tokens_per_s"] for r in reps),
        "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
        "itl_p50_ms": 1e3 * pct(itl, 0.5), "itl_p99_ms": 1e3 * pct(itl, 0.99), "reference_s": ref_s,
    }


def chat_run(args, prefix_cache_mb: int) -> dict:
    import openai

    srv = ServerProcess(args.artifact, threads=args.threads, prefix_cache_mb=prefix_cache_mb)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
        msgs = [{"role": "system", "content": "You are a careful Python programmer."}]
        replies, ttfts, cached = [], [], []
        for turn in range(args.turns):
            msgs.append({"role": "user", "content": USER_TURNS[turn % len(USER_TURNS)]})
            t0 = time.perf_counter()
            first, text, usage = None, "", None
            for ch in client.chat.completions.create(model="bench", messages=msgs, max_tokens=args.turn_tokens, temperature=0, stream=True, stream_options={"include_usage": True}):
                if ch.choices:
                    d = ch.choices[0].delta
                    if first is None and (d.content or ch.choices[0].finish_reason):
                        first = time.perf_counter()  # the role chunk goes out at once; this is the first token
                    text += d.content or ""
                if ch.usage:
                    usage = ch.usage
            ttfts.append(first - t0)
            replies.append(text)
            cached.append((usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0))
            msgs.append({"role": "assistant", "content": text})
        return {"replies": replies, "ttft_s": ttfts, "prompt_and_cached_tokens": cached}
    finally:
        srv.close()


def suite_multiturn(args) -> dict:
    without = chat_run(args, 0)
    with_reuse = chat_run(args, args.prefix_cache_mb)
    return {
        "turns": args.turns, "identical": without["replies"] == with_reuse["replies"],
        "ttft_ms_without": [1e3 * t for t in without["ttft_s"]], "ttft_ms_with": [1e3 * t for t in with_reuse["ttft_s"]],
        "prompt_and_cached_tokens": with_reuse["prompt_and_cached_tokens"],
        "ttft_sum_ratio": sum(without["ttft_s"]) / sum(with_reuse["ttft_s"]),
        "ttft_last5_median_ratio": statistics.median(without["ttft_s"][-5:]) / statistics.median(with_reuse["ttft_s"][-5:]),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [s for s in suites if s not in ("load", "multiturn")]
    if unknown:
        print(f"serve_load.py: unknown suite(s) {unknown}; valid: load, multiturn", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0], "argv": sys.argv[1:]}
    if "load" in suites:
        out["load"] = r = suite_load(args)
        print(f"load: {r['repeats']} bursts of {r['requests']}: {r['completed']} completed, {r['lost']} lost, {r['corrupted']} corrupted (vs single-request greedy); "
              f"TTFT p50 {r['ttft_p50_ms']:.1f} ms p99 {r['ttft_p99_ms']:.1f} ms; ITL p50 {r['itl_p50_ms']:.2f} ms p99 {r['itl_p99_ms']:.2f} ms; "
              f"median {r['tokens_per_s']:.1f} tokens/s; generate() directly in batches of max_batch: median {r['direct_batched_tokens_per_s']:.1f} tokens/s; "
              f"server/direct per burst " + " ".join(f"{x:.2f}x" for x in r["server_vs_direct_per_repeat"]) + f" (median {r['server_vs_direct']:.2f}x)")
    if "multiturn" in suites:
        out["multiturn"] = m = suite_multiturn(args)
        print(f"multiturn: {m['turns']} turns, replies identical with and without reuse: {m['identical']}")
        print("  TTFT ms without reuse: " + " ".join(f"{t:.1f}" for t in m["ttft_ms_without"]))
        print("  TTFT ms with reuse:    " + " ".join(f"{t:.1f}" for t in m["ttft_ms_with"]))
        print("  (prompt, cached) tokens: " + " ".join(f"({p},{c})" for p, c in m["prompt_and_cached_tokens"]))
        print(f"  sum of TTFTs without/with: {m['ttft_sum_ratio']:.2f}x; median of the last 5 turns: {m['ttft_last5_median_ratio']:.2f}x")
    out["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    bad = "load" in out and (out["load"]["lost"] or out["load"]["corrupted"]) or "multiturn" in out and not out["multiturn"]["identical"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
