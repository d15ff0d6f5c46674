"""The GPU architecture table (compile/build/targets.py) is the one source of per-architecture
facts: every recipe target's compute capability has a row, TensorRT-RTX's enum has exactly the
rows with a header bit, and the engine-header readers decode with the table's bits."""

from __future__ import annotations

import pytest

from qcn.compile.build import targets as T
from qcn.compile.recipe import RTX_COMPUTE_CAPABILITIES, TARGET_TABLE


def test_every_gpu_target_has_a_row_and_rtx_targets_have_header_bits():
    for t in TARGET_TABLE.values():
        if t.is_gpu:
            row = T.BY_CC[t.compute_capability]
            if t.module == "tensorrt_rtx":
                assert row.rtx_bit is not None, t.name
            else:
                assert row.aot, f"{t.name}: full-TensorRT targets embed AOT kernels for their cc"
    assert RTX_COMPUTE_CAPABILITIES == tuple(T.RTX_CC_BITS)
    bits = list(T.RTX_CC_BITS.values())
    assert len(set(bits)) == len(bits) and all(b & (b - 1) == 0 for b in bits)  # one distinct bit each


def test_rtx_enum_matches_the_table():
    trt = pytest.importorskip("tensorrt_rtx")
    enum = {n for n in dir(trt.ComputeCapability) if n.startswith("SM")}
    assert enum == {"SM" + cc.replace(".", "") for cc in T.RTX_CC_BITS}


def test_engine_header_reader_uses_the_table_bits():
    """qcn.artifact reads engine headers for compile and runtime alike (it cannot import compile):
    its bits must be the GPU table's."""
    import struct

    from qcn.artifact.engine_header import CC_BITS, parse_header

    assert CC_BITS == T.RTX_CC_BITS
    mask = T.RTX_CC_BITS["8.9"] | T.RTX_CC_BITS["12.0"]
    data = bytearray(64)
    data[:4] = b"vtrt"
    struct.pack_into("<Q", data, 16, 64)
    data[24:27] = bytes([1, 7, 1])
    struct.pack_into("<I", data, 32, mask)
    assert parse_header(bytes(data)).compute_capabilities == ("8.9", "12.0")


def test_unknown_cc_is_a_clear_error():
    with pytest.raises(ValueError, match=r"compute capability 95 is not in the GPU table .* known: \[75, 80"):
        T.arch(95)


def test_every_op_folder_has_the_same_files_and_a_registry_row():
    from pathlib import Path

    from qcn.compile.plugins import registry

    root = Path(registry.__file__).parent
    folders = {p.name for p in root.iterdir() if p.is_dir() and (p / "op.py").is_file()}
    assert folders == {e.package for e in registry.OPS}  # every op folder is a registry row
    for e in registry.OPS:
        d = root / e.package
        for f in ("__init__.py", "op.py", "reference.py", "launch.py", "aot.py", "trt_plugin.py"):
            assert (d / f).is_file(), f"{d}/{f}"
        assert not (d / "ops.py").exists()
        assert e.export.name == e.name and e.lowering.root_op == e.name
