"""qcn-pico's model and training configuration: frozen dataclasses, built in one place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from qcn.compile.export.tiny import TinySpec

# Qwen3-Next's structure at 1/8 width: 2 x (3 Gated DeltaNet + 1 gated attention), Hv = 2 Hk,
# GQA 2:1 with an output gate, RoPE on a quarter of the head dims, top-4 of 16 routed experts
# plus a gated shared expert in every layer, zero-centred RMSNorms, untied lm_head.
PICO_MODEL = TinySpec(
    vocab_size=8192, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=64, linear_value_head_dim=64, num_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=128, shared_expert_intermediate_size=256, intermediate_size=1024,
    max_position_embeddings=4096,
)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 1000  # cosine schedule length of the base model
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.01
    autocast_bf16: bool = True  # bf16 matmuls (fp32 master weights); fp32 math elsewhere
    mtp_steps: int = 300
    mtp_lr: float = 1e-3
    mtp_warmup_steps: int = 20
    checkpoint_every: int = 25
    eval_every: int = 100
    eval_windows: int = 16
    threads: int = 2


@dataclass(frozen=True)
class PicoConfig:
    model: TinySpec = PICO_MODEL
    train: TrainConfig = TrainConfig()

    def digest(self, phase: str) -> str:
        """Hash of what shapes the weights of `phase` ('base' | 'mtp'); a resume must match it."""
        if phase not in ("base", "mtp"):
            raise ValueError(f"phase {phase!r}; valid: 'base', 'mtp'")
        d = dataclasses.asdict(self)
        for k in ("checkpoint_every", "eval_every", "eval_windows", "threads"):
            d["train"].pop(k)
        if phase == "base":
            d["train"] = {k: v for k, v in d["train"].items() if not k.startswith("mtp_")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
