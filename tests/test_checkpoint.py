"""config.json parsing and validation, lazy checkpoint reading, and the errors a broken
checkpoint gives (each names the file / key / tensor at fault)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcn.compile.export.checkpoint import SafetensorsWriter, expected_tensors, open_checkpoint
from qcn.compile.export.config import CheckpointError, ModelConfig, load_model_config
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ck")


@pytest.fixture(scope="module")
def sharded(root) -> Path:
    """'odd' spec in several shards."""
    return write_tiny_checkpoint(root / "sharded", TINY_SPECS["odd"], shard_max_bytes=400_000)


@pytest.fixture(scope="module")
def single(root) -> Path:
    return write_tiny_checkpoint(root / "single", TINY_SPECS["sparse_step2"], shard_max_bytes=1 << 30)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


_DELETE = object()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("name", sorted(TINY_SPECS))
def test_config_matches_transformers(root, name):
    from transformers import Qwen3NextConfig

    d = write_tiny_checkpoint(root / f"cfg-{name}", TINY_SPECS[name])
    c, hf = load_model_config(d), Qwen3NextConfig.from_pretrained(d)
    assert c.layer_types == tuple(hf.layer_types)
    for f in dataclasses.fields(ModelConfig):
        if hasattr(hf, f.name) and f.name not in ("layer_types", "mlp_only_layers", "eos_token_id", "architectures", "dtype"):
            assert getattr(c, f.name) == getattr(hf, f.name), f.name
    assert c.rope_theta == hf.rope_parameters["rope_theta"]
    assert c.partial_rotary_factor == hf.rope_parameters["partial_rotary_factor"]
    for i in range(c.num_hidden_layers):  # transformers' decoder-layer rule
        hf_moe = i not in hf.mlp_only_layers and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0
        assert c.is_moe_layer(i) == hf_moe
    assert c.linear_layers + c.attention_layers and sorted(c.linear_layers + c.attention_layers) == list(range(c.num_hidden_layers))
    assert c.key_dim == hf.linear_num_key_heads * hf.linear_key_head_dim
    assert c.value_dim == hf.linear_num_value_heads * hf.linear_value_head_dim
    assert c.conv_dim == 2 * c.key_dim + c.value_dim


def test_layer_types_derived_from_interval(single):
    d = single
    c = load_model_config(d)
    assert "layer_types" not in c.raw and c.raw["full_attention_interval"] == 2
    assert c.layer_types == ("linear_attention", "full_attention") * 2
    assert c.attention_layers == (1, 3) and c.linear_layers == (0, 2)
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, True]  # decoder_sparse_step 2


def test_config_is_frozen_and_raw_read_only(single):
    c = load_model_config(single)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 1
    with pytest.raises(TypeError):
        c.raw["hidden_size"] = 1
    assert c.raw["hidden_size"] == c.hidden_size and c.eos_token_id == (c.raw["eos_token_id"],)
    assert c.quantization is None and c.architectures == ("Qwen3NextForCausalLM",)


@pytest.mark.parametrize("changes, key, found, valid", [
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]},
     "layer_types", "sliding_attention", "full_attention"),
    ({"layer_types": ["linear_attention", "full_attention"]}, "layer_types", "2 entries", "4"),
    ({"linear_num_key_heads": 3}, "linear_num_value_heads", "2", "multiple of linear_num_key_heads (3)"),
    ({"num_key_value_heads": 3}, "num_attention_heads", "4", "multiple of num_key_value_heads"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok", "9", "at most num_experts (5)"),
    ({"hidden_act": "gelu"}, "hidden_act", "gelu", "silu"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architectures", "LlamaForCausalLM",
     "Qwen3NextForCausalLM"),
    ({"hidden_size": _DELETE}, "hidden_size", "<missing>", "required"),
    ({"head_dim": "64"}, "head_dim", "'64'", "integer"),
    ({"mlp_only_layers": [7]}, "mlp_only_layers", "[7]", "[0, 4)"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method", "awq", "fp8"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
     "quantization_config.weight_block_size", "[128]", "two positive integers"),
])
def test_bad_config_names_file_key_found_and_valid(single, tmp_path, changes, key, found, valid):
    d = _copy(single, tmp_path / "bad")
    _edit_config(d, **changes)
    with pytest.raises(CheckpointError) as e:
        load_model_config(d)
    msg = str(e.value)
    assert str(d / "config.json") in msg and repr(key) in msg and found in msg and valid in msg, msg
    assert isinstance(e.value, ValueError)


def test_fp8_quantization_config_parsed(single, tmp_path):
    d = _copy(single, tmp_path / "q")
    _edit_config(d, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 64], "modules_to_not_convert": ["lm_head"]})
    q = load_model_config(d).quantization
    assert (q.quant_method, q.weight_block_size, q.activation_scheme, q.modules_to_not_convert) == (
        "fp8", (128, 64), "dynamic", ("lm_head",))


def test_missing_config_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_model_config(tmp_path)


# ---------------------------------------------------------------- checkpoint


def test_expected_tensors_layout(sharded):
    c = load_model_config(sharded)
    exp = expected_tensors(c)
    H = c.hidden_size
    assert exp["model.layers.1.linear_attn.in_proj_qkvz.weight"] == (2 * c.key_dim + 2 * c.value_dim, H)
    assert exp["model.layers.1.linear_attn.conv1d.weight"] == (c.conv_dim, 1, c.linear_conv_kernel_dim)
    assert exp["model.layers.0.self_attn.q_proj.weight"] == (2 * c.num_attention_heads * c.head_dim, H)
    assert exp["model.layers.0.mlp.experts.5.down_proj.weight"] == (H, c.moe_intermediate_size)
    assert "model.layers.0.mlp.experts.6.down_proj.weight" not in exp
    assert exp["lm_head.weight"] == (c.vocab_size, H)
    assert not any(n.startswith("mtp.") for n in exp)


def test_open_reads_headers_and_get_loads_one_tensor(sharded):
    ck = open_checkpoint(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    assert sorted(ck.names() + ck.mtp_names) == sorted(index)
    name = "model.layers.2.linear_attn.A_log"
    assert ck.info(name).file.name == index[name] and ck.dtype(name) == torch.float32
    t = ck.get(name)
    assert t.shape == ck.shape(name) == (2,) and t.dtype == torch.float32
    assert torch.equal(t, load_file(sharded / index[name])[name])
    assert ck.get(name, dtype=torch.float16).dtype == torch.float16
    assert ck.get("mtp.fc.weight").shape == ck.shape("mtp.fc.weight")
    with pytest.raises(CheckpointError, match="no tensor"):
        ck.get("model.layers.99.foo")


def test_missing_shard_is_named(sharded, tmp_path):
    d = _copy(sharded, tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    held = [n for n, f in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].items()
            if f == shard.name]
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(d)
    msg = str(e.value)
    assert shard.name in msg and sorted(held)[0] in msg


def test_no_weights_at_all(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [4, 100, -50])
def test_truncated_shard_is_named(sharded, tmp_path, keep):
    d = _copy(sharded, tmp_path / "t")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(d)
    assert str(shard) in str(e.value) and "truncated" in str(e.value)


def test_wrong_shape_missing_and_unexpected_listed(single, tmp_path):
    d = _copy(single, tmp_path / "w")
    f = d / "model.safetensors"
    tensors = load_file(f)
    bad = "model.layers.0.linear_attn.out_proj.weight"
    want = tuple(tensors[bad].shape)
    tensors[bad] = torch.zeros(want[0], want[1] + 1)
    gone = tensors.pop("model.norm.weight")
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(f), metadata={"format": "pt"})
    ck = open_checkpoint(d)
    with pytest.raises(CheckpointError) as e:
        ck.validate(load_model_config(d))
    msg = str(e.value)
    assert f"{bad}: expected [{want[0]}, {want[1]}], found [{want[0]}, {want[1] + 1}]" in msg
    assert f"model.norm.weight: expected [{gone.shape[0]}], missing" in msg
    assert "model.layers.0.extra.weight: unexpected" in msg
    assert "3 problems" in msg


def test_index_pointing_at_wrong_shard(sharded, tmp_path):
    d = _copy(sharded, tmp_path / "i")
    idx_file = d / "model.safetensors.index.json"
    idx = json.loads(idx_file.read_text())
    files = sorted(set(idx["weight_map"].values()))
    name = next(n for n, f in idx["weight_map"].items() if f == files[0])
    idx["weight_map"][name] = files[1]
    idx_file.write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(d)
    assert files[1] in str(e.value) and name in str(e.value)


def test_mtp_tensors_kept_aside_not_dropped(single):
    ck = open_checkpoint(single)
    on_disk = load_file(single / "model.safetensors")
    mtp = sorted(n for n in on_disk if n.startswith("mtp."))
    assert mtp and ck.mtp_names == mtp
    assert not set(ck.names()) & set(mtp)
    assert set(ck.names()) | set(mtp) == set(on_disk)


def test_fp8_scale_shape_checked(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "f", TINY_SPECS["sparse_step2"], fp8_block=16)
    f = d / "model.safetensors"
    tensors = load_file(f)
    s = "model.layers.0.linear_attn.out_proj.weight_scale_inv"
    tensors[s] = torch.ones(tensors[s].shape[0] + 1, tensors[s].shape[1])
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(d)
    assert s in str(e.value) and "expected" in str(e.value)


def test_transformers_save_pretrained_output_is_accepted(single, tmp_path):
    """save_pretrained writes per-expert tensors, 'dtype' and 'rope_parameters': still valid."""
    from transformers import Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM.from_pretrained(single, dtype=torch.float32)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    assert "rope_parameters" in raw
    c = load_model_config(out)
    assert c.rope_theta == load_model_config(single).rope_theta
    ck, ref = open_checkpoint(out), open_checkpoint(single)
    ck.validate(c)
    assert ck.names() == ref.names() and not ck.mtp_names
    for n in ck.names():
        assert torch.equal(ck.get(n), ref.get(n)), n


def _st_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"z.w": torch.randn(3, 5, generator=g), "a.w": torch.randn(7, generator=g).to(torch.bfloat16),
            "m.scale": torch.randn(2, 2, generator=g), "b.w": torch.randn(4, 3, generator=g).to(torch.float8_e4m3fn),
            "h": torch.randn(6, generator=g).to(torch.float16), "empty": torch.zeros(0, 4),
            "a.v": torch.randn(1, generator=g).to(torch.bfloat16)}


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_safetensors_writer_is_byte_identical_to_save_file(tmp_path, metadata):
    """Tensors written one at a time, in any order, give save_file's exact bytes (and the
    checkpoint reader reads them back)."""
    tensors = _st_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    with SafetensorsWriter(tmp_path / "model.safetensors", layout, metadata=metadata) as w:
        for name in reversed(list(tensors)):
            w.write(name, tensors[name])
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(back[n].view(torch.uint8), t.view(torch.uint8)) for n, t in tensors.items())


def test_safetensors_writer_refuses_mismatch_and_missing_tensors(tmp_path):
    layout = {"a": (torch.float32, (2, 3)), "b": (torch.bfloat16, (4,))}
    w = SafetensorsWriter(tmp_path / "x.safetensors", layout)
    with pytest.raises(ValueError, match=r"tensor a: layout says torch.float32 \[2, 3\]"):
        w.write("a", torch.zeros(3, 2))
    w.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"1 tensors never written: \['b'\]"):
        w.close()
    with pytest.raises(ValueError, match="dtype"):
        SafetensorsWriter(tmp_path / "y.safetensors", {"i": (torch.int64, (1,))})
