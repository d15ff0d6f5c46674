"""qcn.artifact: the one reader and writer of manifest.json, versioning, dtype names, hashing,
the engine header. The fixture artifact (conftest `art`) is itself written through it."""

import dataclasses
import hashlib
import json
import os
import struct

import numpy as np
import onnx
import pytest

from qcn import artifact
from qcn.artifact import manifest as mf
from qcn.artifact import (DTYPES, FORMAT_VERSION, ArtifactError, dtype, from_onnx, from_ort, from_trt, hash_files,
                          manifest_from_json, manifest_to_json, numpy_dtype, parse_header, read_manifest,
                          sha256_file, sha256_json, write_manifest)


def _raw(art_copy) -> dict:
    return json.loads((art_copy.path / "manifest.json").read_text())


def _save(art_copy, raw) -> None:
    (art_copy.path / "manifest.json").write_text(json.dumps(raw))


def test_round_trip_write_then_read(art_copy, tmp_path):
    m = read_manifest(art_copy.path)
    assert manifest_from_json(manifest_to_json(m)) == m
    assert manifest_to_json(m) == _raw(art_copy)  # the fixture was written by the same writer
    key = next(s for s in m.state if s.kind == "key")
    assert key.shape[1] == m.model.max_context  # resolved when read ...
    assert next(s for s in manifest_to_json(m)["state"] if s["kind"] == "key")["shape"][1] == "max_context"  # ... the symbol when written
    passes = artifact.PassesSection(run=("fold",), not_run={"fuse": "no plugin"}, counts={"fold": {"prefill": {"matched": 2}}})
    changed = dataclasses.replace(m, runtime=dataclasses.replace(m.runtime, max_batch=3), stage="passes", passes=passes)
    write_manifest(art_copy.path, changed)
    again = read_manifest(art_copy.path)
    assert again == changed and again.runtime.max_batch == 3 and again.passes.counts["fold"]["prefill"]["matched"] == 2
    assert again.artifact_dir == art_copy.path and again.raw["runtime"]["max_batch"] == 3


def test_passes_section(art_copy):
    raw = _raw(art_copy)
    raw.update(stage="passes", passes=[])  # how format_version 1 wrote it before the section existed
    _save(art_copy, raw)
    m = read_manifest(art_copy.path)
    assert m.passes == artifact.PassesSection(run=()) and manifest_to_json(m)["passes"] == {"run": [], "not_run": {}, "counts": {}}
    del raw["passes"]
    _save(art_copy, raw)
    with pytest.raises(ArtifactError, match=r"key 'passes': missing \(a passes-stage manifest"):
        read_manifest(art_copy.path)
    raw["passes"] = {"run": ["fold"], "report": "passes_report.json"}
    _save(art_copy, raw)
    with pytest.raises(ArtifactError, match=r"key 'passes.report': 'passes_report.json' is not listed in 'files'"):
        read_manifest(art_copy.path)


