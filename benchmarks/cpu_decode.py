#!/usr/bin/env python
"""CPU benchmark: qcn's runtime (ONNX Runtime backend) vs transformers, same tiny checkpoint.

Measures, in one run and on the same prompt token ids:

- prefill tokens/s: time to consume the prompt and produce the first token's logits.
  qcn: ``Session.prefill`` (the prefill graph in the artifact's ``runtime.prefill_chunk``
  chunks; with --batch > 1 the prompts are prefilled one slot after another, which is what
  ``qcn.runtime.generate`` does). transformers: one ``model(ids, use_cache=True,
  logits_to_keep=1)`` forward over the whole [batch, prompt_len] prompt (``logits_to_keep=1``
  is what ``generate()`` passes; the qcn artifact's graphs also return the last logits only).
- decode tokens/s: greedy, a fixed number of steps, EOS never ends a sequence. Each step feeds
  the previous token and takes the argmax of the returned logits with the EOS ids masked to
  -inf -- what ``generate(min_new_tokens=N)`` does, so all three produce the same N tokens. qcn: ``Session.decode`` over all slots
  at once. transformers (default ``--hf-decode loop``): ``model(tok, past_key_values=cache,
  use_cache=True)`` + ``argmax`` per step -- exactly the work of the qcn loop, without
  ``generate()``'s logits processors / stopping criteria / bookkeeping, which is the fair
  comparison. ``--hf-decode generate`` instead times ``generate(do_sample=False,
  min_new_tokens=N, max_new_tokens=N)`` and subtracts the prefill time measured in the same
  repeat.

``--new-tokens N`` new tokens per sequence = 1 from the prefill logits + N - 1 decode steps
(``generate()``'s convention), so decode tokens/s = batch * (N - 1) / decode time.

Protocol: one untimed warm-up of both (full sizes), then ``--repeats`` timed repeats that
interleave qcn and transformers (so background load hits both alike); the median of each
metric is reported. The warm-up also runs transformers' ``generate()`` to check that both
produce the same greedy tokens (a sanity check; a mismatch is reported, not fatal).

Run from the repository root:  python benchmarks/cpu_decode.py [--json OUT]

``--context-scaling`` is a separate mode (no transformers): ms per decode step at
``--contexts`` cached tokens (default 64 and 3500) for three ways of running the same artifact,
measured interleaved in one run (one sequence each, rewound to the same cached length with
Session.restore before every timed block of ``--steps`` steps; the median over ``--repeats``
blocks):

- ``host-copy``: the state in host buffers copied into every call's feeds (the runtime before
  the ONNX Runtime state store: ``HostStateStore`` over a backend with ``share_weights=False``);
- ``iobinding``: the onnxruntime backend's own store (IOBinding, no per-step cache copy) and
  shared weights -- what ``qcn.runtime.load`` uses;
- ``graph-only``: ``backend.run`` of the decode graph on prebuilt inputs of exactly the cached
  length (no state handling at all): what the graph itself costs at that context.

It also reports the peak RSS (VmHWM) of a fresh process that loads the artifact and runs one
prefill and one decode step, with ``share_weights`` False (each ORT session loads the weights)
and True (one memory map for both sessions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="qcn runtime (ONNX Runtime) vs transformers Qwen3NextForCausalLM (fp32, eager, CPU) on the "
        "same tiny checkpoint: prefill and decode tokens/s side by side, as ratios.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, default=Path("build/checkpoints/qcn-tiny"),
                   help="Hugging Face checkpoint directory, loaded by transformers. Created with the tiny "
                   "generator (spec 'default', seed 0) if missing.")
    p.add_argument("--artifact", type=Path, default=Path("build/artifacts/tiny_cpu"),
                   help="qcn artifact directory, loaded by qcn.runtime. Compiled from --recipe with --checkpoint "
                   "if missing.")
    p.add_argument("--recipe", type=Path, default=Path("recipes/tiny_cpu.yaml"),
                   help="recipe used to compile --artifact when it is missing (its checkpoint/output paths are "
                   "replaced by --checkpoint/--artifact)")
    p.add_argument("--recompile", action="store_true",
                   help="compile --artifact from --recipe even if it exists, so that the graphs come from the "
                   "checked-out compiler (the old artifact is replaced)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="new tokens per sequence: 1 from the prefill logits + (N-1) timed decode steps; EOS ignored")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences decoded together (e.g. 4 for batched decode; at most the artifact's max_batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up; the median is reported")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads and ONNX Runtime intra-op threads, set equal (2 = all cores of the dev machine)")
    p.add_argument("--hf-decode", choices=("loop", "generate"), default="loop",
                   help="how transformers' decode is timed: 'loop' = manual greedy loop over "
                   "model(..., past_key_values) (same work as qcn's loop; the fair one); 'generate' = "
                   "generate(do_sample=False, min_new_tokens=N, max_new_tokens=N) minus the prefill time")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--no-check", action="store_true",
                   help="skip the warm-up generate() whose greedy tokens are compared with qcn's")
    p.add_argument("--ort-profile", action="store_true",
                   help="after the benchmark, profile one prefill chunk and one decode step with ONNX Runtime's "
                   "profiler and print the time per op type (separate sessions; not part of the numbers)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write machine facts, settings and results to OUT")
    p.add_argument("--context-scaling", action="store_true",
                   help="instead of the transformers comparison: ms per decode step at --contexts cached tokens, "
                   "host-copy vs iobinding vs graph-only, and peak RSS with and without shared weights")
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 3500], help="cached tokens (--context-scaling)")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed block (--context-scaling)")
    a = p.parse_args(argv)
    for name in ("prompt_len", "new_tokens", "batch", "repeats", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (at least one decode step)")
    return a


# ----------------------------------------------------------------------------------------
# setup


def ensure_checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint

    print(f"[setup] writing the tiny checkpoint (spec 'default', seed 0) to {path}", flush=True)
    return write_tiny_checkpoint(path, TINY_SPECS["default"], seed=0)


def ensure_artifact(path: Path, checkpoint: Path, recipe_path: Path, *, force: bool = False) -> Path:
    """The artifact at ``path``, compiled from ``recipe_path`` when missing (or ``force``) by the
    whole pipeline (export, then the target's passes: a cpu artifact without its passes stage
    runs the bare function bodies, not what qcn-compile ships). An existing artifact is used as
    it is; one that stopped at the export stage is named on stdout, since its numbers are not
    the shipped artifact's."""
    manifest = path / "manifest.json"
    if manifest.is_file() and not force:
        stage = json.loads(manifest.read_text()).get("stage")
        if stage == "export":
            print(f"[setup] warning: {path} is an export-stage artifact (no passes: the cpu lowerings and "
                  f"quantization did not run); --recompile measures what qcn-compile writes", flush=True)
        return path
    from qcn.compile.artifacts import is_qcn_artifact
    from qcn.compile.pipeline import run_pipeline, stage_dirs
    from qcn.compile.recipe import load_recipe

    print(f"[setup] compiling {recipe_path} ({checkpoint} -> {path})", flush=True)
    t0 = time.perf_counter()
    recipe = load_recipe(recipe_path, checkpoint=checkpoint, output=path)
    # force redoes every stage, and lets the outputs replace anything: only over qcn's own directories
    ours = all(not d.exists() or is_qcn_artifact(d) for d in stage_dirs(recipe).values())
    res = run_pipeline(recipe, force=force and ours)
    print(f"[setup] compiled in {time.perf_counter() - t0:.1f}s (stages run: {', '.join(res.ran) or 'none'})",
          flush=True)
    return res.output


