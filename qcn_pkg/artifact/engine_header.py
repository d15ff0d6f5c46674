"""What can be read from a serialized TensorRT-RTX engine without a GPU: its 64-byte header.

Nothing can deserialize an engine without a GPU (docs/FINDINGS.md; `Runtime.get_engine_validity`
also needs one). The header layout below was read off engines that tensorrt_rtx 1.7.1 built
here (SM75..SM121, one and two compute capabilities); it is not a documented format, so a
header we cannot parse is reported as "unknown", never as a broken engine:

  bytes 0-3   b"vtrt"          magic
  bytes 16-23 uint64 LE        total size of the serialized engine
  bytes 24-26 major.minor.patch of the TensorRT-RTX that built it
  bytes 32-35 uint32 LE        compute-capability mask: SM75 1, SM80 2, SM86 4, SM89 8, SM120 16, SM121 32
Full TensorRT engines use another header (not parsed: no full TensorRT here).
This is the only copy: the build stage records it (manifest ``build.engine_header``, the same
three fields) and the TensorRT backend checks an engine file against it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"vtrt"
HEADER_BYTES = 64
CC_BITS = {"7.5": 1, "8.0": 2, "8.6": 4, "8.9": 8, "12.0": 16, "12.1": 32}

__all__ = ["MAGIC", "HEADER_BYTES", "CC_BITS", "EngineHeader", "parse_header"]


@dataclass(frozen=True)
class EngineHeader:
    size: int
    version: str  # "1.7.1"
    compute_capabilities: tuple[str, ...]  # ("8.9", "12.0")

    def to_dict(self) -> dict:
        return {"size": self.size, "version": self.version, "compute_capabilities": list(self.compute_capabilities)}


def parse_header(data: bytes) -> EngineHeader | None:
    """The header of an RTX engine, or None when `data` does not start like one."""
    if len(data) < HEADER_BYTES or data[:4] != MAGIC:
        return None
    size = struct.unpack_from("<Q", data, 16)[0]
    major, minor, patch = data[24], data[25], data[26]
    mask = struct.unpack_from("<I", data, 32)[0]
    ccs = tuple(cc for cc, bit in CC_BITS.items() if mask & bit)
    return EngineHeader(size=size, version=f"{major}.{minor}.{patch}", compute_capabilities=ccs)
