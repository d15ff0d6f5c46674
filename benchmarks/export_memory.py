#!/usr/bin/env python
"""Export memory benchmark: peak anonymous RAM of `qcn-compile --until export` at full width.

For each depth in --layers (default 2 and 4) it
1. writes a full-width random checkpoint with `write_tiny_checkpoint` (hidden 2048, 512 experts
   of width 512, top-10 + shared expert 512, attention 16/2 heads x 256, DeltaNet 16/32 heads
   x 128, the real 3 x DeltaNet + 1 x attention pattern cut to the depth, MTP layer included;
   vocab --vocab, default 8192; bf16; 4 GiB shards), in a child process;
2. exports it (`qcn-compile RECIPE --until export --force -q`, target h100, activation dtype
   bfloat16: the export stage of the GPU recipes) in a child process.

While each child runs, the process tree's anonymous resident memory (RssAnon in
/proc/<pid>/status, summed over the child and its descendants; file-backed pages such as
mmapped shards and the page cache are excluded) is sampled every --interval seconds and its
peak is reported next to the weights size and the wall time (MB/s of weights written). The
checkpoints are deleted afterwards unless --keep.

The 48-layer projection: a line through the (layers, peak) points, and the time per byte of
the deepest run applied to the real model's weights size (computed from its weight map).

Run from the repository root (needs ~20 GB free disk for 4 layers, ~3 GB RAM):
    python benchmarks/export_memory.py [--layers 2 4] [--workdir build/export_memory] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _workdir import own_workdir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REAL_CONFIG = REPO / "recipes" / "models" / "qwen3-coder-next"

_L, _F = "linear_attention", "full_attention"


def full_width_spec(layers: int, vocab: int):
    from qcn.compile.export.tiny import TinySpec

    pattern = tuple(_F if (i + 1) % 4 == 0 else _L for i in range(layers))
    if _F not in pattern:  # at least one attention layer (2 layers: one DeltaNet, one attention)
        pattern = pattern[:-1] + (_F,)
    return TinySpec(
        vocab_size=vocab, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, num_experts=512, num_experts_per_tok=10,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, intermediate_size=5120,
        layer_types=pattern, max_position_embeddings=4096)


def _generate(out: str, layers: int, vocab: int) -> None:  # runs in the child process
    from qcn.compile.export.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(Path(out), full_width_spec(layers, vocab), seed=0, dtype="bfloat16",
                          shard_max_bytes=4 << 30)


# ---------------------------------------------------------------------------------------
# sampling


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_anon(root: int) -> int:
    """RssAnon of `root` and all its descendants, in bytes."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss_anon_kib(pid)
        todo += _children(pid)
    return total * 1024


def run_sampled(cmd: list[str], interval: float, env: dict) -> dict:
    """Run `cmd`; return its wall time, exit code and peak tree RssAnon (bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_anon(proc.pid))
        time.sleep(interval)
    wall = time.perf_counter() - t0
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"wall_s": wall, "peak_rss_anon": peak}


# ---------------------------------------------------------------------------------------


def _recipe(path: Path, ckpt: Path, out: Path) -> None:
    path.write_text(f"""name: export_memory
checkpoint: {ckpt}
output: {out}
target: h100
export:
  opset: 23
  activation_dtype: bfloat16
  logits: last
runtime:
  backend: tensorrt
  max_batch: 1
  max_context: 4096
""")


def real_weights_bytes() -> int:
    """Bytes of weights.bin for the real model (bf16 export), from its weight map."""
    from qcn.compile.export.config import load_model_config
    from qcn.compile.export.weights import weight_specs

    cfg = load_model_config(REAL_CONFIG)
    return sum(math.prod(s.shape) * (4 if s.fp32 else 2) for s in weight_specs(cfg))


def largest_tensor_bytes(cfg) -> tuple[str, int]:
    from qcn.compile.export.weights import weight_specs

    best = max(weight_specs(cfg), key=lambda s: math.prod(s.shape) * (4 if s.fp32 else 2))
    return best.name, math.prod(best.shape) * (4 if best.fp32 else 2)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--workdir", type=Path, default=REPO / "build" / "export_memory")
    p.add_argument("--interval", type=float, default=0.02, help="sampling period in seconds")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints and exports")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--generate", nargs=3, metavar=("OUT", "LAYERS", "VOCAB"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.generate:
        _generate(a.generate[0], int(a.generate[1]), int(a.generate[2]))
        return 0

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    own_workdir(a.workdir, "--workdir")
    rows = []
    for layers in a.layers:
        ckpt, out = a.workdir / f"ckpt-{layers}l", a.workdir / f"export-{layers}l"
        shutil.rmtree(ckpt, ignore_errors=True)
        print(f"[{layers} layers] writing checkpoint {ckpt}", flush=True)
        gen = run_sampled([sys.executable, __file__, "--generate", str(ckpt), str(layers), str(a.vocab)],
                          a.interval, env)
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        recipe = a.workdir / f"recipe-{layers}l.yaml"
        _recipe(recipe, ckpt, out)
        print(f"[{layers} layers] exporting ({ckpt_bytes / 1e9:.2f} GB checkpoint)", flush=True)
        exp = run_sampled([sys.executable, "-m", "qcn.compile.cli", str(recipe), "--until", "export", "--force", "-q"],
                          a.interval, env)
        weights = out.with_name(out.name + ".stages") / "export" / "weights.bin"
        wbytes = weights.stat().st_size
        row = {"layers": layers, "checkpoint_bytes": ckpt_bytes, "weights_bytes": wbytes,
               "generate_peak_rss_anon": gen["peak_rss_anon"], "generate_s": gen["wall_s"],
               "export_peak_rss_anon": exp["peak_rss_anon"], "export_s": exp["wall_s"],
               "export_mb_s": wbytes / 1e6 / exp["wall_s"]}
        rows.append(row)
        print(f"[{layers} layers] weights {wbytes / 1e9:.2f} GB; export peak RssAnon "
              f"{exp['peak_rss_anon'] / 1e9:.3f} GB, {exp['wall_s']:.0f} s ({row['export_mb_s']:.0f} MB/s); "
              f"generator peak RssAnon {gen['peak_rss_anon'] / 1e9:.3f} GB, {gen['wall_s']:.0f} s", flush=True)
        if not a.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".stages"), ignore_errors=True)

    from qcn.compile.export.config import load_model_config

    real = real_weights_bytes()
    real_cfg = load_model_config(REAL_CONFIG)
    big_name, big_bytes = largest_tensor_bytes(real_cfg)
    result = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
              "commit": _git("rev-parse", "--short", "HEAD") + ("-dirty" if _git("status", "--porcelain") else ""),
              "command": " ".join(["python", "benchmarks/export_memory.py", *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows, "real_weights_bytes": real, "real_largest_tensor": [big_name, big_bytes]}
    if len(rows) >= 2:
        (l0, p0), (l1, p1) = (rows[0]["layers"], rows[0]["export_peak_rss_anon"]), \
            (rows[-1]["layers"], rows[-1]["export_peak_rss_anon"])
        slope = (p1 - p0) / (l1 - l0)
        result["peak_per_layer_bytes"] = slope
        result["projected_peak_48_bytes"] = p1 + slope * (real_cfg.num_hidden_layers - l1)
    deepest = rows[-1]  # times on a shared machine are too noisy for a line fit: use the deepest run's rate
    result["projected_export_s_48"] = real / (deepest["weights_bytes"] / deepest["export_s"])
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
