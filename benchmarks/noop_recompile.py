"""Cost of exact staleness: a no-op recompile of a synthetic multi-GB checkpoint.

The checkpoint is the smallest tiny model plus one bulk shard of `mtp.*` tensors (the MTP head
is kept aside by the export, so the export stays quick while the checkpoint is GBs, as the real
one is). After one compile, the skip decision of `run_pipeline` is timed three ways, interleaved:

- before: the old key (config/index hashes, shard names and sizes; a same-size retrain is
  missed) + the old `up_to_date` (sha256 of every artifact file, every run);
- after, cold: the exact key with an empty hash cache (first compile, or after a retrain);
- after, warm: the exact key with the stat cache (the no-op recompile a user runs).

The full `qcn-compile` wall time of the no-op (interpreter and imports included) is timed too,
for the warm case. Files are read from the page cache (they were just written): cold numbers
are sha256 speed, a cold disk would be slower.

    python benchmarks/noop_recompile.py --gb 3 --work /tmp/noop   # deletes --work afterwards
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _workdir import MARKER, own_workdir  # noqa: E402


def bulk_shard(ckpt: Path, gb: float) -> int:
    """Append `model-mtp-bulk.safetensors` holding ~gb GB of BF16 mtp.* tensors (streamed)."""
    n_tensors, rows, cols = max(1, int(gb * 4)), 16384, 8192  # 256 MiB each
    header = {f"mtp.bulk.{i}.weight": {"dtype": "BF16", "shape": [rows, cols],
                                       "data_offsets": [i * rows * cols * 2, (i + 1) * rows * cols * 2]}
              for i in range(n_tensors)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = os.urandom(1 << 20)
    path = ckpt / "model-mtp-bulk.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(n_tensors * rows * cols * 2 // len(block)):
            f.write(block)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"] |= {name: path.name for name in header}
        index.write_text(json.dumps(idx, indent=2))
    return path.stat().st_size


def old_key_and_check(recipe, out: Path) -> bool:
    """The skip decision before #16 (kept here only to measure it)."""
    from qcn.compile.artifacts import sha256_file, sha256_json

    ck = Path(recipe.checkpoint)
    fp = {"config": sha256_file(ck / "config.json"),
          "index": sha256_file(ck / "model.safetensors.index.json") if (ck / "model.safetensors.index.json").is_file() else None,
          "shards": sorted((p.name, p.stat().st_size) for p in ck.glob("*.safetensors"))}
    sha256_json({"recipe": recipe.to_dict(), "checkpoint": fp})
    m = json.loads((out / "manifest.json").read_text())
    return all(sha256_file(out / rel) == d for rel, d in m["files"].items())


def new_key_and_check(recipe, out: Path, cache) -> bool:
    from qcn.compile.pipeline import export_inputs, up_to_date

    return up_to_date(out, export_inputs(recipe, cache), cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qcn-noop-bench"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep --work (default: delete it)")
    a = ap.parse_args()

    import dataclasses

    from qcn.compile.artifacts import HashCache, human_bytes
    from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
    from qcn.compile.pipeline import run_pipeline
    from qcn.compile.recipe import RuntimeOptions, load_recipe

    own_workdir(a.work, "--work")
    for entry in a.work.iterdir():  # what an earlier run of this benchmark left (--keep)
        if entry.name != MARKER:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    try:
        ckpt = write_tiny_checkpoint(a.work / "ckpt", TINY_SPECS["sparse_step2"], seed=1, shard_max_bytes=60_000)
        size = bulk_shard(ckpt, a.gb)
        total = sum(p.stat().st_size for p in ckpt.iterdir())
        out = a.work / "out"
        recipe = dataclasses.replace(load_recipe("recipes/tiny_cpu.yaml", checkpoint=ckpt, output=out),
                                     runtime=RuntimeOptions(max_context=256))
        cache_file = a.work / "sha256.json"
        assert run_pipeline(recipe, hash_cache=HashCache(cache_file)).ran == ["export"]
        times = {"before": [], "after, cold cache": [], "after, warm cache": []}
        for _ in range(a.reps):
            t0 = time.perf_counter()
            assert old_key_and_check(recipe, out)
            times["before"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert new_key_and_check(recipe, out, HashCache())
            times["after, cold cache"].append(time.perf_counter() - t0)
            warm = HashCache(cache_file)
            t0 = time.perf_counter()
            assert new_key_and_check(recipe, out, warm)
            times["after, warm cache"].append(time.perf_counter() - t0)
            assert warm.hashed_bytes == 0
        recipe_file = a.work / "r.yaml"
        recipe_file.write_text(Path("recipes/tiny_cpu.yaml").read_text().replace("max_context: 4096", "max_context: 256"))
        env = dict(os.environ, XDG_CACHE_HOME=str(a.work / "xdg"))
        (a.work / "xdg" / "qcn").mkdir(parents=True)
        shutil.copy(cache_file, a.work / "xdg" / "qcn" / "sha256.json")
        cli = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "qcn.compile.cli", str(recipe_file), "--checkpoint", str(ckpt),
                                "--out", str(out), "-q"], env=env, capture_output=True, text=True)
            cli.append(time.perf_counter() - t0)
            assert r.returncode == 0 and "export (up to date)" in r.stdout, r.stdout + r.stderr
        print(f"checkpoint: {human_bytes(total)} ({human_bytes(size)} bulk mtp shard); artifact "
              f"{human_bytes(sum(p.stat().st_size for p in out.iterdir()))}; medians of {a.reps}, interleaved")
        for k, v in times.items():
            print(f"  {k:<20} {statistics.median(v) * 1000:9.1f} ms   (min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})")
        print(f"  qcn-compile no-op (warm cache, whole process): median {statistics.median(cli):.2f} s of 3")
    finally:
        if not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
