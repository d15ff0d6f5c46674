#!/usr/bin/env python
"""qcn (ONNX Runtime, the cpu artifact) beside llama.cpp on qcn-pico: same weights, same prompt
token ids, greedy decode; prefill and decode tokens/s, peak RSS, greedy-token agreement.

llama.cpp comes from the package registry: ``pip install .[bench]`` installs llama-cpp-python
(its Python bindings build llama.cpp from source; this script uses them directly, no server).
The GGUF files are written by llama.cpp's own converter, ``convert_hf_to_gguf.py``, which ships
in llama-cpp-python's source distribution (``vendor/llama.cpp``), not in its wheel: the script
fetches that sdist with ``pip download --no-binary :all:`` for the installed version (or uses
``--llama-src DIR``). ``q4_0`` is made from the f32 GGUF with llama.cpp's quantizer
(``llama_model_quantize`` through the bindings).

**Pre-tokenizer**: the converter identifies a tokenizer's pre-tokenizer by hashing its output on
a test string; qcn-pico's tokenizer (a byte-level BPE trained for the pico model, with Qwen2's
pre-tokenizer regex) has a hash the converter does not know, and it refuses. This script maps
an unknown hash to ``qwen2`` (it says so in its output). The benchmark feeds token ids, never
text, so the pre-tokenizer does not affect any number here.

Protocol: every system runs in its own worker process (so that peak RSS = the worker's VmHWM
is per system), kept alive over all rounds. Each round runs every (threads, batch) setting on
every worker, in an order rotated per round, so background load hits all alike; the median
over ``--rounds`` of each metric is reported, with ratios qcn / llama.cpp. One untimed warm-up
round first. Prefill: the prompts one sequence after another (what ``qcn.runtime.generate``
does), the first token's logits at the end; decode: ``--new-tokens - 1`` greedy steps over all
sequences together, EOS logits masked to -inf (so every system makes the same number of
tokens). Tokens/s from wall time; process CPU time is reported too (with 1 thread it is close
to what an idle machine would show, when other jobs share the cores).

Run from the repository root:
    python benchmarks/vs_llamacpp.py [--threads 1 2] [--batch 1 4] [--types f32 q8_0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workdir import own_workdir  # noqa: E402
from cpu_decode import ensure_artifact, git_commit, loadavg, machine_facts  # noqa: E402

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "models/qcn-pico", help="Hugging Face checkpoint (qcn-pico)")
    p.add_argument("--artifact", type=Path, default=REPO / "build/artifacts/pico_cpu",
                   help="qcn cpu artifact; compiled from --recipe if missing")
    p.add_argument("--recipe", type=Path, default=REPO / "recipes/pico_cpu.yaml")
    p.add_argument("--recompile", action="store_true", help="recompile --artifact with the checked-out compiler")
    p.add_argument("--int4-artifact", type=Path, default=None,
                   help="also measure a qcn INT4 cpu artifact as 'qcn int4' (compiled from recipes/pico_int4_cpu.yaml "
                   "if missing), compared with llama.cpp q4_0 / q8_0 (add them to --types)")
    p.add_argument("--baseline-artifact", type=Path,
                   help="a second qcn artifact measured in the same rounds as 'qcn fp32 before' (e.g. compiled by an "
                   "older commit), for before/after tables")
    p.add_argument("--baseline-pythonpath", default=None,
                   help="PYTHONPATH of the baseline worker (e.g. an older checkout's import root), so that its "
                   "runtime is the old one too; default: the same as the other workers")
    p.add_argument("--work", type=Path, default=REPO / "build/vs_llamacpp",
                   help="folder for the GGUF files and llama-cpp-python's source (reused when present)")
    p.add_argument("--llama-src", type=Path, help="a llama.cpp source tree holding convert_hf_to_gguf.py "
                   "(default: vendor/llama.cpp of the installed llama-cpp-python's sdist, fetched into --work)")
    p.add_argument("--types", nargs="+", default=["f32", "q8_0"], choices=GGUF_TYPES, help="llama.cpp GGUF types")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64, help="1 from the prefill logits + N-1 decode steps")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="OUT")
    a = p.parse_args(argv)
    a.work = own_workdir(a.work, "--work")  # GGUF files and the sdist go here: never a user's folder
    if min(a.threads + a.batch) < 1 or a.prompt_len < 1 or a.new_tokens < 2 or a.rounds < 1:
        p.error("--threads, --batch, --prompt-len, --rounds must be >= 1 and --new-tokens >= 2")
    return a


# ----------------------------------------------------------------------------------------
# llama.cpp: source, conversion


def llama_source(args) -> Path:
    if args.llama_src:
        src = args.llama_src
    else:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("llama-cpp-python")
        except PackageNotFoundError:
            raise SystemExit("llama-cpp-python is not installed: pip install '.[bench]' (it builds llama.cpp from "
                             "source, several minutes)") from None
        root = args.work / f"llama_cpp_python-{ver}"
        if not (root / "vendor/llama.cpp/convert_hf_to_gguf.py").exists():
            args.work.mkdir(parents=True, exist_ok=True)
            print(f"# fetching llama-cpp-python {ver}'s source distribution (for llama.cpp's converter)", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={ver}", "-d", str(args.work)], check=True, capture_output=True)
            with tarfile.open(args.work / f"llama_cpp_python-{ver}.tar.gz") as tf:
                tf.extractall(args.work, filter="data")
        src = root / "vendor/llama.cpp"
    if not (src / "convert_hf_to_gguf.py").exists():
        raise SystemExit(f"{src}: no convert_hf_to_gguf.py there")
    return src


_CONVERT = textwrap.dedent("""
    import logging, runpy, sys
    src = sys.argv[1]
    sys.path.insert(0, src)
    sys.path.insert(1, src + "/gguf-py")
    from conversion import base
    original = base.TextModel.get_vocab_base_pre
    def pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # qcn-pico's tokenizer hash: Qwen2's pre-tokenizer regex
            print("# the converter does not know this tokenizer's pre-tokenizer hash: mapped to 'qwen2'", flush=True)
            return "qwen2"
    base.TextModel.get_vocab_base_pre = pre
    sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
    runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
