"""FP8 W8A8 accuracy on qcn-pico: the accuracy gate's numbers (compile/passes/quant/accuracy.py)
for each weight granularity x range method, from ONE export of the recipe's model.

For each variant the passes stage runs as `qcn-compile` runs it (calibration on the first
`calibration.tokens` tokens of the held-out text, then the gate on the next `gate.tokens`),
with the gate's thresholds switched off so every variant reports (the numbers are what the
recipe's thresholds would be checked against). Prints one row per variant and writes JSON.

    python benchmarks/fp8_accuracy.py --work /tmp/fp8bench        # deletes --work afterwards
    python benchmarks/fp8_accuracy.py --variants channel:max block128:max --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _workdir import own_workdir  # noqa: E402

VARIANTS = ("channel:max", "block128:max", "channel:percentile", "block128:percentile")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/pico_fp8_cpu.yaml")
    p.add_argument("--work", type=Path, default=Path("/tmp/qcn-fp8-accuracy"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="granularity:ranges pairs")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep --work")
    args = p.parse_args(argv)

    from qcn.compile.pipeline import compile_recipe, passes_stage
    from qcn.compile.recipe import GateOptions, load_recipe

    work = own_workdir(args.work, "--work")
    base = load_recipe(args.recipe)
    rows = []
    try:
        export = work / "export"
        t0 = time.time()
        compile_recipe(base, out=export)
        print(f"export: {time.time() - t0:.0f} s", file=sys.stderr)
        for v in args.variants:
            gran, ranges = v.split(":")
            q = base.quantization
            q = dataclasses.replace(q, fp8_granularity=gran, calibration=dataclasses.replace(q.calibration, ranges=ranges),
                                    gate=GateOptions(tokens=q.gate.tokens, seq_len=q.gate.seq_len, top1_min=None,
                                                     ppl_ratio_max=None, kl_mean_max=None))
            recipe = dataclasses.replace(base, quantization=q, output=work / v.replace(":", "_"))
            t0 = time.time()
            out = passes_stage(recipe, export, recipe.output, "benchmark")
            acc = json.loads((out / "accuracy.json").read_text())
            row = {"variant": v, "granularity": gran, "ranges": ranges,
                   **{k: acc[k] for k in ("tokens", "top1_agreement", "kl_mean", "ppl_ratio", "ppl_quantized",
                                          "ppl_reference")},
                   "passes_weights_bytes": (out / "weights.passes.bin").stat().st_size, "seconds": time.time() - t0}
            rows.append(row)
            print(f"{v:22s} top1 {row['top1_agreement']:.4f}  ppl_ratio {row['ppl_ratio']:.4f}  "
                  f"kl_mean {row['kl_mean']:.5f}  ({row['tokens']} tokens, {row['seconds']:.0f} s)", flush=True)
            shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "load_avg": os.getloadavg(),
              "commit": commit, "command": " ".join(["python", "benchmarks/fp8_accuracy.py", *(argv or sys.argv[1:])]),
              "recipe": args.recipe, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
