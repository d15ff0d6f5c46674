"""Write the trained qcn-pico to a Hugging Face checkpoint directory with its model card.

Layout: config.json (the Hub-style keys `qcn-tiny-checkpoint` writes), generation_config.json,
model.safetensors (bf16; main model in the Hub per-expert layout, plus `mtp.*`), tokenizer.json,
tokenizer_config.json (Qwen special tokens, chat template), eval.json, README.md.
Everything is measured on the files as written (bf16 weights, loaded back with
`Qwen3NextForCausalLM.from_pretrained` and computed in fp32). Written to a temporary sibling,
then renamed into place (`qcn.compile.artifacts.atomic_dir`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qcn.compile.artifacts import atomic_dir
from qcn.compile.export.tiny import config_dict, write_tokenizer

from . import data, evaluate
from .card import render_card
from .config import PicoConfig
from .model import MTPHead, mtp_checkpoint_tensors
from .train import load_base, load_mtp

logger = logging.getLogger(__name__)

# End prompts with the newline: Qwen's pre-tokenizer joins "):" and the newline into one token,
# so a prompt that stops at "):" asks for a continuation of a token never followed by a newline
# in training. The last prompt shows that effect.
SAMPLE_PROMPTS = ("def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n",
                  "import os\n\n\ndef list_python_files(root):\n", "def fibonacci(n):")


def load_mtp_from_checkpoint(ckpt: Path, model) -> MTPHead:
    """The MTPHead from a checkpoint's `mtp.*` tensors (Hub per-expert layout -> fused experts)."""
    mtp = MTPHead(model.config)
    E = model.config.num_experts
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        t = {k[len("mtp."):]: f.get_tensor(k).float() for k in f.keys() if k.startswith("mtp.")}
    state = {}
    for k in mtp.state_dict():
        if k.endswith("mlp.experts.gate_up_proj"):
            b = k[: -len("gate_up_proj")]
            state[k] = torch.stack([torch.cat([t.pop(f"{b}{e}.gate_proj.weight"), t.pop(f"{b}{e}.up_proj.weight")])
                                    for e in range(E)])
        elif k.endswith("mlp.experts.down_proj"):
            b = k[: -len("down_proj")]
            state[k] = torch.stack([t.pop(f"{b}{e}.down_proj.weight") for e in range(E)])
        else:
            state[k] = t.pop(k)
    if t:
        raise ValueError(f"{ckpt}: unexpected mtp tensors {sorted(t)[:5]}")
    mtp.load_state_dict(state, strict=True)
    return mtp.eval()


def export(work: Path, cfg: PicoConfig, out: Path, *, max_eval_windows: int | None = None) -> Path:
    from tokenizers import Tokenizer
    from tqdm import tqdm
    from transformers import Qwen3NextForCausalLM

    torch.set_num_threads(cfg.train.threads)
    summary = json.loads((work / "data.json").read_text())
    model, base_state = load_base(work, cfg)
    mtp = load_mtp(work, cfg, model)
    spec = cfg.model
    # out is a checkpoint (no qcn manifest): replace it only if it already is one of this layout
    previous_pico = (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    with atomic_dir(out, force=previous_pico) as tmp:
        model.config.output_router_logits = False
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tensors = {}
        with safe_open(str(tmp / "model.safetensors"), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        tensors |= {k: v.to(torch.bfloat16) for k, v in mtp_checkpoint_tensors(mtp, spec.num_experts).items()}
        save_file(dict(sorted(tensors.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict(spec, dtype="bfloat16"), indent=2) + "\n")
        special = config_dict(spec)  # bos/eos/pad ids
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": special["bos_token_id"], "do_sample": True,
            "eos_token_id": [special["eos_token_id"], special["pad_token_id"]], "pad_token_id": special["pad_token_id"],
            "temperature": 1.0, "top_k": 40, "top_p": 0.95}, indent=2) + "\n")
        write_tokenizer(tmp, (work / "tokenizer.json").read_text(), spec.vocab_size, spec.max_position_embeddings)

        # Measure what was written.
        shipped = Qwen3NextForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        shipped_mtp = load_mtp_from_checkpoint(tmp, shipped)
        t0 = time.time()
        held = evaluate.heldout(shipped, shipped_mtp, data.tokens(work, "heldout"), seq_len=cfg.train.seq_len,
                                max_windows=max_eval_windows, progress=lambda it: tqdm(it, desc="held-out eval"))
        uni = evaluate.unigram(data.tokens(work, "train"), data.tokens(work, "heldout"), spec.vocab_size)
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        samples = []
        for prompt in SAMPLE_PROMPTS:
            ids_in = torch.tensor([tok.encode(prompt).ids])
            gen = shipped.generate(ids_in, max_new_tokens=64, do_sample=False, top_k=None, top_p=None,
                                   temperature=None, eos_token_id=[special["eos_token_id"], special["pad_token_id"]],
                                   pad_token_id=special["pad_token_id"])
            samples.append({"prompt": prompt, "completion": tok.decode(gen[0, ids_in.shape[1]:].tolist()),
                            "new_tokens": int(gen.shape[1] - ids_in.shape[1])})
        logs = {p: [json.loads(line) for line in (work / f"{p}_log.jsonl").read_text().splitlines()] for p in ("base", "mtp")}
        report = {
            "corpus": summary, "config_digest": {p: cfg.digest(p) for p in ("base", "mtp")},
            "parameters": {"total_main": sum(p.numel() for p in shipped.parameters()),
                           "mtp": sum(p.numel() for p in shipped_mtp.parameters())},
            "training": {"base_steps": base_state["step"], "base_tokens": base_state["step"] * cfg.train.batch_size * cfg.train.seq_len,
                         "base_wall_s": base_state["elapsed_s"], "mtp_steps": cfg.train.mtp_steps,
                         "mtp_tokens": cfg.train.mtp_steps * cfg.train.batch_size * cfg.train.seq_len,
                         "mtp_wall_s": logs["mtp"][-1]["elapsed_s"] if logs["mtp"] else 0.0,
                         "final_train_lm_loss": logs["base"][-1]["lm_loss"] if logs["base"] else None},
            "heldout": held, "unigram": uni, "samples": samples, "eval_wall_s": time.time() - t0,
            "train_config": cfg.train.__dict__,
        }
        (tmp / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(render_card(report, cfg))
        for f in tmp.iterdir():  # safetensors writes owner-only files
            f.chmod(0o644)
    return out
