"""qcn-compile end to end: manifest contents, atomic artifacts, and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import onnx
import pytest
import yaml

from qcn.compile import cli
from qcn.compile.artifacts import sha256_file
from qcn.compile.export.config import CheckpointError
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
from qcn.compile.pipeline import compile_recipe
from qcn.compile.recipe import Recipe, RecipeError, RuntimeOptions, load_recipe

SPEC = "sparse_step2"  # the smallest tiny config: compiles in a few seconds


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_SPECS[SPEC], seed=1,
                                 shard_max_bytes=60_000)


@pytest.fixture(scope="module")
def artifact(sharded_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny"
    return compile_recipe(Recipe(name="t", checkpoint=sharded_ckpt, output=out,
                                 runtime=RuntimeOptions(max_context=256)))


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def _no_leftovers(out: Path):
    assert not out.exists(), f"{out} was left behind"
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}", ".qcn-"))], "temp dir left behind"


def test_manifest_describes_the_artifact(artifact, sharded_ckpt):
    m = json.loads((artifact / "manifest.json").read_text())
    assert (m["format"], m["format_version"], m["stage"]) == ("qcn-artifact", 1, "export")
    assert sorted(m["files"]) == sorted(p.name for p in artifact.iterdir() if p.name != "manifest.json")
    for name, digest in m["files"].items():
        assert sha256_file(artifact / name) == digest
    assert m["checkpoint"]["mtp_tensors"] and all(t.startswith("mtp.") for t in m["checkpoint"]["mtp_tensors"])
    assert m["generation"] == {"temperature": 1.0, "top_p": 0.95, "top_k": 40}
    special = m["tokenizer"]["special_tokens"]
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<|fim_prefix|>"} <= set(special)
    assert special["<|im_end|>"] in m["tokenizer"]["eos_token_ids"]
    cfg = json.loads((sharded_ckpt / "config.json").read_text())
    assert len(m["state"]) == 2 * cfg["num_hidden_layers"]
    for graph in ("prefill", "decode"):
        proto = onnx.load(str(artifact / m["graphs"][graph]["file"]), load_external_data=False)
        names = [i.name for i in proto.graph.input]
        assert names == [i["name"] for i in m["graphs"][graph]["inputs"]]
        assert names == ["input_ids", "past_len"] + [s["input"] for s in m["state"]]
        ops = {(n.domain, n.op_type) for n in proto.graph.node}
        assert {("qcn", "GatedDeltaNet"), ("qcn", "MoE"), ("qcn", "CachedAttention")} <= ops
        assert {f.name for f in proto.functions} == {"GatedDeltaNet", "MoE", "CachedAttention"}
        # one external weights file shared by both graphs, nothing large inline
        assert {e.value for i in proto.graph.initializer for e in i.external_data if e.key == "location"} == {"weights.bin"}
    decode_ids = m["graphs"]["decode"]["inputs"][0]
    prefill_ids = m["graphs"]["prefill"]["inputs"][0]
    assert decode_ids["shape"] == ["batch", 1] and prefill_ids["shape"] == ["batch", "tokens"]


def test_weights_are_written_once(artifact, sharded_ckpt):
    size = (artifact / "weights.bin").stat().st_size
    ckpt_bytes = sum(f.stat().st_size for f in sharded_ckpt.glob("*.safetensors"))
    assert size < ckpt_bytes * 1.2, (size, ckpt_bytes)  # not twice (prefill + decode)


def test_missing_shard(sharded_ckpt, tmp_path):
    ckpt = _copy(sharded_ckpt, tmp_path)
    shards = sorted(ckpt.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=shards[1].name):
        compile_recipe(Recipe(name="t", checkpoint=ckpt, output=out, runtime=RuntimeOptions(max_context=256)))
    _no_leftovers(out)


def test_wrong_tensor_shape(sharded_ckpt, tmp_path):
    ckpt = _copy(sharded_ckpt, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["hidden_size"] += 8  # every hidden-sized tensor is now the wrong shape
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight: expected \[700, 56\], found \[700, 48\]"):
        compile_recipe(Recipe(name="t", checkpoint=ckpt, output=out, runtime=RuntimeOptions(max_context=256)))
    _no_leftovers(out)


def test_truncated_safetensors(sharded_ckpt, tmp_path):
    ckpt = _copy(sharded_ckpt, tmp_path)
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=shard.name):
        compile_recipe(Recipe(name="t", checkpoint=ckpt, output=out, runtime=RuntimeOptions(max_context=256)))
    _no_leftovers(out)


def test_failure_during_export_leaves_nothing_and_keeps_the_old_artifact(sharded_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    old = {"format": "qcn-artifact", "old": True}  # only a qcn artifact may be replaced
    (out / "manifest.json").write_text(json.dumps(old))

    def explode(*args, **kwargs):
        (args[3] / "prefill.onnx").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr("qcn.compile.pipeline.export_graphs", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        compile_recipe(Recipe(name="t", checkpoint=sharded_ckpt, output=out, runtime=RuntimeOptions(max_context=256)))
    assert json.loads((out / "manifest.json").read_text()) == old
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_context_longer_than_the_model(sharded_ckpt, tmp_path):
    with pytest.raises(RecipeError, match="max_context 100000 exceeds .* max_position_embeddings 4096"):
        compile_recipe(Recipe(name="t", checkpoint=sharded_ckpt, output=tmp_path / "o",
                              runtime=RuntimeOptions(max_context=100000)))


def _write_recipe(tmp_path, **changes) -> Path:
    data = yaml.safe_load(Path("recipes/tiny_cpu.yaml").read_text())
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_recipe_loads():
    r = load_recipe("recipes/tiny_cpu.yaml")
    assert (r.target, r.runtime.backend, r.export.activation_dtype) == ("cpu", "onnxruntime", "float32")
    assert dataclasses.is_dataclass(r) and r.__dataclass_params__.frozen


@pytest.mark.parametrize("change,message", [
    ({"export.optimise": True}, r"export: unknown key\(s\) \['optimise'\]; valid keys: \['activation_dtype', 'allow_nonfinite', 'logits', 'opset'\]"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]; valid keys: \[.*'checkpoint'"),
    ({"export.logits": "some"}, r"export.logits: 'some' is not valid; choose one of \['last', 'all'\]"),
    ({"target": "h1000"}, r"target: 'h1000' is not valid; choose one of \['cpu', 'h100', 'h200', 'a100'"),
    ({"target": "h100"}, r"runtime.backend: 'onnxruntime' is not valid; choose one of \['tensorrt'\]"),
    ({"quantization": {"experts": "int3"}}, r"quantization.experts: 'int3' is not valid; choose one of \['none', 'fp8', 'int4', 'fp4'\]"),
    ({"build": {"optimization_level": 5}}, r"build: target 'cpu' runs the ONNX graphs with onnxruntime and has no build settings"),
    ({"runtime.prefill_chunk": 0}, r"runtime.prefill_chunk: 0 is out of range; must be >= 1"),
    ({"generation.top_p": 1.5}, r"generation.top_p: 1.5 is out of range"),
    ({"runtime.max_batch": "four"}, r"runtime.max_batch: expected an integer, got 'four'"),
])
def test_bad_recipes(tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write_recipe(tmp_path, **change))


def test_missing_recipe_lists_the_available_ones():
    with pytest.raises(RecipeError, match=r"does not exist; recipes in recipes: \[.*'tiny_cpu.yaml'"):
        load_recipe("recipes/nope.yaml")


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert cli.main([str(_write_recipe(tmp_path, colour="red"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qcn-compile: error:") and "colour" in err and "Traceback" not in err


def test_cli_compiles(sharded_ckpt, tmp_path, capsys):
    recipe = _write_recipe(tmp_path, **{"runtime.max_context": 256})
    assert cli.main([str(recipe), "--checkpoint", str(sharded_ckpt), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert (tmp_path / "a" / "manifest.json").is_file()
    assert "wrote" in capsys.readouterr().out