def check_same_model(artifact: Path, checkpoint: Path) -> str | None:
    """A warning when the artifact's manifest says it was compiled from another config.json."""
    import hashlib

    m = json.loads((artifact / "manifest.json").read_text())
    want = m.get("checkpoint", {}).get("config_sha256")
    have = hashlib.sha256((checkpoint / "config.json").read_bytes()).hexdigest()
    if want and want != have:
        return (f"{artifact} was compiled from a checkpoint whose config.json differs from {checkpoint}'s "
                f"(manifest checkpoint.path = {m['checkpoint'].get('path')})")
    return None


# ----------------------------------------------------------------------------------------
# machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts() -> dict:
    import onnxruntime
    import torch
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "commit": git_commit(),
    }


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------
# qcn runtime


class TimedStore:
    """Adds up the time spent in the session's state-store step (bind + ONNX Runtime run + K/V
    append): everything of a step but the Session's checks, the argmax and Python's loop."""

    def __init__(self, store):
        self._step = store.step
        store.step = self.step
        self.seconds = 0.0
        self.calls = 0

    def step(self, *args):
        t0 = time.perf_counter()
        out = self._step(*args)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def reset(self):
        self.seconds, self.calls = 0.0, 0


def qcn_run(session, timed: TimedStore, prompts: list[list[int]], new_tokens: int, eos: list[int]) -> dict:
    """Prefill every prompt into its own slot, then greedy-decode all slots together
    (EOS logits set to -inf before the argmax, as generate()'s min_new_tokens does)."""

    def greedy(logits: np.ndarray) -> np.ndarray:
        logits[..., eos] = -np.inf
        return np.argmax(logits, axis=-1)

    slots = [session.allocate() for _ in prompts]
    try:
        timed.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        first = [int(greedy(session.prefill(s, ids))) for s, ids in zip(slots, prompts)]
        t1, c1 = time.perf_counter(), time.process_time()
        prefill_backend = timed.seconds
        tokens = [[t] for t in first]
        last = first
        timed.reset()
        t2, c2 = time.perf_counter(), time.process_time()
        for _ in range(new_tokens - 1):
            logits = session.decode(slots, last)
            last = greedy(logits).tolist()
            for row, t in zip(tokens, last):
                row.append(t)
        t3, c3 = time.perf_counter(), time.process_time()
    finally:
        for s in slots:
            session.release(s)
    return {"prefill_s": t1 - t0, "decode_s": t3 - t2, "prefill_cpu_s": c1 - c0, "decode_cpu_s": c3 - c2,
            "tokens": tokens, "prefill_backend_s": prefill_backend, "decode_backend_s": timed.seconds,
            "decode_calls": timed.calls}


