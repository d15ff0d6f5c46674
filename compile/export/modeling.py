"""Export-friendly Qwen3-Next: plain tensors, no Python loops over tokens, qcn ops for the layers.

Not a trace of transformers' modeling: the same math (transformers' modeling_qwen3_next.py is
the reference) written so that `torch.onnx.export(dynamo=True)` gives one graph for any number
of tokens and sequences. Graph I/O follows docs/CONTRACT.md:

    forward(input_ids [B, T] int64, past_len [B] int64, states: list) -> (logits, *new_states)

`states` holds, layer by layer, (conv_state [B, C, K-1], recurrent_state [B, Hv, Dk, Dv] fp32)
for linear-attention layers and (past_key, past_value [B, KVH, P, D]) for attention layers.
The outputs are logits ([B, V] for `logits="last"`, [B, T, V] for "all"), then per layer the
new carried states, or the new tokens' keys/values [B, KVH, T, D]; with `hidden=True` (an
artifact with an MTP head, docs/MTP.md) last the final-norm hidden state of every token
[B, T, H]. `verify=True` is the speculative verify graph: the linear layers return their states
after every token ([B, T, C, K-1], [B, T, Hv, Dk, Dv]) instead of after the last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcn.artifact import LOGITS_MODES

from ..plugins.attention.op import cached_attention
from ..plugins.gated_deltanet.op import gated_deltanet, gated_deltanet_verify
from ..plugins.moe.op import moe
from .config import SUPPORTED_ROPE_TYPES, CheckpointError, ModelConfig
from .weights import WeightSpec, weight_specs



@dataclass(frozen=True)
class RopeTables:
    inv_freq: torch.Tensor  # [rotary_dim / 2] fp32
    attention_scaling: float


def rope_tables(cfg: ModelConfig) -> RopeTables:
    """inv_freq and attention scaling exactly as transformers computes them (YaRN included)."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

    hf_config = Qwen3NextConfig(**_thaw(cfg.raw))
    rope_type = hf_config.rope_parameters.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"config.json: rope_type {rope_type!r} is not supported; valid: "
                              f"{list(SUPPORTED_ROPE_TYPES)}")
    rotary = Qwen3NextRotaryEmbedding(hf_config)
    return RopeTables(rotary.inv_freq.detach().float().clone(), float(rotary.attention_scaling))


