"""Write qcn-pico's held-out calibration text: recipes/calibration/pico_heldout.txt.

The held-out split of the qcn-pico corpus (tools/pico/corpus.py: stdlib files whose path hash
is 0 mod 32; the model never trained on them), whole files in the order of sha256(path) (a
mix of modules, not the alphabetical run of the split), each followed by <|endoftext|> as in
training, until MAX_BYTES. Quantized pico recipes calibrate on its first tokens and gate on
the next ones (compile/passes/quant/calibrate.py, accuracy.py).

    python tools/pico/heldout_text.py [OUT]
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pico.corpus import manifest_digest, split, stdlib_files  # noqa: E402

MAX_BYTES = 200_000
EOT = "<|endoftext|>"
OUT = Path(__file__).resolve().parents[2] / "recipes" / "calibration" / "pico_heldout.txt"


def heldout_text(max_bytes: int = MAX_BYTES) -> tuple[str, list[str], str]:
    """(text, file paths used, corpus digest)."""
    files = stdlib_files()
    held = sorted(split(files)["heldout"], key=lambda f: hashlib.sha256(f.rel.encode()).digest())
    parts, used, size = [], [], 0
    for f in held:
        piece = f.text + EOT
        if size + len(piece.encode()) > max_bytes:
            continue
        parts.append(piece)
        used.append(f.rel)
        size += len(piece.encode())
    return "".join(parts), used, manifest_digest(files)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    text, used, digest = heldout_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}: {len(used)} held-out files, {len(text.encode())} bytes (corpus {digest[:16]})")
    for rel in used:
        print(f"  {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
