"""The build stage with real TensorRT-RTX engines, built CPU-only for SM89 and SM120 from the
smallest tiny model, and the tensorrt runtime backend's checks that need no GPU.

No GPU here: engines are built but never deserialized or run (nothing can deserialize an
engine without a GPU). The manifest is checked against the network the engine was built from
and against the engine's own header (size, TensorRT-RTX version, compute capabilities)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import onnx
import pytest

pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the [test] extra) to build engines")
import tensorrt_rtx  # noqa: E402

from qcn.compile.artifacts import sha256_file  # noqa: E402
from qcn.compile.build import trt as trtb  # noqa: E402
from qcn.artifact import parse_header  # noqa: E402
from qcn.compile.build.stage import OnnxMismatchError, build_stage  # noqa: E402
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint  # noqa: E402
from qcn.compile.pipeline import run_pipeline  # noqa: E402
from qcn.compile.recipe import ExportOptions, RuntimeOptions, load_recipe  # noqa: E402
from qcn.runtime.backends import get_backend_class  # noqa: E402
from qcn.runtime.backends.tensorrt import (binding_plan, buffer_sizes, check_profile, select_profile,  # noqa: E402
                                           verify_engine)
from qcn.runtime.errors import ArtifactError, BackendError  # noqa: E402
from qcn.runtime.manifest import load_manifest  # noqa: E402

SPEC = "sparse_step2"
BUILD_LIMIT_S = 60  # a build slower than this is a regression worth looking at
TIMINGS: dict[str, float] = {}


def _tiny_recipe(ckpt: Path, out: Path, **build):
    r = load_recipe("recipes/tiny_rtx.yaml", checkpoint=ckpt, output=out)
    return dataclasses.replace(r, runtime=RuntimeOptions(backend="tensorrt", prefill_chunk=16, max_batch=2, max_context=256),
                               build=dataclasses.replace(r.build, **build))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_SPECS[SPEC], seed=3)


@pytest.fixture(scope="module")
def built(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "tiny_rtx"
    recipe = _tiny_recipe(ckpt, out)
    t0 = time.perf_counter()
    result = run_pipeline(recipe)
    TIMINGS["pipeline SM89+SM120"] = time.perf_counter() - t0
    m = json.loads((out / "manifest.json").read_text())
    TIMINGS["engine build SM89+SM120"] = m["build"]["build_seconds"]
    return recipe, result, m


def test_pipeline_builds_one_engine_for_sm89_and_sm120(built):
    recipe, result, m = built
    assert result.ran == ["export", "passes", "build"] and result.output == recipe.output
    assert m["build"]["build_seconds"] < BUILD_LIMIT_S, f"engine build took {m['build']['build_seconds']}s"
    engine = (recipe.output / "model.engine").read_bytes()
    header = parse_header(engine)
    assert header.compute_capabilities == ("8.9", "12.0")
    assert header.size == len(engine) == m["build"]["engine_bytes"]
    assert tensorrt_rtx.__version__.startswith(header.version)
    b = m["build"]
    assert (b["module"], b["module_version"], b["target"]) == ("tensorrt_rtx", tensorrt_rtx.__version__, "rtx_sm89")
    assert b["plugins"] == [] and b["profile_mode"] == "single" and b["runtime_cache"] == "model.runtime_cache"
    # the builder's layer report: an unquantized fp32 model has fp32 GEMMs only (tests/test_engine_layers.py: FP8/INT4)
    layers = json.loads((recipe.output / b["layers"]["file"]).read_text())["layers"]
    assert b["layers"]["count"] == len(layers) and set(b["layers"]["gemms"]) == {"float32"}, b["layers"]
    assert (m["stage"], m["runtime"]["backend"]) == ("build", "tensorrt")
    assert sorted(m["files"]) == sorted(p.name for p in recipe.output.iterdir() if p.name != "manifest.json")
    for name, digest in m["files"].items():
        assert sha256_file(recipe.output / name) == digest
    onnx_dir = result.dirs["passes"]
    assert b["onnx"]["sha256"] == sha256_file(onnx_dir / "prefill.onnx")


def test_manifest_io_is_the_engines_io(built):
    """I/O read back from the network the engine was built from (names, dtypes, ranks, static
    dims) equals the manifest's graphs; profile shapes cover the recipe's limits."""
    recipe, result, m = built
    io = m["build"]["io"]
    proto = onnx.load(str(result.dirs["passes"] / "prefill.onnx"), load_external_data=False)
    assert [t["name"] for t in io["inputs"]] == [i.name for i in proto.graph.input]
    for graph in ("prefill", "decode"):
        g = m["graphs"][graph]
        assert g["file"] == "model.engine"
        for kind in ("inputs", "outputs"):
            assert [t["name"] for t in io[kind]] == [t["name"] for t in g[kind]]
            for net, man in zip(io[kind], g[kind]):
                assert net["dtype"] == man["dtype"]
                for dn, dm in zip(net["shape"], man["shape"]):
                    assert dn == -1 if not isinstance(dm, int) or graph == "decode" and dn == -1 else dn == dm
    (prof,) = m["build"]["profiles"]
    assert prof["graphs"] == ["prefill", "decode"]
    assert prof["shapes"]["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [2, 16]}
    kv = next(s for s in m["state"] if s["kind"] == "key")
    assert prof["shapes"][kv["input"]]["max"] == [2, kv["shape"][0], 256, kv["shape"][2]]


def test_rebuild_skips_unchanged_stages_and_redoes_only_build(built, ckpt):
    recipe, _, _ = built
    again = run_pipeline(recipe)
    assert again.skipped == ["export", "passes", "build"] and again.ran == []
    sm120 = dataclasses.replace(recipe, target="rtx_sm120",
                                build=dataclasses.replace(recipe.build, compute_capabilities=("12.0",)))
    t0 = time.perf_counter()
    r = run_pipeline(sm120)
    TIMINGS["rebuild SM120 only"] = time.perf_counter() - t0
    assert r.ran == ["build"] and r.skipped == ["export", "passes"]
    assert parse_header((recipe.output / "model.engine").read_bytes()).compute_capabilities == ("12.0",)


def test_onnx_from_another_recipe_or_missing(built, tmp_path):
    recipe, result, _ = built
    other = dataclasses.replace(recipe, export=ExportOptions(activation_dtype="float16"), output=tmp_path / "o")
    with pytest.raises(OnnxMismatchError, match=r"was exported by recipe 'tiny_rtx' with .*float32.*needs .*float16"):
        build_stage(other, result.dirs["passes"], tmp_path / "o")
    broken = tmp_path / "onnx"
    shutil.copytree(result.dirs["passes"], broken)
    (broken / "prefill.onnx").unlink()
    with pytest.raises(OnnxMismatchError, match=r"prefill.onnx: missing"):
        build_stage(recipe, broken, tmp_path / "o")
    with pytest.raises(OnnxMismatchError, match=r"no manifest.json; run the passes stage first"):
        build_stage(recipe, tmp_path / "nothing", tmp_path / "o")
    with pytest.raises(OnnxMismatchError, match=r"stage 'export'; the build stage reads a passes directory"):
        build_stage(recipe, result.dirs["export"], tmp_path / "o")  # build parses only what passes wrote
    assert not (tmp_path / "o").exists()


def test_profile_naming_an_input_that_does_not_exist(built, tmp_path, monkeypatch):
    recipe, result, _ = built
    real = trtb.make_profiles

    def bad(*a, **k):
        p = real(*a, **k)[0]
        return [dataclasses.replace(p, shapes=dict(p.shapes, past_keys=((1,), (1,), (1,))))]

    monkeypatch.setattr(trtb, "make_profiles", bad)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "manifest.json").write_text("{\"old\": 1}")
    with pytest.raises(trtb.BuildError, match=r"names input\(s\) \['past_keys'\] that the network does not have; "
                                              r"the network's inputs are \['input_ids', 'past_len', 'conv_state.0'"):
        build_stage(recipe, result.dirs["passes"], tmp_path / "o")
    assert json.loads((tmp_path / "o" / "manifest.json").read_text()) == {"old": 1}  # old artifact kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_parser_errors_name_the_node_and_op(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="my_node", domain="qcn.nowhere")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("qcn.nowhere", 1)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(trtb.BuildError, match=r"node 'my_node' \(op 'Frobnicate'"):
        trtb.NetworkFromOnnxPath(tensorrt_rtx, tmp_path / "bad.onnx")()


# -- runtime backend: everything that needs no GPU --------------------------------------


def test_runtime_refuses_truncated_foreign_and_mismatched_engines(built, tmp_path):
    recipe, _, _ = built
    art = tmp_path / "art"
    shutil.copytree(recipe.output, art)
    m = load_manifest(art)
    info = verify_engine(m, tensorrt_rtx.__version__)
    assert select_profile(info, "decode").name == "all"
    with pytest.raises(ArtifactError, match=r"built with tensorrt_rtx 1\.7\.1\.116, installed is 1\.8\.0"):
        verify_engine(m, "1.8.0")
    data = (art / "model.engine").read_bytes()
    with pytest.raises(ArtifactError, match=r"bytes, the manifest says \d+ \(truncated\)"):
        verify_engine(m, None, data[: len(data) // 2])
    foreign = bytearray(data)
    foreign[25] = 8  # header version 1.8.1
    raw = json.loads((art / "manifest.json").read_text())
    raw["build"]["engine_sha256"] = None
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=r"header .*'version': '1\.8\.1'.* does not match manifest"):
        verify_engine(load_manifest(art, verify_hashes=False), None, bytes(foreign))
    raw["build"]["engine_sha256"] = m.raw["build"]["engine_sha256"]
    del raw["build"]["graph_profile"]["decode"]
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=r"build.graph_profile has no profile for graph 'decode'"):
        verify_engine(load_manifest(art, verify_hashes=False), None)


def test_runtime_plans_without_a_gpu(built):
    recipe, _, _ = built
    m = load_manifest(recipe.output)
    info = verify_engine(m, tensorrt_rtx.__version__)
    prof = select_profile(info, "prefill")
    plan = binding_plan(m, "decode", batch=2, tokens=1, past=256)
    check_profile(prof, {b.name: b.shape for b in plan if b.role in ("input_ids", "past_len", "state_in", "cache_in")})
    with pytest.raises(BackendError, match=r"'input_ids' shape \[1, 17\] is outside optimization profile 'all'"):
        check_profile(prof, {"input_ids": (1, 17)})
    roles = {b.name: b.role for b in plan}
    for s in m.state:
        assert roles[s.input] == ("state_in" if s.carried else "cache_in")
        assert roles[s.output] == ("state_out" if s.carried else "cache_new")
    sizes = buffer_sizes(m)
    rec = next(s for s in m.state if s.kind == "recurrent_state")
    assert sizes[f"{rec.input}.a"] == sizes[f"{rec.input}.b"] == 2 * 4 * rec.shape[0] * rec.shape[1] * rec.shape[2]
    key = next(s for s in m.state if s.kind == "key")
    assert sizes[key.input] == 2 * key.shape[0] * 256 * key.shape[2] * 4  # slots x KVH x max_context x D x fp32
    assert sizes[f"{key.output}.staging"] == 2 * key.shape[0] * 16 * key.shape[2] * 4  # only new tokens
    assert get_backend_class("tensorrt").__name__ == "TensorRTBackend"


def test_loading_needs_a_gpu(built):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: see docs/BUILD.md for the GPU run")
    from qcn.runtime import load

    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        load(built[0].output)


def test_build_seconds_in_the_manifest_are_the_builds(built, record_property):
    """The manifest's build_seconds is the builder's own time: positive and inside the wall time of
    the pipeline run that produced it (timings are recorded, not gated: see benchmarks/)."""
    _, _, m = built
    b = m["build"]["build_seconds"]
    assert 0 < b <= TIMINGS["pipeline SM89+SM120"], (b, TIMINGS)
    record_property("build_timings_s", {k: round(v, 2) for k, v in TIMINGS.items()})