def _thaw(value):
    """The frozen config.json (MappingProxy / tuples) back to plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_thaw(v) for v in value]
    return value


def _rms(x: torch.Tensor, weight_1p: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm; `weight_1p` already holds (1 + w) in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight_1p).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]; cos/sin [B, T, 1, rotary_dim]: rotate-half on the first rotary_dim."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, specs: list[WeightSpec], device, act_dtype):
        super().__init__()
        self.cfg, self.index = cfg, index
        self.kind = cfg.layer_types[index]
        self.is_moe = cfg.is_moe_layer(index)
        prefix = f"layers.{index}."
        for s in specs:
            if s.name.startswith(prefix):
                dtype = torch.float32 if s.fp32 else act_dtype
                self.register_parameter(s.name[len(prefix):],
                                        nn.Parameter(torch.empty(s.shape, dtype=dtype, device=device), requires_grad=False))

    def mixer_linear(self, h, conv_state, recurrent_state, verify: bool = False):
        cfg = self.cfg
        B, T, _ = h.shape
        qkvz = h @ self.in_proj_qkvz
        qkv, z = torch.split(qkvz, [cfg.conv_dim, cfg.value_dim], dim=-1)
        z = z.reshape(B, T, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
        b, a = torch.split(h @ self.in_proj_ba, [cfg.linear_num_value_heads] * 2, dim=-1)
        y, conv_state, recurrent_state = (gated_deltanet_verify if verify else gated_deltanet)(
            qkv, z, b, a, self.conv_weight, self.A_log, self.dt_bias, self.gdn_norm, conv_state, recurrent_state,
            cfg.linear_num_key_heads, cfg.rms_norm_eps)
        return y @ self.out_proj, conv_state, recurrent_state

    def mixer_attention(self, h, past_key, past_value, past_len, cos, sin):
        cfg = self.cfg
        B, T, _ = h.shape
        Hq, KVH, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        qg = (h @ self.q_proj + self.q_bias) if bias else h @ self.q_proj
        q, gate = torch.split(qg.reshape(B, T, Hq, 2 * D), [D, D], dim=-1)
        k = (h @ self.k_proj + self.k_bias) if bias else h @ self.k_proj
        v = (h @ self.v_proj + self.v_bias) if bias else h @ self.v_proj
        q = _rope(_rms(q, self.q_norm, cfg.rms_norm_eps), cos, sin)
        k = _rope(_rms(k.reshape(B, T, KVH, D), self.k_norm, cfg.rms_norm_eps), cos, sin)
        v = v.reshape(B, T, KVH, D)
        out = cached_attention(q, k, v, past_key, past_value, past_len, D ** -0.5)
        out = out.reshape(B, T, Hq * D) * torch.sigmoid(gate.reshape(B, T, Hq * D))
        out = out @ self.o_proj
        if bias:
            out = out + self.o_bias
        return out, k.transpose(1, 2), v.transpose(1, 2)

    def mlp(self, h):
        cfg = self.cfg
        B, T, H = h.shape
        if self.is_moe:
            y = moe(h.reshape(B * T, H), self.router, self.experts_gate_up, self.experts_down, self.shared_gate_up,
                    self.shared_down, self.shared_gate, cfg.num_experts_per_tok, cfg.norm_topk_prob, "float")
            return y.reshape(B, T, H)
        gate, up = torch.split(h @ self.mlp_gate_up, [cfg.intermediate_size] * 2, dim=-1)
        return (F.silu(gate) * up) @ self.mlp_down

    def forward(self, h, state_a, state_b, past_len, cos, sin, verify: bool = False):
        eps = self.cfg.rms_norm_eps
        x = _rms(h, self.input_norm, eps)
        if self.kind == "linear_attention":
            x, new_a, new_b = self.mixer_linear(x, state_a, state_b, verify)
        else:
            x, new_a, new_b = self.mixer_attention(x, state_a, state_b, past_len, cos, sin)
        h = h + x
        h = h + self.mlp(_rms(h, self.post_norm, eps))
        return h, new_a, new_b


class QcnModel(nn.Module):
    """Qwen3-Next for export. Parameters live on `device` ("meta" for export: the exporter streams
    the real weights into the ONNX external data file afterwards)."""

    def __init__(self, cfg: ModelConfig, rope: RopeTables, act_dtype: torch.dtype = torch.float32,
                 logits: str = "last", device: str | torch.device = "meta", *, hidden: bool = False,
                 verify: bool = False):
        super().__init__()
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits mode {logits!r}; valid: {LOGITS_MODES}")
        self.cfg, self.act_dtype, self.logits_mode = cfg, act_dtype, logits
        self.hidden, self.verify = hidden, verify
        self.specs = weight_specs(cfg)
        self.rope_scaling = rope.attention_scaling
        by_name = {s.name: s for s in self.specs}
        for name in ("embed_tokens", "final_norm", "lm_head"):
            dtype = torch.float32 if by_name[name].fp32 else act_dtype
            self.register_parameter(name, nn.Parameter(torch.empty(by_name[name].shape, dtype=dtype, device=device),
                                                       requires_grad=False))
        self.register_buffer("rope_inv_freq", torch.empty(rope.inv_freq.shape, device=device))
        self.layers = nn.ModuleList(Layer(cfg, i, self.specs, device, act_dtype) for i in range(cfg.num_hidden_layers))

    def constant_tensors(self, rope: RopeTables) -> dict[str, torch.Tensor]:
        """Buffers that are not checkpoint weights, by initializer name."""
        return {"rope_inv_freq": rope.inv_freq.float()}

    def load_weights(self, checkpoint, rope: RopeTables) -> None:
        """Materialise every parameter from `checkpoint` (for running this module eagerly in tests)."""
        params = dict(self.named_parameters())
        for s in self.specs:
            params[s.name].data = s.load(checkpoint, self.act_dtype)
        self.rope_inv_freq = rope.inv_freq.float().clone()

    def forward(self, input_ids: torch.Tensor, past_len: torch.Tensor, states: list[torch.Tensor]):
        B, T = input_ids.shape
        h = F.embedding(input_ids, self.embed_tokens)
        cos, sin = rope_cos_sin(past_len, T, self.rope_inv_freq, self.rope_scaling, self.act_dtype)
        new_states = []
        for i, layer in enumerate(self.layers):
            h, a, b = layer(h, states[2 * i], states[2 * i + 1], past_len, cos, sin, self.verify)
            new_states += [a, b]
        if self.hidden:  # the MTP head reads every token's post-norm hidden state (docs/MTP.md)
            hn = _rms(h, self.final_norm, self.cfg.rms_norm_eps)
            logits = ((hn[:, -1] if self.logits_mode == "last" else hn) @ self.lm_head).float()
            return (logits, *new_states, hn)
        if self.logits_mode == "last":
            h = h[:, -1]
        logits = (_rms(h, self.final_norm, self.cfg.rms_norm_eps) @ self.lm_head).float()
        return (logits, *new_states)


def rope_cos_sin(past_len: torch.Tensor, T: int, inv_freq: torch.Tensor, scaling: float, act_dtype: torch.dtype):
    """cos/sin [B, T, 1, rotary_dim] for positions past_len[b] + t."""
    pos = past_len[:, None] + torch.arange(T, device=past_len.device, dtype=torch.int64)[None, :]
    freqs = pos[..., None].float() * inv_freq  # [B, T, rd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return (emb.cos() * scaling).to(act_dtype), (emb.sin() * scaling).to(act_dtype)
