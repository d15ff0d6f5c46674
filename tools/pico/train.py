"""Training loops: the base model, then the MTP head on the frozen base. Seeded and resumable.

Batch k of a phase is drawn from numpy's generator seeded with (seed, phase, k), so a resumed
run sees exactly the batches an uninterrupted one would. State is saved to work/<phase>.pt
(atomically) every `checkpoint_every` steps and at the end; a run stopped by --max-minutes or
Ctrl-C continues from there. Each step appends one JSON line to work/<phase>_log.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .config import PicoConfig
from .model import MTPHead, build_model, init_mtp_from, mtp_logits

logger = logging.getLogger(__name__)
PHASE_IDS = {"base": 0, "mtp": 1, "eval": 2}


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _rng(cfg: PicoConfig, phase: str, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.train.seed, PHASE_IDS[phase], step])


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load(path: Path, digest: str) -> dict | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["digest"] != digest:
        raise ValueError(f"{path} was trained with config digest {state['digest']}, this run has {digest}; "
                         f"use a fresh --work directory or the original configuration")
    return state


def _autocast(cfg: PicoConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.autocast_bf16 else nullcontext()


def _progress(total: int, initial: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def load_base(work: Path, cfg: PicoConfig):
    state = _load(work / "base.pt", cfg.digest("base"))
    if state is None:
        raise FileNotFoundError(f"{work / 'base.pt'} missing: run the base phase first")
    model = build_model(cfg.model, cfg.train.seed, cfg.train.router_aux_loss_coef)
    model.load_state_dict(state["model"])
    return model, state


@torch.no_grad()
def heldout_loss(model, stream: np.ndarray, cfg: PicoConfig) -> float:
    model.eval()
    rng = _rng(cfg, "eval", 0)
    x = torch.from_numpy(data.batch(stream, rng, cfg.train.eval_windows, cfg.train.seq_len))
    with _autocast(cfg):
        logits = model(input_ids=x).logits  # next-token cross-entropy only, no router loss
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten()).item()
    model.train()
    return loss


def train_base(work: Path, cfg: PicoConfig, max_minutes: float | None = None) -> dict:
    t = cfg.train
    torch.set_num_threads(t.threads)
    train_stream, heldout_stream = data.tokens(work, "train"), data.tokens(work, "heldout")
    model = build_model(cfg.model, t.seed, t.router_aux_loss_coef)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))
    state = _load(work / "base.pt", cfg.digest("base"))
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed_s"]
        logger.info("resumed base at step %d (%.0f s trained)", step, elapsed)
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    log = (work / "base_log.jsonl").open("a")

    def save():
        _save(work / "base.pt", {"digest": cfg.digest("base"), "model": model.state_dict(),
                                 "opt": opt.state_dict(), "step": step, "elapsed_s": elapsed})

    model.train()
    with _progress(t.steps, step, "base") as bar:
        while step < t.steps:
            t0 = time.time()
            lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            x = torch.from_numpy(data.batch(train_stream, _rng(cfg, "base", step), t.batch_size, t.seq_len))
            with _autocast(cfg):
                out = model(input_ids=x, labels=x)
            out.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed += time.time() - t0
            aux = float(out.aux_loss.detach())
            lm_loss = out.loss.item() - t.router_aux_loss_coef * aux
            rec = {"step": step, "lm_loss": round(lm_loss, 4), "aux": round(aux, 4),
                   "lr": lr, "grad_norm": round(gnorm, 3), "tokens": step * t.batch_size * t.seq_len,
                   "elapsed_s": round(elapsed, 1)}
            if step % t.eval_every == 0 or step == t.steps:
                rec["heldout_loss"] = round(heldout_loss(model, heldout_stream, cfg), 4)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{lm_loss:.3f}", lr=f"{lr:.1e}")
            bar.update()
            if step % t.checkpoint_every == 0 or step == t.steps:
                save()
            if deadline is not None and time.time() > deadline:
                save()
                logger.info("stopped at step %d (--max-minutes); run again to continue", step)
                break
    log.close()
    return {"step": step, "elapsed_s": elapsed, "done": step >= t.steps}


def _mtp_loss(model, mtp, x: torch.Tensor, cfg: PicoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T+2] -> (loss, top-1 hits [B, T]) of predicting x[t+2] from hidden[t] and x[t+1]."""
    with torch.no_grad():
        hidden = model.model(input_ids=x[:, :-1]).last_hidden_state  # post-norm, [B, T+1, H]
    with _autocast(cfg):
        logits = mtp_logits(model, mtp, x[:, :-1], hidden)
    target = x[:, 2:]
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    return loss, logits.argmax(-1) == target


def train_mtp(work: Path, cfg: PicoConfig, max_minutes: float | None = None) -> dict:
    t = cfg.train
    torch.set_num_threads(t.threads)
    model, _ = load_base(work, cfg)
    model.config.output_router_logits = False
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mtp = MTPHead(model.config)
    torch.manual_seed(t.seed + 1)
    torch.nn.init.normal_(mtp.fc.weight, std=0.02)
    init_mtp_from(model, mtp)
    opt = torch.optim.AdamW(mtp.parameters(), lr=t.mtp_lr, betas=(0.9, 0.95), weight_decay=0.0)
    state = _load(work / "mtp.pt", cfg.digest("mtp"))
    step, elapsed = 0, 0.0
    if state is not None:
        mtp.load_state_dict(state["mtp"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed_s"]
        logger.info("resumed mtp at step %d", step)
    train_stream = data.tokens(work, "train")
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    log = (work / "mtp_log.jsonl").open("a")

    def save():
        _save(work / "mtp.pt", {"digest": cfg.digest("mtp"), "mtp": mtp.state_dict(), "opt": opt.state_dict(),
                                "step": step, "elapsed_s": elapsed})

    mtp.train()
    with _progress(t.mtp_steps, step, "mtp") as bar:
        while step < t.mtp_steps:
            t0 = time.time()
            lr = lr_at(step, t.mtp_lr, t.mtp_warmup_steps, t.mtp_steps, t.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            x = torch.from_numpy(data.batch(train_stream, _rng(cfg, "mtp", step), t.batch_size, t.seq_len + 2))
            loss, hits = _mtp_loss(model, mtp, x, cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mtp.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed += time.time() - t0
            rec = {"step": step, "loss": round(loss.item(), 4), "acc": round(hits.float().mean().item(), 4),
                   "lr": lr, "elapsed_s": round(elapsed, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}")
            bar.update()
            if step % t.checkpoint_every == 0 or step == t.mtp_steps:
                save()
            if deadline is not None and time.time() > deadline:
                save()
                break
    log.close()
    return {"step": step, "elapsed_s": elapsed, "done": step >= t.mtp_steps}


def load_mtp(work: Path, cfg: PicoConfig, model) -> MTPHead:
    state = _load(work / "mtp.pt", cfg.digest("mtp"))
    if state is None:
        raise FileNotFoundError(f"{work / 'mtp.pt'} missing: run the mtp phase first")
    mtp = MTPHead(model.config)
    mtp.load_state_dict(state["mtp"])
    return mtp.eval()
