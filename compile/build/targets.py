"""The GPU architecture table: one row per compute capability qcn builds for, carrying every fact
about it that the build, the AOT kernels and the engine header need. A new GPU architecture is
one row here (a new product is one row in recipe.TARGET_TABLE naming its compute capability).

  cc            "8.9"
  ptx_target    the PTX .target Triton emits for it ("sm_90a": the arch-specific variant)
  smem_bytes    max dynamic shared memory per block (the opt-in limit; CUDA programming guide,
                "Features and Technical Specifications")
  rtx_bit       the compute capability's bit in a TensorRT-RTX engine header's mask (measured on
                tensorrt_rtx 1.7.1 engines); None: TensorRT-RTX cannot build for it
  aot           the Triton kernels are compiled ahead of time for it (full-TensorRT plugins)
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024


@dataclass(frozen=True)
class GpuArch:
    cc: str
    ptx_target: str
    smem_bytes: int
    rtx_bit: int | None
    aot: bool

    @property
    def sm(self) -> int:
        major, minor = self.cc.split(".")
        return int(major) * 10 + int(minor)


ARCHS: tuple[GpuArch, ...] = (
    GpuArch("7.5", "sm_75", 64 * KIB, 1, False),
    GpuArch("8.0", "sm_80", 163 * KIB, 2, True),
    GpuArch("8.6", "sm_86", 99 * KIB, 4, False),
    GpuArch("8.7", "sm_87", 163 * KIB, None, False),
    GpuArch("8.9", "sm_89", 99 * KIB, 8, True),
    GpuArch("9.0", "sm_90a", 227 * KIB, None, True),
    GpuArch("10.0", "sm_100a", 227 * KIB, None, False),
    GpuArch("12.0", "sm_120a", 99 * KIB, 16, True),
    GpuArch("12.1", "sm_121a", 99 * KIB, 32, False),
)
BY_CC = {a.cc: a for a in ARCHS}
BY_SM = {a.sm: a for a in ARCHS}

#: compute capabilities tensorrt_rtx can build for (its ComputeCapability enum)
RTX_COMPUTE_CAPABILITIES = tuple(a.cc for a in ARCHS if a.rtx_bit is not None)
#: TensorRT-RTX engine-header compute-capability bits
RTX_CC_BITS = {a.cc: a.rtx_bit for a in ARCHS if a.rtx_bit is not None}
#: compute capabilities (ints) the AOT kernels are compiled for
AOT_TARGETS = tuple(a.sm for a in ARCHS if a.aot)


def arch(sm: int) -> GpuArch:
    """The row for compute capability ``sm`` (e.g. 89); a clear error for one qcn does not know."""
    try:
        return BY_SM[int(sm)]
    except KeyError:
        raise ValueError(f"compute capability {sm} is not in the GPU table (compile/build/targets.py); "
                         f"known: {sorted(BY_SM)}") from None


def smem_limit(sm: int) -> int:
    return arch(sm).smem_bytes