""")


def convert(args, src: Path, kind: str) -> Path:
    """checkpoint -> GGUF of ``kind`` (cached in --work by name; remade when the checkpoint is newer)."""
    out = args.work / f"{args.checkpoint.name}-{kind}.gguf"
    newest = max(p.stat().st_mtime for p in args.checkpoint.iterdir())
    if out.exists() and out.stat().st_mtime > newest:
        return out
    args.work.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.gguf")
    if kind in CONVERTER_TYPES:
        print(f"# converting {args.checkpoint} -> {out.name} with llama.cpp's convert_hf_to_gguf.py", flush=True)
        r = subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(args.checkpoint), "--outtype", kind,
                            "--outfile", str(tmp)], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            if line.startswith("#"):
                print(line, flush=True)
        if r.returncode != 0:
            raise SystemExit(f"convert_hf_to_gguf.py failed for {kind}:\n{r.stderr[-3000:]}")
    else:
        base = convert(args, src, "f32")
        print(f"# quantizing {base.name} -> {out.name} with llama.cpp's llama_model_quantize", flush=True)
        import llama_cpp as L

        qp = L.llama_model_quantize_default_params()
        qp.ftype = {"q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
        if L.llama_model_quantize(str(base).encode(), str(tmp).encode(), qp) != 0:
            raise SystemExit(f"llama_model_quantize failed for {kind}")
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------
# workers (one process per system; line-delimited JSON over stdin/stdout)

_WORKER = textwrap.dedent(r'''
    import json, sys, time
    import numpy as np

    def status_kb(key):
        text = open("/proc/self/status").read()
        return int(text.split(key + ":")[1].split()[0])

    kind, path, threads, max_batch, eos = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
    base_rss = status_kb("VmRSS")

    def greedy(logits):
        logits = np.array(logits, dtype=np.float32, copy=True)
        logits[..., eos] = -np.inf
        return np.argmax(logits, axis=-1)

    if kind == "qcn":
        from qcn.runtime.generate import load
        session = load(path, threads=threads).session

        def run(prompts, new):
            slots = [session.allocate() for _ in prompts]
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                last = [int(greedy(session.prefill(s, p))) for s, p in zip(slots, prompts)]
                t1, c1 = time.perf_counter(), time.process_time()
                toks = [[t] for t in last]
                for _ in range(new - 1):
                    last = greedy(session.decode(slots, last)).tolist()
                    for row, t in zip(toks, last):
                        row.append(int(t))
                t2, c2 = time.perf_counter(), time.process_time()
            finally:
                for s in slots:
                    session.release(s)
            return t1 - t0, t2 - t1, c1 - c0, c2 - c1, toks
    else:
        import ctypes
        import llama_cpp as L
        quiet = L.llama_log_callback(lambda level, text, data: None)  # kept alive: llama.cpp holds the pointer
        L.llama_log_set(quiet, ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        model = L.llama_model_load_from_file(path.encode(), mp)
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 4096, 512, 512, max_batch
        cp.n_threads = cp.n_threads_batch = threads
        ctx = L.llama_init_from_model(model, cp)
        batch = L.llama_batch_init(512, 0, max_batch)

        def fill(tokens, pos, seqs, logits):
            batch.n_tokens = len(tokens)
            for i, (t, p, s, l) in enumerate(zip(tokens, pos, seqs, logits)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, l
                batch.seq_id[i][0] = s
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

        def logits_row(i):
            return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

        def run(prompts, new):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            t0, c0 = time.perf_counter(), time.process_time()
            last = []
            for s, p in enumerate(prompts):
                n = len(p)
                fill(p, range(n), [s] * n, [0] * (n - 1) + [1])
                last.append(int(greedy(logits_row(n - 1))))
            t1, c1 = time.perf_counter(), time.process_time()
            toks = [[t] for t in last]
            n0 = len(prompts[0])
            for step in range(new - 1):
                fill(last, [len(p) + step for p in prompts], range(len(prompts)), [1] * len(prompts))
                last = [int(greedy(logits_row(i))) for i in range(len(prompts))]
                for row, t in zip(toks, last):
                    row.append(t)
            t2, c2 = time.perf_counter(), time.process_time()
            return t1 - t0, t2 - t1, c1 - c0, c2 - c1, toks

    print(json.dumps({"ready": True, "rss_after_import_kb": base_rss}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            print(json.dumps({"peak_rss_kb": status_kb("VmHWM"), "rss_kb": status_kb("VmRSS"),
                              "rss_after_import_kb": base_rss}), flush=True)
            break
        pre, dec, cpre, cdec, toks = run(req["prompts"], req["new"])
        print(json.dumps({"prefill_s": pre, "decode_s": dec, "prefill_cpu_s": cpre, "decode_cpu_s": cdec,
                          "tokens": toks}), flush=True)
''')


class Worker:
    def __init__(self, name: str, kind: str, path: Path, threads: int, max_batch: int, eos: list[int],
                 pythonpath: str | None = None):
        self.name, self.threads = name, threads
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, kind, str(path), str(threads), str(max_batch),
                                      json.dumps(eos)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.name} died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, prompts, new: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new": new}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait()
        return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Per sequence: tokens before the first difference, and equal positions."""
    first = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) for r, s in zip(a, b)]
    same = sum(x == y for r, s in zip(a, b) for x, y in zip(r, s))
    return {"prefix_equal": first, "equal": same, "total": sum(len(r) for r in a)}