def test_read_manifest_is_frozen_and_typed(art):
    m = read_manifest(art.path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.runtime.max_batch = 9
    with pytest.raises(TypeError):
        m.files["weights.bin"] = "0" * 64
    assert isinstance(m.graph("decode"), artifact.GraphSpec) and m.graph("decode").name == "decode"
    assert m.tokenizer.eos_token_ids == art.eos_token_ids and m.build is None and m.passes is None


@pytest.mark.parametrize("where", [(), ("model",), ("graphs", "prefill"), ("tokenizer",)])
def test_unknown_key_refused(art_copy, where):
    raw = _raw(art_copy)
    obj = raw
    for k in where:
        obj = obj[k]
    obj["surprise"] = 1
    _save(art_copy, raw)
    key = ".".join((*where, "surprise"))
    with pytest.raises(ArtifactError, match=rf"key '{key}': unknown key \(a \w+ has: "):
        read_manifest(art_copy.path)


def test_wrong_type_names_key_and_expectation(art_copy):
    raw = _raw(art_copy)
    raw["runtime"]["max_batch"] = True  # JSON true is not an integer
    _save(art_copy, raw)
    with pytest.raises(ArtifactError, match=r"key 'runtime.max_batch': must be a positive integer, got True"):
        read_manifest(art_copy.path)


def test_newer_version_refused_naming_both(art_copy):
    raw = _raw(art_copy)
    raw["format_version"] = FORMAT_VERSION + 1
    _save(art_copy, raw)
    with pytest.raises(ArtifactError) as e:
        read_manifest(art_copy.path)
    msg = str(e.value)
    assert f"format_version {FORMAT_VERSION + 1}, newer than this qcn" in msg
    assert f"supports format_version {FORMAT_VERSION}" in msg and "upgrade qcn" in msg


def test_current_version_read_and_older_upgraded(art_copy, monkeypatch):
    assert read_manifest(art_copy.path).format_version == FORMAT_VERSION == 1
    # a made-up format change: version 2 stores max_batch + 1; UPGRADES[1] converts a version-1 dict
    monkeypatch.setattr(mf, "FORMAT_VERSION", 2)
    monkeypatch.setattr(mf, "UPGRADES", {1: lambda d: dict(d, runtime={**d["runtime"], "max_batch": d["runtime"]["max_batch"] + 1})})
    m = read_manifest(art_copy.path)  # written as version 1
    assert m.format_version == 2 and m.runtime.max_batch == art_copy.manifest["runtime"]["max_batch"] + 1
    assert mf.supported_versions() == (1, 2)
    raw = _raw(art_copy)
    raw["format_version"] = 0
    _save(art_copy, raw)
    with pytest.raises(ArtifactError, match=r"format_version 0, older than this qcn, which supports format_version 1 to 2"):
        read_manifest(art_copy.path)
    monkeypatch.setattr(mf, "UPGRADES", {})  # version 2 only: version 1 is now too old
    raw["format_version"] = 1
    _save(art_copy, raw)
    with pytest.raises(ArtifactError, match=r"format_version 1, older than this qcn, which supports format_version 2:"):
        read_manifest(art_copy.path)


def test_writer_refuses_what_the_reader_would_refuse(art_copy):
    m = read_manifest(art_copy.path)
    before = (art_copy.path / "manifest.json").read_bytes()
    bad_state = (dataclasses.replace(m.state[0], kind="hidden_state"),) + m.state[1:]
    with pytest.raises(ArtifactError, match=r"key 'state\[0\].kind': must be one of conv_state"):
        write_manifest(art_copy.path, dataclasses.replace(m, state=bad_state))
    missing = dict(m.files, **{"extra.bin": "0" * 64})
    with pytest.raises(ArtifactError, match=r"extra\.bin: listed in manifest.json but missing"):
        write_manifest(art_copy.path, dataclasses.replace(m, files=missing))
    assert (art_copy.path / "manifest.json").read_bytes() == before


def test_hash_helpers(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, (1 << 22) + 17, dtype=np.uint8).tobytes()  # crosses the chunk size
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "manifest.json").write_text("{}")
    os.mkdir(tmp_path / "sub")
    assert sha256_file(tmp_path / "a.bin") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "a.bin", chunk=1000) == hashlib.sha256(data).hexdigest()
    assert hash_files(tmp_path) == {"a.bin": hashlib.sha256(data).hexdigest(), "b.txt": hashlib.sha256(b"b").hexdigest()}
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1}) != sha256_json({"a": 1, "b": [2, 1]})


def test_dtype_table_agrees_with_the_libraries():
    import torch

    for name, d in DTYPES.items():
        assert d.onnx in onnx.TensorProto.DataType.values() and from_onnx(d.onnx) == name
        assert onnx.helper.tensor_dtype_to_np_dtype(d.onnx).itemsize == d.itemsize
        assert getattr(torch, d.torch).itemsize == d.itemsize
        assert from_ort(d.ort) == name
        if d.numpy is not None:
            assert numpy_dtype(name) == np.dtype(d.numpy) == onnx.helper.tensor_dtype_to_np_dtype(d.onnx)
        if d.trt is not None:
            assert from_trt(d.trt) == name
    assert DTYPES["float32"].onnx == onnx.TensorProto.FLOAT and DTYPES["bfloat16"].onnx == onnx.TensorProto.BFLOAT16
    with pytest.raises(ArtifactError, match=r"state 'x': dtype 'bfloat16' has no numpy equivalent"):
        numpy_dtype("bfloat16", "state 'x'")
    with pytest.raises(ArtifactError, match=r"unknown dtype 'float31'; known: float32, float16"):
        dtype("float31")


def test_dtype_trt_names_exist_in_tensorrt():
    trt = pytest.importorskip("tensorrt_rtx")
    for d in DTYPES.values():
        if d.trt is not None:
            assert hasattr(trt.DataType, d.trt), d


def test_engine_header():
    head = bytearray(64)
    head[:4] = b"vtrt"
    struct.pack_into("<Q", head, 16, 12345)
    head[24:27] = bytes([1, 7, 1])
    struct.pack_into("<I", head, 32, 8 | 16)
    h = parse_header(bytes(head) + b"rest")
    assert (h.size, h.version, h.compute_capabilities) == (12345, "1.7.1", ("8.9", "12.0"))
    assert parse_header(b"ftrt" + bytes(head[4:])) is None and parse_header(bytes(head[:63])) is None
