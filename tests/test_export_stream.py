"""Streaming export (issue #17) and the NaN/Inf check (issue #16): weights.bin is written one
tensor -- one expert of a stacked expert tensor -- at a time, byte-identical to the export
before streaming; a weight holding NaN/Inf is refused with its name and leaves no artifact."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from qcn.compile.export import weights, weights_file
from qcn.compile.export.checkpoint import CheckpointError, open_checkpoint
from qcn.compile.export.config import load_model_config
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
from qcn.compile.export.weights import weight_specs
from qcn.compile.export.weights_file import ALIGNMENT, NonFiniteWeightError, WeightsWriter
from qcn.compile.pipeline import compile_recipe
from qcn.compile.recipe import ExportOptions, Recipe, RecipeError, RuntimeOptions, load_recipe

# Recorded with the export of commit 20af813 (main before streaming: each weight materialised
# whole, experts stacked with torch.stack), TINY_SPECS["default"], seed 0, fp32 checkpoint,
# max_context 256. weights.bin: sha256 of the file. Graphs: sha256 of the sorted initializer
# table [name, data_type, dims, location, offset, length] -- the part of prefill.onnx /
# decode.onnx that the weight streaming writes (the rest of the graph belongs to modeling and
# the op bodies, which other changes may legitimately alter). At 20af813 the whole graph files
# were identical too (checked when streaming landed).
RECORDED = {
    "float32": {
        "weights.bin": "f21890dfae968ec4c4a804f35f2bd7ab0bac82cee5cca1780dc481c8b59ef205",
        "prefill.onnx": "1d01a4934b61418a7e6a1528b51fef94e43c0043a91dc3e1a58694e59e780139",
        "decode.onnx": "73dc65f61f9357e10b63cbc4448d8a8501ce3c90d5867effd2edeca16058cc6c",
    },
    "bfloat16": {
        "weights.bin": "729fe98d7259971ec50af6a74049bbc21dd1f6ca3817101e7e27a3c6ebda0ed2",
        "prefill.onnx": "ce3d41b445da9a76626205f6433041416677e63c7d24a7f7272d02170ffb1bf7",
        "decode.onnx": "34b82114b8e88daa2ef36d5c372e527c5386c1194a484f363232b5967ed57083",
    },
}
SPEC = "default"
BAD = "model.layers.1.mlp.experts.5.up_proj.weight"  # layer 1 is MoE in the default spec


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_SPECS[SPEC], seed=0)


def _recipe(ckpt: Path, out: Path, **export) -> Recipe:
    if export.get("activation_dtype") == "bfloat16":  # bf16 state: a GPU target's export stage
        return Recipe(name="stream", checkpoint=ckpt, output=out, target="h100", export=ExportOptions(**export),
                      runtime=RuntimeOptions(backend="tensorrt", max_batch=1, max_context=256))
    return Recipe(name="stream", checkpoint=ckpt, output=out, export=ExportOptions(**export),
                  runtime=RuntimeOptions(max_context=256))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _initializer_table(path: Path) -> str:
    m = onnx.load(str(path), load_external_data=False)
    rows = []
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        rows.append([t.name, t.data_type, list(t.dims), ext.get("location"), int(ext.get("offset", 0)),
                     int(ext.get("length", 0))])
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


@pytest.mark.parametrize("act", sorted(RECORDED))
def test_weights_byte_identical_to_the_export_before_streaming(ckpt, tmp_path, act):
    out = compile_recipe(_recipe(ckpt, tmp_path / "a", activation_dtype=act))
    assert _sha(out / "weights.bin") == RECORDED[act]["weights.bin"]
    for graph in ("prefill.onnx", "decode.onnx"):
        assert _initializer_table(out / graph) == RECORDED[act][graph], graph


def test_stacked_experts_are_written_expert_by_expert(ckpt, tmp_path, monkeypatch):
    """No chunk handed to the writer is larger than one expert's slice (a regression to
    materialising [E, 2I, H] whole fails here), transposed weights go in row blocks, and every
    tensor starts 64-byte aligned."""
    monkeypatch.setattr(weights, "BLOCK_BYTES", 40_000)  # tiny model: make lm_head's row blocks visible
    seen: dict[str, list[tuple[int, ...]]] = {}
    real_write = WeightsWriter.write

    def spy(self, name, chunks):
        chunks = [chunks] if isinstance(chunks, torch.Tensor) else chunks

        def record():
            for item in chunks:
                seen.setdefault(name, []).append(tuple((item[1] if isinstance(item, tuple) else item).shape))
                yield item
        return real_write(self, name, record())

    monkeypatch.setattr(WeightsWriter, "write", spy)
    out = compile_recipe(_recipe(ckpt, tmp_path / "a"))
    cfg = load_model_config(ckpt)
    E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert seen["layers.0.experts_gate_up"] == [(I, H)] * (2 * E)  # gate_e, up_e as stored: no copy
    assert seen["layers.0.experts_down"] == [(H, I)] * E
    assert seen["embed_tokens"] == [(cfg.vocab_size, H)]
    lm_rows = weights.BLOCK_BYTES // (cfg.vocab_size * 4)  # lm_head [H, V] is a transpose: row blocks
    assert seen["lm_head"] == [(lm_rows, cfg.vocab_size)] * (H // lm_rows) + \
        ([(H % lm_rows, cfg.vocab_size)] if H % lm_rows else [])
    proto = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    ext = [{e.key: e.value for e in t.external_data} for t in proto.graph.initializer]
    offsets = [int(e.get("offset", 0)) for e in ext if e.get("location") == "weights.bin"]
    assert len(offsets) > 100 and all(o % ALIGNMENT == 0 for o in offsets)


def test_chunks_concatenate_to_load(ckpt):
    """The streamed pieces are exactly the whole tensor `load` gives (what eager tests run)."""
    cfg, ck = load_model_config(ckpt), open_checkpoint(ckpt)
    for spec in weight_specs(cfg):
        if spec.stacked or spec.name in ("embed_tokens", "layers.0.in_proj_qkvz", "layers.3.o_proj",
                                         "layers.0.shared_gate_up"):
            whole = spec.load(ck, torch.bfloat16)
            by_group: dict[tuple[str, ...], list[torch.Tensor]] = {}
            for group, part in spec.chunks(ck, torch.bfloat16):
                assert part.is_contiguous()
                by_group.setdefault(group, []).append(part.reshape(-1))
            assert list(by_group) == spec.source_groups()
            slices = [torch.cat(v) for v in by_group.values()]
            assert whole.shape == spec.shape
            assert torch.equal(torch.stack(slices) if spec.stacked else slices[0], whole.reshape(len(slices), -1)
                               if spec.stacked else whole.reshape(-1)), spec.name


def _poison(ckpt: Path, tmp_path: Path, value: float) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    for f in ckpt.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / index["weight_map"][BAD]
    tensors = load_file(str(shard))
    tensors[BAD][3, 7] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_nonfinite_weight_is_refused_naming_it_and_leaves_nothing(ckpt, tmp_path, value):
    bad = _poison(ckpt, tmp_path, value)
    out = tmp_path / "out" / "artifact"
    out.parent.mkdir()
    with pytest.raises(NonFiniteWeightError) as e:
        compile_recipe(_recipe(bad, out))
    msg = str(e.value)
    assert BAD in msg and "layers.1.experts_gate_up" in msg and "allow_nonfinite" in msg
    assert ("1 NaN" if value != value else "1 Inf") in msg
    assert isinstance(e.value, CheckpointError)  # the CLIs' one-line error path
    assert list(out.parent.iterdir()) == []  # no artifact, no temporary directory


def test_allow_nonfinite_exports_and_warns(ckpt, tmp_path, caplog):
    bad = _poison(ckpt, tmp_path, float("nan"))
    with caplog.at_level(logging.WARNING, logger="qcn.compile.export.onnx_export"):
        out = compile_recipe(_recipe(bad, tmp_path / "a", allow_nonfinite=True))
    assert (out / "weights.bin").is_file()
    assert any("layers.1.experts_gate_up" in r.getMessage() and "1 NaN" in r.getMessage() for r in caplog.records)


def test_cli_refuses_nonfinite_in_one_line(ckpt, tmp_path, capsys):
    from qcn.compile.cli import main

    bad = _poison(ckpt, tmp_path, float("nan"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\ncheckpoint: {bad}\noutput: {tmp_path / 'o'}\ntarget: cpu\n"
                      "runtime:\n  max_context: 256\n")
    assert main([str(recipe), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and BAD in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value, ok", [(True, True), (False, True), ("yes", False), (1, False)])
def test_recipe_allow_nonfinite_is_a_boolean(tmp_path, value, ok):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\ncheckpoint: c\noutput: o\ntarget: cpu\nexport:\n  allow_nonfinite: {json.dumps(value)}\n")
    if ok:
        assert load_recipe(recipe).export.allow_nonfinite is value
    else:
        with pytest.raises(RecipeError, match="export.allow_nonfinite"):
            load_recipe(recipe)


def test_weights_writer_locations_alignment_and_chunks(tmp_path):
    a = torch.arange(10, dtype=torch.float32)
    b = torch.randn(3, 5).to(torch.bfloat16)
    with WeightsWriter(tmp_path / "w.bin") as w:
        la = w.write("a", a)
        lb = w.write("b", ((("x",), b[:1].contiguous()), (("y",), b[1:].contiguous())))
        le = w.write("empty", torch.zeros(0))
        with pytest.raises(ValueError, match="already written"):
            w.write("a", a)
    raw = (tmp_path / "w.bin").read_bytes()
    assert (la.offset, la.length) == (0, 40) and lb.offset == 64 and lb.length == 30 and le.offset == 128
    assert raw[:40] == a.numpy().tobytes() and raw[64:94] == b.view(torch.uint16).numpy().tobytes()
    assert w.bytes_written == 70 and w.locations["b"] == lb and la.location == "w.bin"
    with pytest.raises(FileExistsError):  # never appends to (or overwrites) an existing file
        WeightsWriter(tmp_path / "w.bin")


def test_weights_writer_names_the_source_of_the_bad_chunk(tmp_path):
    good, bad = torch.ones(4, 4), torch.ones(4, 4)
    bad[2, 1] = float("inf")
    with WeightsWriter(tmp_path / "w.bin") as w, pytest.raises(NonFiniteWeightError) as e:
        w.write("stack", iter([(("src.0",), good), (("src.1",), bad)]))
    assert "stack" in str(e.value) and "src.1" in str(e.value) and "[2, 1]" in str(e.value)
    assert "src.0" not in str(e.value)
    assert weights_file._nonfinite(torch.ones(3, dtype=torch.bfloat16)) is None


def test_transposed_weight_is_copied_in_row_blocks_equal_to_the_whole(ckpt, monkeypatch):
    monkeypatch.setattr(weights, "BLOCK_BYTES", 30_000)
    cfg, ck = load_model_config(ckpt), open_checkpoint(ckpt)
    spec = next(s for s in weight_specs(cfg) if s.name == "lm_head")
    parts = [c for _, c in spec.chunks(ck, torch.float32)]
    assert len(parts) > 1 and all(p.is_contiguous() and p.numel() * 4 <= 30_000 for p in parts)
    assert torch.equal(torch.cat(parts), ck.get("lm_head.weight").T)