# ----------------------------------------------------------------------------------------
# transformers


def hf_greedy(logits, eos: list[int]):
    """[B, V] logits -> [B, 1] tokens, EOS masked out as generate()'s min_new_tokens does."""
    logits = logits.clone()
    logits[:, eos] = float("-inf")
    return logits.argmax(dim=-1, keepdim=True)


def hf_prefill(model, ids, eos: list[int]):
    """One forward over the prompt: (wall s, cpu s, cache, first greedy tokens [B, 1] tensor, as lists)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = model(ids, use_cache=True, logits_to_keep=1)
    first = hf_greedy(out.logits[:, -1, :], eos)
    first_list = first.tolist()  # the host has the token, as qcn's argmax does
    return time.perf_counter() - t0, time.process_time() - c0, out.past_key_values, first, first_list


def hf_run_loop(model, ids, new_tokens: int, eos: list[int]) -> dict:
    prefill_s, prefill_cpu, cache, tok, first = hf_prefill(model, ids, eos)
    tokens = [row[:] for row in first]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(new_tokens - 1):
        out = model(tok, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tok = hf_greedy(out.logits[:, -1, :], eos)
        for row, t in zip(tokens, tok[:, 0].tolist()):
            row.append(t)
    return {"prefill_s": prefill_s, "decode_s": time.perf_counter() - t0, "prefill_cpu_s": prefill_cpu,
            "decode_cpu_s": time.process_time() - c0, "tokens": tokens}


def hf_generate(model, ids, new_tokens: int):
    t0, c0 = time.perf_counter(), time.process_time()
    seq = model.generate(ids, attention_mask=ids.new_ones(ids.shape), do_sample=False,
                         min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0,
                         top_k=None, top_p=None, temperature=None)
    return time.perf_counter() - t0, time.process_time() - c0, seq[:, ids.shape[1]:].tolist()


def hf_run_generate(model, ids, new_tokens: int, eos: list[int]) -> dict:
    prefill_s, prefill_cpu, _, _, _ = hf_prefill(model, ids, eos)
    total, total_cpu, tokens = hf_generate(model, ids, new_tokens)
    return {"prefill_s": prefill_s, "decode_s": max(total - prefill_s, 1e-9), "generate_s": total,
            "prefill_cpu_s": prefill_cpu, "decode_cpu_s": max(total_cpu - prefill_cpu, 1e-9), "tokens": tokens}


# ----------------------------------------------------------------------------------------
# ONNX Runtime profile (optional)


def ort_profile(gen, prompt: list[int], threads: int, runs: int = 10) -> dict:
    """Time per op type of one prefill chunk and one decode step, each run ``runs`` times."""
    import bisect
    import collections

    import onnxruntime as ort

    from qcn.runtime.session import Session
    from qcn.runtime.state import HostStateStore

    captured: dict[str, dict] = {}
    real = gen.session.backend

    class Capture:  # the feeds of one call of each graph, through the plain run() path
        manifest = real.manifest

        def run(self, graph_name, feeds, outputs=None):
            captured[graph_name] = {k: np.array(v, copy=True) for k, v in feeds.items()}
            return real.run(graph_name, feeds, outputs)

        def create_state(self, *, slots, max_context):
            return HostStateStore(self, slots=slots, max_context=max_context)

    session = Session(gen.manifest, Capture())
    h = session.allocate()
    logits = session.prefill(h, prompt[: session.prefill_chunk])
    session.decode([h], [int(np.argmax(logits))])
    session.close()
    result = {}
    for graph, feeds in captured.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"qcn_bench_{graph}")
        path = gen.manifest.artifact_dir / gen.manifest.graph(graph).file
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)  # first run: allocations, not profiled separately
        for _ in range(runs):
            sess.run(None, feeds)
        trace = sess.end_profiling()
        events = json.loads(Path(trace).read_text())
        Path(trace).unlink(missing_ok=True)
        nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        total = sum(e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
        # Scan's time includes its body's kernels, which are profiled too: split them out by time
        scans = sorted((e["ts"], e["ts"] + e["dur"]) for e in nodes if e["args"].get("op_name") == "Scan")
        starts = [a for a, _ in scans]

        def in_scan(e) -> bool:
            i = bisect.bisect_right(starts, e["ts"]) - 1
            return i >= 0 and e["args"].get("op_name") != "Scan" and e["ts"] + e["dur"] <= scans[i][1]

        per_op: collections.Counter = collections.Counter()
        count: collections.Counter = collections.Counter()
        body: collections.Counter = collections.Counter()
        body_count: collections.Counter = collections.Counter()
        for e in nodes:
            op = e["args"].get("op_name", "?")
            if in_scan(e):
                body[op] += e["dur"]
                body_count[op] += 1
            else:
                per_op[op] += e["dur"]
                count[op] += 1
        n = runs + 1
        result[graph] = {
            "tokens": int(feeds["input_ids"].shape[1]),
            "model_run_ms": total / n / 1e3,
            "kernels_per_run": (sum(count.values()) + sum(body_count.values())) // n,
            "ops": [{"op": op, "ms_per_run": us / n / 1e3, "kernels_per_run": count[op] // n}
                    for op, us in per_op.most_common()],
            "scan_body_ops": [{"op": op, "ms_per_run": us / n / 1e3, "kernels_per_run": body_count[op] // n}
                              for op, us in body.most_common()],
        }
    return result


# ----------------------------------------------------------------------------------------
# report


def median(xs):
    return statistics.median(xs)


def summarize(runs: list[dict], batch: int, prompt_len: int, new_tokens: int) -> dict:
    pre = [r["prefill_s"] for r in runs]
    dec = [r["decode_s"] for r in runs]
    steps = new_tokens - 1
    out = {
        "prefill_s": pre, "decode_s": dec,
        # rates from the median time, so that the rate and time rows agree for any --repeats
        "prefill_tok_s": batch * prompt_len / median(pre),
        "decode_tok_s": batch * steps / median(dec),
        "best_prefill_tok_s": batch * prompt_len / min(pre),
        "best_decode_tok_s": batch * steps / min(dec),
        "prefill_ms": median(pre) * 1e3,
        "decode_ms_per_step": median(dec) / steps * 1e3,
        # process CPU time (all threads): load-independent with --threads 1; with more threads it
        # also counts spin-waiting
        "prefill_cpu_ms": median([r["prefill_cpu_s"] for r in runs]) * 1e3,
        "decode_cpu_ms_per_step": median([r["decode_cpu_s"] for r in runs]) / steps * 1e3,
    }
    if "decode_backend_s" in runs[0]:
        out["decode_backend_ms_per_step"] = median([r["decode_backend_s"] for r in runs]) / steps * 1e3
        out["prefill_backend_ms"] = median([r["prefill_backend_s"] for r in runs]) * 1e3
    return out


def table(q: dict, h: dict) -> str:
    rows = [
        ("prefill tokens/s", q["prefill_tok_s"], h["prefill_tok_s"], q["prefill_tok_s"] / h["prefill_tok_s"], "{:.1f}"),
        ("decode tokens/s", q["decode_tok_s"], h["decode_tok_s"], q["decode_tok_s"] / h["decode_tok_s"], "{:.1f}"),
        ("prefill time (ms)", q["prefill_ms"], h["prefill_ms"], h["prefill_ms"] / q["prefill_ms"], "{:.1f}"),
        ("decode ms/step", q["decode_ms_per_step"], h["decode_ms_per_step"],
         h["decode_ms_per_step"] / q["decode_ms_per_step"], "{:.2f}"),
        ("prefill CPU time (ms)", q["prefill_cpu_ms"], h["prefill_cpu_ms"], h["prefill_cpu_ms"] / q["prefill_cpu_ms"], "{:.1f}"),
        ("decode CPU ms/step", q["decode_cpu_ms_per_step"], h["decode_cpu_ms_per_step"],
         h["decode_cpu_ms_per_step"] / q["decode_cpu_ms_per_step"], "{:.2f}"),
    ]
    lines = ["| metric | qcn (ORT) | transformers | ratio (qcn speedup) |", "|---|---:|---:|---:|"]
    for name, a, b, r, fmt in rows:
        lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {r:.2f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# --context-scaling


_RSS_CHILD = """
import json, sys
import numpy as np
from qcn.runtime.generate import load
gen = load(sys.argv[1], threads=1, share_weights=sys.argv[2] == "1")
s = gen.session
h = s.allocate()
logits = s.prefill(h, list(range(5, 69)))
s.decode([h], [int(np.argmax(logits))])
status = open("/proc/self/status").read()
kb = lambda key: int(status.split(key + ":")[1].split()[0])
print(json.dumps({"peak_rss_mb": kb("VmHWM") / 1024, "rss_mb": kb("VmRSS") / 1024,
                  "rss_anon_mb": kb("RssAnon") / 1024, "rss_file_mb": kb("RssFile") / 1024}))
