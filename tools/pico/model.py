"""transformers' Qwen3NextForCausalLM at pico size, and the MTP head in the checkpoint layout.

The MTP head follows the layout vLLM's and SGLang's `qwen3_next_mtp` load (`mtp.*` names):

    e = pre_fc_norm_embedding(embed_tokens(x[t+1]))      # shared embedding
    h = pre_fc_norm_hidden(hidden[t])                    # main model's final (post-norm) hidden
    y = layers[0](fc(cat([e, h])), position t)           # one full-attention + MoE decoder layer
    logits[t+2] = lm_head(norm(y))                       # shared lm_head

fc.weight [H, 2H]; all norms zero-centred (x_hat * (1 + w)).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer, Qwen3NextRMSNorm

from qcn.compile.export.tiny import TinySpec, config_dict


def hf_config(spec: TinySpec, *, router_aux_loss_coef: float = 0.001, dtype: str = "bfloat16") -> Qwen3NextConfig:
    d = config_dict(spec, dtype=dtype)
    d["router_aux_loss_coef"] = router_aux_loss_coef
    cfg = Qwen3NextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")})
    cfg.architectures = ["Qwen3NextForCausalLM"]
    cfg._experts_implementation = "grouped_mm"  # same math as "eager", ~20% faster training on CPU
    return cfg


def build_model(spec: TinySpec, seed: int, router_aux_loss_coef: float) -> Qwen3NextForCausalLM:
    torch.manual_seed(seed)
    cfg = hf_config(spec, router_aux_loss_coef=router_aux_loss_coef)
    cfg.output_router_logits = True  # training adds the load-balancing loss
    return Qwen3NextForCausalLM(cfg).float()


class MTPHead(nn.Module):
    """The `mtp.*` module tree (state_dict keys match the checkpoint after the `mtp.` prefix,
    except that transformers keeps experts fused: see `mtp_checkpoint_tensors`)."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        H = config.hidden_size
        cfg = copy.deepcopy(config)
        cfg.layer_types = list(config.layer_types) + ["full_attention"]
        cfg.num_hidden_layers = config.num_hidden_layers + 1
        self.layer_idx = config.num_hidden_layers
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = Qwen3NextRMSNorm(H, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = Qwen3NextRMSNorm(H, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList([Qwen3NextDecoderLayer(cfg, self.layer_idx)])
        self.norm = Qwen3NextRMSNorm(H, eps=config.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """embeds [B, T, H] of x[t+1]; hidden [B, T, H] final hidden at t -> [B, T, H] for t+2."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        x = self.layers[0](x, position_embeddings=position_embeddings, attention_mask=None)
        if isinstance(x, tuple):
            x = x[0]
        return self.norm(x)


def mtp_logits(model: Qwen3NextForCausalLM, mtp: MTPHead, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """ids [B, T+1] tokens, hidden [B, T+1, H] main-model final hidden -> logits [B, T, V] for ids[:, 2:]...

    Position t pairs hidden[t] with the embedding of ids[t+1] and predicts ids[t+2]; the
    returned logits cover t = 0 .. T-1 (the caller compares them with ids[:, 2:T+2]).
    """
    T = ids.shape[1] - 1
    emb = model.model.embed_tokens(ids[:, 1:])
    pos = torch.arange(T, device=ids.device)[None].expand(ids.shape[0], T)
    pe = model.model.rotary_emb(emb, pos)
    y = mtp(emb, hidden[:, :T], pe)
    return model.lm_head(y)


def init_mtp_from(model: Qwen3NextForCausalLM, mtp: MTPHead) -> None:
    """Start the MTP layer from the main model's last full-attention layer (fc stays random)."""
    last = max(i for i, t in enumerate(model.config.layer_types) if t == "full_attention")
    missing = mtp.layers[0].load_state_dict(model.model.layers[last].state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys


def mtp_checkpoint_tensors(mtp: MTPHead, num_experts: int) -> dict[str, torch.Tensor]:
    """`mtp.*` tensors in the Hub layout (per-expert gate/up/down projections)."""
    out = {}
    for k, v in mtp.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H] -> gate [I, H], up [I, H] per expert
            base = "mtp." + k[: -len("gate_up_proj")]
            gate, up = v.chunk(2, dim=1)
            for e in range(num_experts):
                out[f"{base}{e}.gate_proj.weight"] = gate[e]
                out[f"{base}{e}.up_proj.weight"] = up[e]
        elif k.endswith("mlp.experts.down_proj"):  # [E, H, I]
            base = "mtp." + k[: -len("down_proj")]
            for e in range(num_experts):
                out[f"{base}{e}.down_proj.weight"] = v[e]
        else:
            out["mtp." + k] = v
    return {k: v.detach().contiguous() for k, v in out.items()}
