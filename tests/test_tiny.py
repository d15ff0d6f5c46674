"""Tiny checkpoints: every TINY_SPECS entry is a valid Hub-layout Qwen3-Next checkpoint that
transformers loads with the same weights as qcn's Checkpoint; determinism, bf16, fp8, CLI."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from qcn.compile.export.checkpoint import expected_tensors, open_checkpoint
from qcn.compile.export.config import load_model_config
from qcn.compile.export.tiny import SPECIAL_TOKENS, TINY_SPECS, main, write_tiny_checkpoint

SPECS = sorted(TINY_SPECS)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_tiny_checkpoint(root / name, spec, seed=0) for name, spec in TINY_SPECS.items()}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_specs_cover_the_variants_the_exporter_must_handle():
    configs = list(TINY_SPECS.values())
    assert len(configs) >= 6 and "default" in TINY_SPECS
    assert {c.num_key_value_heads for c in configs} >= {1, 2}
    assert {c.linear_num_value_heads // c.linear_num_key_heads for c in configs} >= {1, 2}
    assert {c.num_experts_per_tok for c in configs} >= {1, 3}
    assert {c.norm_topk_prob for c in configs} == {True, False}
    assert any(c.mlp_only_layers for c in configs) and any(c.decoder_sparse_step == 2 for c in configs)
    assert any(c.layer_types is not None for c in configs)
    assert any(c.hidden_size in (48, 72) for c in configs)
    assert any(c.head_dim & (c.head_dim - 1) for c in configs)  # not a power of two
    d = TINY_SPECS["default"]
    assert 4 <= d.num_hidden_layers <= 8 and 64 <= d.hidden_size <= 128 and 8 <= d.num_experts <= 16
    assert 2 <= d.num_experts_per_tok <= 4


@pytest.mark.parametrize("name", SPECS)
def test_spec_is_a_valid_checkpoint(written, name, caplog):
    d, spec = written[name], TINY_SPECS[name]
    config = load_model_config(d)
    assert config.vocab_size == spec.vocab_size and config.hidden_size == spec.hidden_size
    assert config.mlp_only_layers == spec.mlp_only_layers
    if spec.layer_types is not None:
        assert config.layer_types == spec.layer_types
        assert "layer_types" in json.loads((d / "config.json").read_text())
    with caplog.at_level(logging.INFO, logger="qcn.compile.export.checkpoint"):
        ck = open_checkpoint(d)
    ck.validate(config)
    assert set(ck.names()) == set(expected_tensors(config))
    assert ck.mtp_names and all(n.startswith("mtp.") for n in ck.mtp_names)
    assert ck.mtp_names == sorted(ck.mtp_names) and "mtp.fc.weight" in ck.mtp_names
    assert ck.shape("mtp.fc.weight") == (spec.hidden_size, 2 * spec.hidden_size)
    assert any("mtp" in r.getMessage() for r in caplog.records)
    # generation_config + special token ids at the end of the vocabulary
    gen = json.loads((d / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (1.0, 0.95, 40)
    assert config.eos_token_id[0] in gen["eos_token_id"]
    assert config.pad_token_id == config.bos_token_id == spec.vocab_size - len(SPECIAL_TOKENS)


def _hf_value(ck, key: str, tied: bool) -> tuple[torch.Tensor, list[str]]:
    """The value transformers should hold for state-dict `key`, and the checkpoint names used."""
    if key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj"):
        prefix, proj = key.rsplit(".", 1)
        experts = sorted({int(n[len(prefix) + 1:].split(".")[0]) for n in ck.names() if n.startswith(prefix + ".")})
        assert experts == list(range(len(experts))) and experts
        parts = ["gate_proj", "up_proj"] if proj == "gate_up_proj" else ["down_proj"]
        used = [f"{prefix}.{e}.{p}.weight" for e in experts for p in parts]
        value = torch.stack([torch.cat([ck.get(f"{prefix}.{e}.{p}.weight") for p in parts]) for e in experts])
        return value, used
    if key == "lm_head.weight" and tied:
        return ck.get("model.embed_tokens.weight"), ["model.embed_tokens.weight"]
    return ck.get(key), [key]


@pytest.mark.parametrize("name", SPECS)
def test_transformers_loads_same_weights(written, name):
    from transformers import Qwen3NextForCausalLM

    d = written[name]
    model, info = Qwen3NextForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    ck = open_checkpoint(d)
    tied = load_model_config(d).tie_word_embeddings
    used: set[str] = set()
    state = model.state_dict()
    for key, param in state.items():
        want, names = _hf_value(ck, key, tied)
        assert param.shape == want.shape, key
        assert torch.equal(param, want), key
        used.update(names)
    assert used == set(ck.names())  # every checkpoint tensor reached the model
    with torch.no_grad():
        logits = model(torch.arange(1, 12)[None]).logits
    assert logits.shape == (1, 11, TINY_SPECS[name].vocab_size)
    assert torch.isfinite(logits).all() and 0.01 < logits.std().item() < 10


def test_default_fits_and_is_sharded(written):
    d = written["default"]
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and sum(p.stat().st_size for p in shards) < 20 * 1024 * 1024
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    ck = open_checkpoint(d)
    total = sum(math.prod(ck.shape(n)) * 4 for n in ck.names() + ck.mtp_names)
    assert index["metadata"]["total_size"] == total
    assert any((written[n] / "model.safetensors").exists() for n in SPECS)  # the single-file layout too


def test_same_seed_gives_identical_bytes(written, tmp_path):
    again = write_tiny_checkpoint(tmp_path / "a", TINY_SPECS["odd"], seed=0)
    assert _files(again) == _files(written["odd"])
    other = write_tiny_checkpoint(tmp_path / "b", TINY_SPECS["odd"], seed=1)
    a, b = _files(again), _files(other)
    assert a["tokenizer.json"] == b["tokenizer.json"]
    shards = [n for n in a if n.endswith(".safetensors")]
    assert shards and all(a[n] != b[n] for n in shards)


def test_bfloat16_round_trip(written, tmp_path):
    d = write_tiny_checkpoint(tmp_path / "bf16", TINY_SPECS["sparse_step2"], dtype="bfloat16")
    config = load_model_config(d)
    assert config.dtype == "bfloat16"
    ck, ref = open_checkpoint(d), open_checkpoint(written["sparse_step2"])
    ck.validate(config)
    assert ck.names() == ref.names()
    for n in ck.names() + ck.mtp_names:
        assert ck.dtype(n) == torch.bfloat16
        assert torch.equal(ck.get_raw(n), ref.get(n).to(torch.bfloat16)), n
        assert torch.equal(ck.get(n), ref.get(n).to(torch.bfloat16).float()), n


def test_fp8_block_checkpoint_dequantizes(written, tmp_path):
    block = 16  # hidden 72 and head sizes 24/40 give ragged edge blocks
    d = write_tiny_checkpoint(tmp_path / "fp8", TINY_SPECS["odd"], fp8_block=block, dtype="bfloat16")
    config = load_model_config(d)
    assert config.quantization is not None and config.quantization.weight_block_size == (block, block)
    assert "model.embed_tokens" in config.quantization.modules_to_not_convert
    ck, ref = open_checkpoint(d), open_checkpoint(written["odd"])
    ck.validate(config)
    assert ck.names() == ref.names() and not any(n.endswith("_scale_inv") for n in ck.names() + ck.mtp_names)
    quantized = [n for n in ck.names() if ck.dtype(n) == torch.float8_e4m3fn]
    assert "model.layers.1.linear_attn.in_proj_qkvz.weight" in quantized
    assert ck.dtype("model.embed_tokens.weight") == torch.bfloat16
    ragged = 0
    for n in quantized:
        out, inp = ck.shape(n)
        scale = ck.get_raw(ck.scale_name(n))
        assert scale.shape == (math.ceil(out / block), math.ceil(inp / block))
        ragged += out % block != 0 or inp % block != 0
        got, want = ck.get(n), ref.get(n)
        assert got.shape == want.shape
        s = scale.repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
        # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormals: absolute <= 2^-10 * scale
        bound = want.abs() * 2**-4 + s * 2**-10 + 1e-12
        assert ((got - want).abs() <= bound).all(), n
        assert not torch.equal(got, want), n  # really quantized
    assert ragged > 0
    for n in ck.names():
        if n not in quantized:
            assert torch.equal(ck.get(n), ref.get(n).to(torch.bfloat16).float()), n


def test_tokenizer_loads_and_round_trips(written):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    d = written["default"]
    config = load_model_config(d)
    tok = AutoTokenizer.from_pretrained(d)
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert len(tok) == config.vocab_size
    specials = [t for t, _ in SPECIAL_TOKENS]
    ids = tok.convert_tokens_to_ids(specials)
    assert ids == list(range(config.vocab_size - len(specials), config.vocab_size))
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == config.eos_token_id[0]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == config.pad_token_id
    for text in ["def f(x):\n    return x + 1  # héllo 世界\n", "import os\n\n\nclass A:\n\tpass", " x  y "]:
        enc = tok.encode(text)
        assert tok.decode(enc) == text
        assert raw.encode(text).ids == enc
        assert len(enc) < len(text.encode())  # merges were learned
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.encode(chat)
    assert enc.count(ids[1]) == 2 and enc.count(ids[2]) == 1


def test_cli_writes_reuses_and_forces(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main([str(out), "--spec", "bias"]) == 0
    assert "wrote" in capsys.readouterr().out
    first = _files(out)
    load_model_config(out)
    assert main([str(out), "--spec", "bias"]) == 0
    assert "reused" in capsys.readouterr().out
    assert main([str(out), "--spec", "bias", "--force"]) == 0
    assert "wrote" in capsys.readouterr().out and _files(out) == first
    assert main([str(out), "--spec", "bias", "--seed", "3"]) == 0  # different spec/seed: rewritten
    assert "wrote" in capsys.readouterr().out and _files(out) != first
    assert not [p for p in tmp_path.iterdir() if p.name != "ck"]  # no temp dirs left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main([str(foreign)]) == 2 and (foreign / "keep.txt").exists()


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ["OUT", "--spec", "--dtype", "--seed", "--force", "--fp8-block", "--shard-max-mb"]:
        assert opt in text
    for name in TINY_SPECS:
        assert name in text


def _before_streaming(d: Path, seed: int, dtype: torch.dtype, fp8_block: int | None) -> dict[str, bytes]:
    """What write_tiny_checkpoint wrote before streaming (commit 20af813): every tensor drawn in
    memory in the same order from one generator, each shard written by safetensors' own
    save_file. Shard file -> bytes, for the shards (and tensor names) of the checkpoint ``d``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qcn.compile.export import tiny

    config = load_model_config(d)
    keep = set(tiny._not_converted(config))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in (expected_tensors(config) | tiny.mtp_tensors(config)).items():
        t = tiny._init(name, shape, g)
        if len(tiny._stored(name, shape, dtype, fp8_block, keep)) == 2:
            tensors.update(zip((name, name + "_scale_inv"), tiny._quantize_fp8(t, fp8_block)))
        else:
            tensors[name] = t.to(dtype).contiguous()
    out, seen = {}, set()
    for shard in sorted(d.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
        seen |= set(names)
        ref = d.parent / f"{d.name}.ref.safetensors"
        save_file({n: tensors[n] for n in names}, str(ref), metadata={"format": "pt"})
        out[shard.name] = ref.read_bytes()
        ref.unlink()
    assert seen == set(tensors)
    return out


def test_streamed_shards_are_byte_identical_to_the_generator_before_streaming(written, tmp_path):
    """The streaming writer (one tensor in memory at a time, SafetensorsWriter) gives the bytes the
    generator wrote before streaming (every tensor in memory, safetensors' save_file), recomputed
    here so the check holds on any machine (hashes recorded at 20af813 differ where torch's random
    draws do): fp32, and bf16 + FP8 block scales over 3 shards."""
    d = written["default"]
    want = _before_streaming(d, 0, torch.float32, None)
    assert {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))} == want and len(want) > 1
    d = write_tiny_checkpoint(tmp_path / "f", TINY_SPECS["odd"], dtype="bfloat16", fp8_block=16,
                              shard_max_bytes=300_000)
    want = _before_streaming(d, 0, torch.bfloat16, 16)
    assert len(want) == 3 and {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))} == want
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(want)


def test_generator_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Every tensor is written to its shard right after it is drawn: at most one drawn tensor
    is alive at any write (a regression to collecting a shard, or the model, fails here)."""
    import weakref

    from qcn.compile.export import checkpoint, tiny

    alive: list[weakref.ref] = []
    real_init, real_write = tiny._init, checkpoint.SafetensorsWriter.write
    most = [0]

    def init(name, shape, g):
        t = real_init(name, shape, g)
        alive.append(weakref.ref(t))
        return t

    def write(self, name, tensor):
        most[0] = max(most[0], sum(r() is not None for r in alive))
        return real_write(self, name, tensor)

    monkeypatch.setattr(tiny, "_init", init)
    monkeypatch.setattr(checkpoint.SafetensorsWriter, "write", write)
    write_tiny_checkpoint(tmp_path / "c", TINY_SPECS["default"], shard_max_bytes=4 << 20)
    assert len(alive) > 100 and most[0] <= 1
