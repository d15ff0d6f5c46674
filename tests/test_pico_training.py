"""tools/pico: the corpus split rule, the lr schedule, resumable training, the MTP tensor layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pico import corpus, train
from pico.config import PicoConfig, TrainConfig
from pico.model import MTPHead, build_model, mtp_checkpoint_tensors
from qcn.compile.export.checkpoint import layer_tensors
from qcn.compile.export.config import load_model_config
from qcn.compile.export.tiny import TINY_SPECS, config_dict

SMALL = dataclasses.replace(TINY_SPECS["default"], vocab_size=512, num_hidden_layers=4)


def test_split_rule_is_the_documented_hash_and_holds_out_about_one_in_32():
    import hashlib
    rels = [f"pkg{i}/mod{i}.py" for i in range(4000)]
    held = [r for r in rels if corpus.split_of(r) == "heldout"]
    for r in rels[:200]:
        h = int.from_bytes(hashlib.sha256(r.encode()).digest()[:4], "big")
        assert corpus.split_of(r) == ("heldout" if h % 32 == 0 else "train")
    assert 0.02 < len(held) / len(rels) < 0.045


def test_stdlib_corpus_split_is_disjoint_and_skips_site_packages():
    files = corpus.stdlib_files()
    parts = corpus.split(files)
    train_rel = {f.rel for f in parts["train"]}
    held_rel = {f.rel for f in parts["heldout"]}
    assert held_rel and train_rel and not train_rel & held_rel
    assert not any(r.startswith("site-packages/") for r in train_rel | held_rel)
    assert len(train_rel) + len(held_rel) == len(files)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [train.lr_at(s, 1.0, 10, 100, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def _work(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20_000), ("heldout", 3_000)):
        rng.integers(0, SMALL.vocab_size - 22, n).astype(np.uint16).tofile(tmp_path / f"{split}.u16")
    return tmp_path


def _cfg(steps: int, mtp_steps: int = 2) -> PicoConfig:
    return PicoConfig(model=SMALL, train=TrainConfig(
        steps=steps, mtp_steps=mtp_steps, batch_size=2, seq_len=32, warmup_steps=2, checkpoint_every=1,
        eval_every=2, eval_windows=2, mtp_warmup_steps=1, autocast_bf16=False))


def test_stopped_and_resumed_training_equals_one_uninterrupted_run(tmp_path):
    _work(tmp_path / "a")
    _work(tmp_path / "b")
    cfg = _cfg(steps=4)
    train.train_base(tmp_path / "a", cfg)
    train.train_base(tmp_path / "b", cfg, max_minutes=0.0)  # stops after one step, saved
    assert torch.load(tmp_path / "b" / "base.pt", weights_only=False)["step"] == 1
    train.train_base(tmp_path / "b", cfg)  # resumes at step 1
    sa = torch.load(tmp_path / "a" / "base.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "base.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 4
    # CPU kernels on 2 threads are not bitwise reproducible: two uninterrupted runs differ by
    # ~2e-5. A lost or repeated step moves weights by ~lr = 2e-3, far outside 1e-4 (checked below).
    for k, v in sa["model"].items():
        torch.testing.assert_close(sb["model"][k], v, rtol=0, atol=1e-4, msg=k)
    _work(tmp_path / "c")
    train.train_base(tmp_path / "c", _cfg(steps=4), max_minutes=0.0)
    sc = torch.load(tmp_path / "c" / "base.pt", weights_only=False)["model"]
    assert max((sc[k] - v).abs().max().item() for k, v in sa["model"].items()) > 1e-3
    with pytest.raises(ValueError, match="config digest"):
        train.train_base(tmp_path / "b", _cfg(steps=5))


def test_mtp_trains_on_a_frozen_model_and_leaves_it_untouched(tmp_path):
    work = _work(tmp_path / "w")
    cfg = _cfg(steps=2, mtp_steps=3)
    train.train_base(work, cfg)
    before = torch.load(work / "base.pt", weights_only=False)["model"]
    r = train.train_mtp(work, cfg)
    assert r["done"] and r["step"] == 3
    after = torch.load(work / "base.pt", weights_only=False)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len((work / "mtp_log.jsonl").read_text().splitlines()) == 3


def test_mtp_tensors_have_the_hub_names_and_shapes(tmp_path):
    model = build_model(SMALL, 0, 0.001)
    mtp = MTPHead(model.config)
    got = {k: tuple(v.shape) for k, v in mtp_checkpoint_tensors(mtp, SMALL.num_experts).items()}
    (tmp_path / "config.json").write_text(__import__("json").dumps(config_dict(SMALL)))
    config = load_model_config(tmp_path)
    H = SMALL.hidden_size
    want = {"mtp.fc.weight": (H, 2 * H), "mtp.norm.weight": (H,), "mtp.pre_fc_norm_embedding.weight": (H,),
            "mtp.pre_fc_norm_hidden.weight": (H,)} | layer_tensors(config, "mtp.layers.0.", "full_attention", True)
    assert got == want
    # per-expert split is the inverse of transformers' fused layout: gate rows then up rows
    fused = mtp.layers[0].mlp.experts.gate_up_proj
    I = SMALL.moe_intermediate_size
    t = mtp_checkpoint_tensors(mtp, SMALL.num_experts)
    torch.testing.assert_close(t["mtp.layers.0.mlp.experts.3.up_proj.weight"], fused[3, I:].detach())