"""


def peak_rss(artifact: Path, share: bool) -> dict:
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(artifact), "1" if share else "0"],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def context_scaling(args, argv=None) -> int:
    from qcn.runtime.backends import create_backend
    from qcn.runtime.manifest import load_manifest
    from qcn.runtime.session import Session
    from qcn.runtime.state import HostStateStore

    artifact = args.artifact
    if not (artifact / "manifest.json").is_file():
        print(f"error: {artifact} is not a compiled artifact (qcn-compile recipes/pico_cpu.yaml)", file=sys.stderr)
        return 2
    facts = machine_facts()
    facts["loadavg_start"] = loadavg()
    print(f"# {facts['date_utc']}  commit {facts['commit']}  CPU: {facts['cpu']}, {facts['usable_cpus']} usable; "
          f"threads={args.threads}; loadavg {facts['loadavg_start']}", flush=True)
    manifest = load_manifest(artifact)
    if max(args.contexts) + args.steps > manifest.model.max_context:
        print(f"error: --contexts + --steps exceed max_context {manifest.model.max_context}", file=sys.stderr)
        return 2

    class HostCopy:  # the backend run() path with the state copied into the feeds
        def __init__(self, backend):
            self.backend, self.manifest = backend, backend.manifest

        def run(self, graph, feeds, outputs=None):
            return self.backend.run(graph, feeds, outputs)

        def create_state(self, *, slots, max_context):
            return HostStateStore(self, slots=slots, max_context=max_context)

    old_be = create_backend(manifest, threads=args.threads, share_weights=False)
    new_be = create_backend(manifest, threads=args.threads)
    sessions = {"host-copy": Session(manifest, HostCopy(old_be)), "iobinding": Session(manifest, new_be)}
    rng = np.random.default_rng(args.seed)
    high = min([manifest.model.vocab_size, *manifest.tokenizer.eos_token_ids])
    prompt = rng.integers(0, high, size=max(args.contexts)).tolist()
    snaps, graph_feeds = {}, {}
    for name, sess in sessions.items():
        for ctx in args.contexts:
            h = sess.allocate()
            t0 = time.perf_counter()
            sess.prefill(h, prompt[:ctx])
            snaps[name, ctx] = sess.snapshot(h)
            sess.release(h)
            print(f"# {name}: prefilled {ctx} tokens in {time.perf_counter() - t0:.1f}s", flush=True)
    dec = manifest.graph("decode")
    for ctx in args.contexts:  # graph-only: the decode graph's inputs prebuilt at exactly ctx cached tokens
        arrays = snaps["iobinding", ctx].arrays
        feeds = {"input_ids": np.array([[int(prompt[0])]], dtype=np.int64), "past_len": np.array([ctx], dtype=np.int64)}
        for st in manifest.state:
            feeds[st.input] = np.ascontiguousarray(arrays[st.input][None])
        graph_feeds[ctx] = {k: v for k, v in feeds.items() if k in dec.input_names}

    def timed_block(kind: str, ctx: int) -> tuple[float, float]:
        """(wall ms, process CPU ms) per step over one block of --steps steps."""
        if kind == "graph-only":
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                new_be.run("decode", graph_feeds[ctx])
        else:
            sess = sessions[kind]
            h = sess.restore(snaps[kind, ctx])
            tok = int(prompt[0])
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                tok = int(np.argmax(sess.decode([h], [tok])[0]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if kind != "graph-only":
            sess.release(h)
        return wall / args.steps * 1e3, cpu / args.steps * 1e3

    kinds = ("host-copy", "iobinding", "graph-only")
    cells = [(k, c) for k in kinds for c in args.contexts]
    for cell in cells:  # warm-up
        timed_block(*cell)
    results: dict = {cell: [] for cell in cells}
    for r in range(args.repeats):
        order = cells[r % len(cells):] + cells[: r % len(cells)]  # rotate the order every repeat
        for cell in order:
            results[cell].append(timed_block(*cell))
    facts["loadavg_end"] = loadavg()
    lo, hi = min(args.contexts), max(args.contexts)
    for i, what in enumerate(("wall", "process CPU")):
        med = {cell: median([x[i] for x in v]) for cell, v in results.items()}
        print()
        print(f"| decode {what} ms/step (median of {args.repeats} x {args.steps} steps, threads={args.threads}) | "
              + " | ".join(f"{c} cached" for c in args.contexts) + f" | {hi} / {lo} |")
        print("|---|" + "---:|" * (len(args.contexts) + 1))
        for k in kinds:
            print(f"| {k} | " + " | ".join(f"{med[k, c]:.2f}" for c in args.contexts) + f" | {med[k, hi] / med[k, lo]:.2f}x |")
    rss = {"share_weights=False": peak_rss(artifact, False), "share_weights=True": peak_rss(artifact, True)}
    weights_mb = sum(f.stat().st_size for f in artifact.glob("*.bin")) / 2**20
    print(f"\n| loaded {artifact.name} (prefill 64 + 1 decode step), MB | peak RSS | RSS anon | RSS file |\n|---|---:|---:|---:|")
    for k, v in rss.items():
        print(f"| {k} | {v['peak_rss_mb']:.0f} | {v['rss_anon_mb']:.0f} | {v['rss_file_mb']:.0f} |")
    print(f"weights files: {weights_mb:.0f} MB; loadavg start {facts['loadavg_start']} end {facts['loadavg_end']}")
    if args.json:
        doc = {"benchmark": "cpu_decode --context-scaling", "machine": facts,
               "command": " ".join(["python", "benchmarks/cpu_decode.py", *(sys.argv[1:] if argv is None else argv)]),
               "ms_per_step_wall_cpu": {f"{k}@{c}": v for (k, c), v in results.items()}, "rss": rss, "weights_mb": weights_mb}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    for be in (old_be, new_be):
        be.close()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.context_scaling:
        logging.basicConfig(level=logging.WARNING)
        return context_scaling(args, argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import Qwen3NextForCausalLM

    transformers.logging.set_verbosity_error()
    from qcn.runtime.generate import load

    ckpt = ensure_checkpoint(args.checkpoint)
    artifact = ensure_artifact(args.artifact, ckpt, args.recipe, force=args.recompile)
    mismatch = check_same_model(artifact, ckpt)
    if mismatch:
        print(f"WARNING: {mismatch}", flush=True)

    facts = machine_facts()
    facts["loadavg_start"] = loadavg()
    manifest = json.loads((artifact / "manifest.json").read_text())
    facts["artifact_created_utc"] = manifest.get("created_utc")
    print(f"# {facts['date_utc']}  commit {facts['commit']}", flush=True)
    print(f"# CPU: {facts['cpu']}, {facts['logical_cpus']} logical CPUs ({facts['usable_cpus']} usable); "
          f"threads={args.threads}; loadavg {facts['loadavg_start']}", flush=True)
    busy = facts["loadavg_start"] and facts["loadavg_start"][0] > 0.5 * (facts["usable_cpus"] or 1)
    if busy:
        print(f"# WARNING: the machine is busy (1-min load {facts['loadavg_start'][0]} on {facts['usable_cpus']} CPUs); "
              "timings with --threads > 1 (torch's OpenMP ones most) are inflated by contention", flush=True)
    print(f"# artifact {artifact} compiled {facts['artifact_created_utc']}", flush=True)
    print(f"# python {facts['python']}, torch {facts['torch']}, onnxruntime {facts['onnxruntime']}, "
          f"transformers {facts['transformers']}, numpy {facts['numpy']}", flush=True)

    # -- load both
    t0 = time.perf_counter()
    gen = load(artifact, threads=args.threads)
    session = gen.session
    timed = TimedStore(session.store)
    qcn_load_s = time.perf_counter() - t0
    if args.batch > session.max_batch:
        print(f"error: --batch {args.batch} exceeds the artifact's max_batch {session.max_batch}", file=sys.stderr)
        return 2
    if args.prompt_len + args.new_tokens > session.max_context:
        print(f"error: --prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the artifact's "
              f"max_context {session.max_context}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = Qwen3NextForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    hf_load_s = time.perf_counter() - t0

    # -- the same prompt ids for both: random ids below the special tokens (no EOS in prompts)
    vocab = gen.manifest.model.vocab_size
    high = min([vocab, *gen.manifest.tokenizer.eos_token_ids])
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, high, size=(args.batch, args.prompt_len)).tolist()
    ids = torch.tensor(prompts, dtype=torch.long)
    hf_run = hf_run_loop if args.hf_decode == "loop" else hf_run_generate
    # generate(min_new_tokens=N) masks the EOS ids of the generation config; both loops do the same
    hf_eos = model.generation_config.eos_token_id
    hf_eos = [hf_eos] if isinstance(hf_eos, int) else list(hf_eos or [])
    eos = sorted(set(gen.manifest.tokenizer.eos_token_ids) | set(hf_eos))
    print(f"# prompt_len={args.prompt_len} new_tokens={args.new_tokens} (= 1 from prefill + "
          f"{args.new_tokens - 1} decode steps) batch={args.batch} repeats={args.repeats} "
          f"prefill_chunk={session.prefill_chunk} hf_decode={args.hf_decode}", flush=True)

    with torch.inference_mode():
        # -- warm-up (full sizes) + greedy token check against generate()
        t0 = time.perf_counter()
        q_warm = qcn_run(session, timed, prompts, args.new_tokens, eos)
        h_warm = hf_run(model, ids, args.new_tokens, eos)
        check = {"checked": not args.no_check}
        if not args.no_check:
            _, _, gen_tokens = hf_generate(model, ids, args.new_tokens)
            check["qcn_vs_generate"] = q_warm["tokens"] == gen_tokens
            check["transformers_vs_generate"] = h_warm["tokens"] == gen_tokens
            if not check["qcn_vs_generate"]:
                first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                         for x, y in zip(q_warm["tokens"], gen_tokens)]
                check["first_mismatch_per_sequence"] = first
        print(f"# warm-up done in {time.perf_counter() - t0:.1f}s", flush=True)

        # -- timed repeats, interleaved
        q_runs, h_runs = [], []
        for r in range(args.repeats):
            order = ("qcn", "hf") if r % 2 == 0 else ("hf", "qcn")
            for who in order:
                if who == "qcn":
                    q_runs.append(qcn_run(session, timed, prompts, args.new_tokens, eos))
                else:
                    h_runs.append(hf_run(model, ids, args.new_tokens, eos))
            print(f"# repeat {r + 1}/{args.repeats}: qcn prefill {q_runs[-1]['prefill_s'] * 1e3:.0f} ms, decode "
                  f"{q_runs[-1]['decode_s']:.2f} s | transformers prefill {h_runs[-1]['prefill_s'] * 1e3:.0f} ms, "
                  f"decode {h_runs[-1]['decode_s']:.2f} s", flush=True)

    stable = all(r["tokens"] == q_warm["tokens"] for r in q_runs) and all(r["tokens"] == h_warm["tokens"] for r in h_runs)
    check["timed_runs_match"] = stable and all(q["tokens"] == h["tokens"] for q, h in zip(q_runs, h_runs))
    q = summarize(q_runs, args.batch, args.prompt_len, args.new_tokens)
    h = summarize(h_runs, args.batch, args.prompt_len, args.new_tokens)
    facts["loadavg_end"] = loadavg()

    print()
    print(table(q, h))
    print()
    qd, qb = q["decode_ms_per_step"], q["decode_backend_ms_per_step"]
    print(f"qcn decode step {qd:.2f} ms = state-store step (bind + ONNX Runtime run + K/V append) {qb:.2f} ms "
          f"({100 * qb / qd:.0f}%) + Session/numpy/argmax {qd - qb:.2f} ms; qcn prefill {q['prefill_ms']:.1f} ms of which "
          f"store steps {q['prefill_backend_ms']:.1f} ms")
    if args.repeats > 1:
        print(f"best of {args.repeats} (least disturbed) instead of median: prefill {q['best_prefill_tok_s']:.1f} vs "
              f"{h['best_prefill_tok_s']:.1f} tokens/s ({q['best_prefill_tok_s'] / h['best_prefill_tok_s']:.2f}x), decode "
              f"{q['best_decode_tok_s']:.1f} vs {h['best_decode_tok_s']:.1f} tokens/s "
              f"({q['best_decode_tok_s'] / h['best_decode_tok_s']:.2f}x)")
    if check["checked"]:
        print(f"greedy tokens: qcn == transformers generate(): {check['qcn_vs_generate']}; "
              f"transformers {args.hf_decode} == generate(): {check['transformers_vs_generate']}; "
              f"timed runs agree: {check['timed_runs_match']}")
    else:
        print(f"greedy tokens (timed runs): qcn == transformers: {check['timed_runs_match']}")
    print(f"loadavg start {facts['loadavg_start']} end {facts['loadavg_end']}; model loading: qcn {qcn_load_s:.2f}s, "
          f"transformers {hf_load_s:.2f}s; total {time.perf_counter() - t_start:.0f}s")

    profile = None
    if args.ort_profile:
        profile = ort_profile(gen, prompts[0], args.threads)
        for graph, p in profile.items():
            print(f"\nORT profile, {graph} ({p['tokens']} token(s)/call): {p['model_run_ms']:.2f} ms/run (profiled), "
                  f"{p['kernels_per_run']} kernels/run")
            for o in p["ops"][:10]:
                print(f"  {o['op']:<24} {o['ms_per_run']:8.3f} ms  {o['kernels_per_run']:6d} kernels")
            if p["scan_body_ops"]:
                inner = sum(o["ms_per_run"] for o in p["scan_body_ops"])
                kern = sum(o["kernels_per_run"] for o in p["scan_body_ops"])
                print(f"  inside the Scan bodies (included in Scan above): {kern} kernels, {inner:.3f} ms: "
                      + ", ".join(f"{o['op']} {o['ms_per_run']:.2f}" for o in p["scan_body_ops"][:6]))

    if args.json:
        for runs in (q_runs, h_runs):
            for r in runs:
                r.pop("tokens", None)
        doc = {
            "benchmark": "cpu_decode",
            "command": " ".join(["python", "benchmarks/cpu_decode.py", *(sys.argv[1:] if argv is None else argv)]),
            "machine": facts,
            "settings": {"checkpoint": str(ckpt), "artifact": str(artifact), "prompt_len": args.prompt_len,
                         "new_tokens": args.new_tokens, "decode_steps": args.new_tokens - 1, "batch": args.batch,
                         "repeats": args.repeats, "threads": args.threads, "hf_decode": args.hf_decode,
                         "seed": args.seed, "prefill_chunk": session.prefill_chunk},
            "qcn": q, "transformers": h,
            "ratios": {"prefill_tok_s": q["prefill_tok_s"] / h["prefill_tok_s"],
                       "decode_tok_s": q["decode_tok_s"] / h["decode_tok_s"]},
            "greedy_check": check,
            "ort_profile": profile,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    gen.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
