"""Streaming export (issue #17) and the NaN/Inf check (issue #16): weights.bin is written one
tensor -- one expert of a stacked expert tensor -- at a time, byte-identical to the export
before streaming; a weight holding NaN/Inf is refused with its name and leaves no artifact."""

from __future__ import annotations

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
from qcn.compile.export.modeling import rope_tables
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
from qcn.compile.export.weights import weight_specs
from qcn.compile.export.weights_file import ALIGNMENT, NonFiniteWeightError, WeightsWriter
from qcn.compile.pipeline import compile_recipe
from qcn.compile.recipe import ExportOptions, Recipe, RecipeError, RuntimeOptions, load_recipe

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


def _initializer_table(path: Path) -> dict[str, tuple]:
    """The external-data initializers: name -> (data_type, dims, location, offset, length)."""
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if ext.get("location") is None:  # a small constant the graph optimizer folded, stored inline
            continue
        out[t.name] = (t.data_type, tuple(t.dims), ext.get("location"), int(ext.get("offset", 0)),
                       int(ext.get("length", 0)))
    return out


def _whole(spec, ck, dtype: torch.dtype) -> torch.Tensor:
    """The export before streaming (commit 20af813): each weight materialised whole from fp32
    sources, experts stacked with torch.stack, then cast."""
    dtype = torch.float32 if spec.fp32 else dtype
    parts = [spec.transform([ck.get(s, dtype=torch.float32) for s in g]).to(dtype) for g in spec.source_groups()]
    return (torch.stack(parts) if spec.stacked else parts[0]).contiguous()


@pytest.mark.parametrize("act", ["float32", "bfloat16"])
def test_weights_byte_identical_to_the_export_before_streaming(ckpt, tmp_path, act):
    """Every initializer's bytes in weights.bin equal the whole-tensor computation the export did
    before streaming (recomputed here, so the check holds on any machine: hashes pinned on one
    machine's checkpoint bytes did not), tensors do not overlap, and both graphs read the same bytes."""
    out = compile_recipe(_recipe(ckpt, tmp_path / "a", activation_dtype=act))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[act]
    cfg, ck = load_model_config(ckpt), open_checkpoint(ckpt)
    specs = {s.name: s for s in weight_specs(cfg)}
    table = _initializer_table(out / "prefill.onnx")
    decode = _initializer_table(out / "decode.onnx")
    assert {n: decode[n] for n in decode} == {n: table[n] for n in decode}
    blob = (out / "weights.bin").read_bytes()
    rope = rope_tables(cfg).inv_freq.float().contiguous()
    checked, end = 0, 0
    for name, (_, dims, location, offset, length) in sorted(table.items(), key=lambda kv: kv[1][3]):
        assert location == "weights.bin" and offset % ALIGNMENT == 0 and offset >= end, name
        end = offset + length
        want = rope if name == "rope_inv_freq" else _whole(specs[name], ck, dtype)
        assert tuple(want.shape) == dims, name
        assert blob[offset:end] == want.view(torch.uint8).numpy().tobytes(), name
        checked += 1
    assert checked == len(table) and "rope_inv_freq" in table and end <= len(blob)
    seen = {blob[o:o + n] for _, _, _, o, n in table.values()}
    for name in sorted(set(specs) - set(table)):  # equal small tensors (a constant dt_bias) the optimizer merged
        assert _whole(specs[name], ck, dtype).view(torch.uint8).numpy().tobytes() in seen, name


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
