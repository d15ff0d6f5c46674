#!/usr/bin/env python
"""Train qcn-pico and write it to models/qcn-pico (see that folder's README.md).

    python tools/train_pico.py                      # every stage, resuming whatever is done
    python tools/train_pico.py --stage base --max-minutes 60
    python tools/train_pico.py --stage export       # evaluate + write models/qcn-pico

Stages: prepare (corpus split, BPE, token streams) -> base (the LM) -> mtp (the MTP head on
the frozen LM) -> export (held-out metrics, samples, bf16 safetensors, model card).
Work files (resumable checkpoints, logs) live in --work (default build/pico).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pico import data, train  # noqa: E402
from pico.config import PicoConfig  # noqa: E402

STAGES = ("prepare", "base", "mtp", "export")
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("all",) + STAGES, default="all")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "pico")
    p.add_argument("--out", type=Path, default=ROOT / "models" / "qcn-pico")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop a training stage after this long (it saves; run again to continue)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = PicoConfig()
    a.work.mkdir(parents=True, exist_ok=True)
    stages = STAGES if a.stage == "all" else (a.stage,)
    for stage in stages:
        if stage == "prepare":
            summary = data.prepare(a.work, cfg.model.vocab_size)
            print(f"corpus: {summary['train']['tokens']:,} train / {summary['heldout']['tokens']:,} held-out tokens")
        elif stage == "base":
            r = train.train_base(a.work, cfg, a.max_minutes)
            print(f"base: step {r['step']}/{cfg.train.steps}, {r['elapsed_s'] / 60:.1f} min trained")
            if not r["done"]:
                return 0
        elif stage == "mtp":
            r = train.train_mtp(a.work, cfg, a.max_minutes)
            print(f"mtp: step {r['step']}/{cfg.train.mtp_steps}")
            if not r["done"]:
                return 0
        elif stage == "export":
            from pico import export
            out = export.export(a.work, cfg, a.out)
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