def summarize(results: dict, systems, settings, rss: dict, args) -> list[dict]:
    """Median rows over the rounds measured so far (rss: {} until the workers have exited)."""
    rows = []
    for t, b in settings:
        for name, _, _ in systems:
            rs = results[(name, t, b)]
            if not rs:
                continue
            med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            mem = rss.get((name, t), {})
            rows.append({"system": name, "threads": t, "batch": b, "rounds": len(rs),
                         "prefill_tok_s": b * args.prompt_len / med["prefill_s"],
                         "decode_tok_s": b * (args.new_tokens - 1) / med["decode_s"],
                         "prefill_tok_s_cpu": b * args.prompt_len / med["prefill_cpu_s"],
                         "decode_tok_s_cpu": b * (args.new_tokens - 1) / med["decode_cpu_s"],
                         "peak_rss_mib": mem.get("peak_rss_kb", float("nan")) / 1024,
                         "rss_after_import_mib": mem.get("rss_after_import_kb", float("nan")) / 1024})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    artifact = ensure_artifact(args.artifact, args.checkpoint, args.recipe, force=args.recompile)
    manifest = json.loads((artifact / "manifest.json").read_text())
    eos = sorted(set(manifest["tokenizer"]["eos_token_ids"]))
    vocab = manifest["model"]["vocab_size"]
    src = llama_source(args)
    ggufs = {k: convert(args, src, k) for k in args.types}

    facts = machine_facts()
    facts["loadavg_start"] = loadavg()
    print(f"# {facts['date_utc']}  commit {facts['commit']}  CPU: {facts['cpu']}, {facts['usable_cpus']} usable CPUs; "
          f"loadavg {facts['loadavg_start']}", flush=True)
    print(f"# artifact {artifact}; GGUF {', '.join(str(p) for p in ggufs.values())}", flush=True)
    rng = np.random.default_rng(args.seed)
    high = min([vocab, *eos])
    max_b = max(args.batch)
    prompts = rng.integers(0, high, size=(max_b, args.prompt_len)).tolist()

    systems = [("qcn fp32", "qcn", artifact)] + [(f"llama.cpp {k}", "llama", p) for k, p in ggufs.items()]
    if args.int4_artifact:
        systems.append(("qcn int4", "qcn", ensure_artifact(args.int4_artifact, args.checkpoint,
                                                           REPO / "recipes/pico_int4_cpu.yaml", force=args.recompile)))
    if args.baseline_artifact:
        systems.append(("qcn fp32 before", "qcn", args.baseline_artifact))
    workers = {(name, t): Worker(name, kind, path, t, max_b, eos,
                                 args.baseline_pythonpath if name == "qcn fp32 before" else None)
               for name, kind, path in systems for t in args.threads}
    settings = [(t, b) for t in args.threads for b in args.batch]
    results: dict = {(name, t, b): [] for name, _, _ in systems for t, b in settings}
    tokens: dict = {}
    loads = []
    try:
        for r in range(args.rounds + 1):  # round 0: warm-up
            for t, b in settings:
                names = [n for n, _, _ in systems]
                names = names[r % len(names):] + names[:r % len(names)]
                for name in names:
                    out = workers[(name, t)].run(prompts[:b], args.new_tokens)
                    tokens[(name, t, b)] = out.pop("tokens")
                    if r:
                        results[(name, t, b)].append(out)
            loads.append(loadavg())
            print(f"# round {r}{' (warm-up)' if r == 0 else ''} done, loadavg {loads[-1]}", flush=True)
            if args.json and r:  # partial results after every round (a run cut short still leaves its medians)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.with_suffix(".partial.json").write_text(json.dumps(
                    {"rounds_done": r, "rows": summarize(results, systems, settings, {}, args), "loadavg_rounds": loads},
                    indent=2) + "\n")
    finally:
        rss = {key: w.close() for key, w in workers.items()}
    facts["loadavg_end"] = loadavg()

    rows = summarize(results, systems, settings, rss, args)
    print()
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens - 1} decode steps, medians of {args.rounds} interleaved "
          "rounds; tok/s from wall time (in brackets: from process CPU time); peak RSS = the worker's VmHWM over all "
          "its batch sizes (python + numpy alone, before the model library is imported: in brackets)")
    print("| threads | batch | system | prefill tok/s | decode tok/s | peak RSS MiB |")
    print("|---:|---:|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['threads']} | {row['batch']} | {row['system']} | {row['prefill_tok_s']:.0f} "
              f"({row['prefill_tok_s_cpu']:.0f}) | {row['decode_tok_s']:.1f} ({row['decode_tok_s_cpu']:.1f}) | "
              f"{row['peak_rss_mib']:.0f} ({row['rss_after_import_mib']:.0f}) |")
    print()
    ref = "llama.cpp f32" if "f32" in ggufs else None
    agree = {}
    for t, b in settings:
        q = next(r for r in rows if r["system"] == "qcn fp32" and r["threads"] == t and r["batch"] == b)
        for name, _, _ in [x for x in systems[1:] if x[1] == "llama"]:
            ll = next(r for r in rows if r["system"] == name and r["threads"] == t and r["batch"] == b)
            print(f"threads {t} batch {b}: qcn / {name}: prefill {q['prefill_tok_s'] / ll['prefill_tok_s']:.2f}x "
                  f"(CPU time {q['prefill_tok_s_cpu'] / ll['prefill_tok_s_cpu']:.2f}x), decode "
                  f"{q['decode_tok_s'] / ll['decode_tok_s']:.2f}x (CPU time {q['decode_tok_s_cpu'] / ll['decode_tok_s_cpu']:.2f}x)")
        if args.int4_artifact:
            q4 = next(r for r in rows if r["system"] == "qcn int4" and r["threads"] == t and r["batch"] == b)
            for k in ("q4_0", "q8_0"):
                ll = next((r for r in rows if r["system"] == f"llama.cpp {k}" and r["threads"] == t and r["batch"] == b),
                          None)
                if ll is not None:
                    print(f"threads {t} batch {b}: qcn int4 / llama.cpp {k}: prefill "
                          f"{q4['prefill_tok_s'] / ll['prefill_tok_s']:.2f}x (CPU time "
                          f"{q4['prefill_tok_s_cpu'] / ll['prefill_tok_s_cpu']:.2f}x), decode "
                          f"{q4['decode_tok_s'] / ll['decode_tok_s']:.2f}x (CPU time "
                          f"{q4['decode_tok_s_cpu'] / ll['decode_tok_s_cpu']:.2f}x)")
        if args.baseline_artifact:
            old = next(r for r in rows if r["system"] == "qcn fp32 before" and r["threads"] == t and r["batch"] == b)
            print(f"threads {t} batch {b}: qcn / qcn before: prefill {q['prefill_tok_s'] / old['prefill_tok_s']:.2f}x "
                  f"(CPU time {q['prefill_tok_s_cpu'] / old['prefill_tok_s_cpu']:.2f}x), decode "
                  f"{q['decode_tok_s'] / old['decode_tok_s']:.2f}x (CPU time {q['decode_tok_s_cpu'] / old['decode_tok_s_cpu']:.2f}x)")
        for name, _, _ in systems[1:]:
            agree[f"{name} t{t} b{b}"] = a = agreement(tokens[("qcn fp32", t, b)], tokens[(name, t, b)])
            print(f"  greedy tokens qcn vs {name}: {a['equal']}/{a['total']} equal; equal prefix per sequence "
                  f"{a['prefix_equal']} of {args.new_tokens}")
    print(f"loadavg start {facts['loadavg_start']} end {facts['loadavg_end']}; per round {loads}")
    if ref is None:
        print("(no f32 GGUF in --types: no same-precision comparison)")
    if args.json:
        doc = {"benchmark": "vs_llamacpp", "command": " ".join(["python", "benchmarks/vs_llamacpp.py",
                                                                  *(sys.argv[1:] if argv is None else argv)]),
               "machine": facts, "commit": git_commit(), "rows": rows, "agreement": agree,
               "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
                            "threads": args.threads, "batch": args.batch, "types": args.types,
                            "gguf": {k: str(v) for k, v in ggufs.items()}, "artifact": str(artifact)},
               "loadavg_rounds": loads}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
