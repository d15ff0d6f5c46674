"""The checkpoint's MTP head (`mtp.*`) as an export module: the draft model of speculative decoding.

Wiring (docs/MTP.md, settled from vLLM's and SGLang's `qwen3_next_mtp.py`), for the pair
(main-model hidden state at t, token t+1) at RoPE position t:

    u = cat([norm_e(embed(x[t+1])), norm_h(hidden[t])]) @ fc      # hidden: after the final norm
    y = layer(u)                                                  # full attention + MoE, own KV cache
    g = norm(y);  logits(x[t+2]) = g @ lm_head                     # embed / lm_head shared

Graph I/O (docs/CONTRACT.md, "The MTP graph"):

    forward(input_ids [B, T], hidden [B, T, H], last_index [B], past_len [B], past_key, past_value)
      -> logits [B, V], hidden_out [B, H], new_key [B, KVH, T, D], new_value [B, KVH, T, D]

`logits` and `hidden_out` are those of token `last_index[b]` of each row (rows of one call may
hold different numbers of real tokens; the tokens after `last_index` are padding whose K/V land
past the row's committed length, where the runtime ignores them). `hidden_out` (after
`mtp.norm`) is the hidden state of the next draft step, as vLLM's proposer feeds it back.

The weights: `fc` is stored [2H, H] (in, out), the norms as (1 + w) in fp32, and the decoder
layer through the main model's weight map for a full-attention MoE layer, its sources renamed
`model.layers.{i}.` -> `mtp.layers.0.` (same transforms, same layout as the main layers).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import CheckpointError, ModelConfig
from .modeling import Layer, RopeTables, _rms, rope_cos_sin
from .weights import WeightSpec, _one_plus, _t, weight_specs

MTP_PREFIX = "mtp."
LAYER_PARAM = "mtp_layer"  # the decoder layer's parameters are mtp_layer.<name> in the graph

# graph I/O names (docs/CONTRACT.md)
MTP_INPUTS = ("input_ids", "hidden", "last_index", "past_len", "mtp.past_key", "mtp.past_value")
MTP_OUTPUTS = ("logits", "hidden_out", "mtp.new_key", "mtp.new_value")


def template_layer(cfg: ModelConfig) -> int:
    """The main layer whose weight map the MTP layer shares (a full-attention MoE layer)."""
    for i, kind in enumerate(cfg.layer_types):
        if kind == "full_attention" and cfg.is_moe_layer(i):
            return i
    raise CheckpointError("config.json: the MTP layer is a full-attention MoE layer, but the main model has none "
                          "to take its weight layout from")


def mtp_weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """The MTP head's weights (embed_tokens and lm_head are the main model's, not listed)."""
    H = cfg.hidden_size
    specs = [WeightSpec("mtp_fc", (2 * H, H), ("mtp.fc.weight",), _t),
             WeightSpec("mtp_norm_embedding", (H,), ("mtp.pre_fc_norm_embedding.weight",), _one_plus, True),
             WeightSpec("mtp_norm_hidden", (H,), ("mtp.pre_fc_norm_hidden.weight",), _one_plus, True),
             WeightSpec("mtp_norm", (H,), ("mtp.norm.weight",), _one_plus, True)]
    i = template_layer(cfg)
    name_from, src_from = f"layers.{i}.", f"model.layers.{i}."
    for s in weight_specs(cfg):
        if s.name.startswith(name_from):
            specs.append(dataclasses.replace(
                s, name=LAYER_PARAM + "." + s.name[len(name_from):],
                sources=tuple("mtp.layers.0." + x[len(src_from):] for x in s.sources)))
    return specs


def check_mtp_tensors(cfg: ModelConfig, mtp_names) -> list[str]:
    """The `mtp.*` tensors the head needs that the checkpoint lacks (empty: exportable)."""
    have = set(mtp_names)
    return sorted({src for s in mtp_weight_specs(cfg) for src in s.sources} - have)


class MtpModel(nn.Module):
    """The MTP head for export (parameters on `device`; "meta" when exporting)."""

    def __init__(self, cfg: ModelConfig, rope: RopeTables, act_dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "meta"):
        super().__init__()
        self.cfg, self.act_dtype = cfg, act_dtype
        self.rope_scaling = rope.attention_scaling
        main = {s.name: s for s in weight_specs(cfg)}
        self.specs = [main["embed_tokens"], main["lm_head"]] + mtp_weight_specs(cfg)
        for s in self.specs:
            if not s.name.startswith(LAYER_PARAM + "."):
                dtype = torch.float32 if s.fp32 else act_dtype
                self.register_parameter(s.name, nn.Parameter(torch.empty(s.shape, dtype=dtype, device=device),
                                                             requires_grad=False))
        self.register_buffer("rope_inv_freq", torch.empty(rope.inv_freq.shape, device=device))
        i = template_layer(cfg)
        self.mtp_layer = Layer(cfg, i, list(main.values()), device, act_dtype)

    def constant_tensors(self, rope: RopeTables) -> dict[str, torch.Tensor]:
        return {"rope_inv_freq": rope.inv_freq.float()}

    def load_weights(self, checkpoint, rope: RopeTables) -> None:
        """Materialise every parameter from `checkpoint` (tests run this module eagerly)."""
        params = dict(self.named_parameters())
        for s in self.specs:
            params[s.name].data = s.load(checkpoint, self.act_dtype)
        self.rope_inv_freq = rope.inv_freq.float().clone()

    def forward(self, input_ids, hidden, last_index, past_len, past_key, past_value):
        B, T = input_ids.shape
        eps = self.cfg.rms_norm_eps
        e = _rms(F.embedding(input_ids, self.embed_tokens), self.mtp_norm_embedding, eps)
        h = _rms(hidden.to(self.act_dtype), self.mtp_norm_hidden, eps)
        u = torch.cat([e, h], dim=-1) @ self.mtp_fc
        cos, sin = rope_cos_sin(past_len, T, self.rope_inv_freq, self.rope_scaling, self.act_dtype)
        y, new_key, new_value = self.mtp_layer(u, past_key, past_value, past_len, cos, sin)
        H = y.shape[-1]
        y_last = torch.gather(y, 1, last_index[:, None, None].expand(B, 1, H)).squeeze(1)  # [B, H]
        g = _rms(y_last, self.mtp_norm, eps)
        logits = (g @ self.lm_head).float()
        return logits, g, new_key, new_value
