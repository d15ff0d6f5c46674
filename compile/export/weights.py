"""The weight map: every tensor of our export model, its checkpoint sources and transform.

Data, not code paths (gpt-fast style): `weight_specs(cfg)` lists `WeightSpec`s; `chunks` reads
the sources lazily from a `Checkpoint` (safetensors mmaps them: file-backed pages, not heap) and
yields the transformed tensor in pieces whose bytes, concatenated, are the tensor (one per
expert for the stacked expert weights, row blocks of a transposed weight), so the export
streams them into weights.bin and never holds more than one piece; `load` is the
whole tensor (for running the model eagerly in tests). Layout decisions:
- projections are stored [in, out] so the graph is a plain `MatMul(x, W)` (no weight-only ops
  for the optimizer to fold, and the passes see ordinary MatMuls);
- in_proj_qkvz / in_proj_ba rows are de-interleaved once here (transformers'
  `fix_query_key_value_ordering`): q | k | v | z and b | a become contiguous;
- zero-centred RMSNorm weights are stored as (1 + w) in fp32, which is what transformers
  multiplies by (`output * (1.0 + weight.float())`);
- routed experts are stacked [E, 2I, H] (gate rows first) and [E, H, I] as qcn::MoE takes them.

The official FP8 release (float8_e4m3fn weights, `weight_scale_inv` per b0 x b1 block of the
[out, in] weight) can be exported as it is: `fp8_chunks` moves the FP8 bytes through the same
transform as the float weight (every transform of an `fp8` role only moves data), and
`fp8_scale` re-expresses the block scale as 1 x b1 blocks along K (in): each block's scale is
repeated for the b0 rows it covers (exact), giving a per-row [out, ceil(in/b1)] scale that goes
through the same transform as the weight, so row permutations (in_proj_qkvz's de-interleave)
and concatenations (gate | up) carry their scales along. Projections come out as W [K, N] +
scale [ceil(K/b1), N] (DequantizeLinear axis=0, block_size=b1); stacked experts as W [E, R, K]
+ scale [E, R, ceil(K/b1)] (qcn::MoE's "fp8" format).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator
from typing import Callable

import torch

from .config import ModelConfig

Transform = Callable[[list[torch.Tensor]], torch.Tensor]
# Which recipe key decides whether an FP8 checkpoint weight stays FP8 (WeightSpec.fp8):
#   "projection"    quantization.weights: attention, DeltaNet and dense-MLP projections
#   "shared_expert" quantization.weights: the MoE layers' shared expert (inside qcn::MoE)
#   "expert"        quantization.experts: the routed experts (inside qcn::MoE)
FP8_ROLES = ("projection", "shared_expert", "expert")
BLOCK_BYTES = 64 << 20  # largest copy `WeightSpec.chunks` makes of a strided (transposed) weight


@dataclass(frozen=True)
class WeightSpec:
    name: str  # parameter name in the export model == ONNX initializer name
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # checkpoint tensor names
    transform: Transform
    fp32: bool = False  # kept in fp32 whatever the activation dtype
    # > 0: the tensor is `stacked` slices along dim 0; slice e = transform(e-th equal group of sources)
    stacked: int = 0
    fp8: str | None = None  # FP8_ROLES: may stay FP8 when the checkpoint stores it so (None: never)

    def source_groups(self) -> list[tuple[str, ...]]:
        """The checkpoint tensors each slice is computed from (one group unless `stacked`)."""
        if not self.stacked:
            return [self.sources]
        k = len(self.sources) // self.stacked
        return [self.sources[e * k:(e + 1) * k] for e in range(self.stacked)]

    def chunks(self, checkpoint, act_dtype: torch.dtype) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
        """(sources, contiguous chunk) pairs along dim 0 whose bytes, concatenated, are the tensor.

        One slice per source group (per expert when `stacked`); a dim-0 concatenation (`_cat`:
        gate | up) yields its sources as they are (mmapped, no copy); a slice that the transform
        leaves as a strided view (a transpose) is copied out in row blocks of at most
        BLOCK_BYTES, so a [H, V] lm_head never exists as a second full copy. Only fp32 specs
        compute ((1 + w) norms); the other transforms move data, so reading the sources in the
        target dtype gives the same bits at half the peak memory for bf16."""
        dtype = torch.float32 if self.fp32 else act_dtype
        yield from self._chunks(lambda s: checkpoint.get(s, dtype=dtype), dtype)

    def fp8_chunks(self, checkpoint) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
        """Like `chunks`, of the checkpoint's FP8 bytes as stored (float8_e4m3fn chunks): the
        transform moves uint8 views of them, so every byte is the checkpoint's."""
        if self.fp8 is None:
            raise ValueError(f"weight {self.name} has no FP8 form")
        for group, chunk in self._chunks(lambda s: _raw_fp8(checkpoint, s).view(torch.uint8), torch.uint8):
            yield group, chunk.view(torch.float8_e4m3fn)

    def fp8_scale(self, checkpoint) -> torch.Tensor:
        """The fp32 scale of the `fp8_chunks` tensor as 1 x b1 blocks along K: [ceil(K/b1), N]
        for a projection (stored [K, N]), [E, R, ceil(K/b1)] for stacked experts ([E, R, K])."""
        if self.fp8 is None:
            raise ValueError(f"weight {self.name} has no FP8 form")
        b0, _ = checkpoint.block_size

        def per_row(s: str) -> torch.Tensor:  # [ceil(out/b0), ceil(in/b1)] -> [out, ceil(in/b1)]
            scale = checkpoint.get_raw(checkpoint.scale_name(s)).float()
            return scale.repeat_interleave(b0, dim=0)[: checkpoint.shape(s)[0]]

        parts = [self.transform([per_row(s) for s in group]).contiguous() for group in self.source_groups()]
        return torch.stack(parts) if self.stacked else parts[0]

    def _chunks(self, read: Callable[[str], torch.Tensor], dtype: torch.dtype
                ) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
        want = self.shape[1:] if self.stacked else self.shape
        for group in self.source_groups():
            if self.transform is _cat:  # bytes of cat(a, b) along dim 0 = a's then b's: no copy at all
                parts = [read(s).contiguous() for s in group]
                got = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
                if got != want or any(p.shape[1:] != parts[0].shape[1:] for p in parts):
                    raise ValueError(f"weight {self.name}: {group} concatenate to {[list(p.shape) for p in parts]}, "
                                     f"expected {list(want)}")
                for part in parts:
                    yield group, part
                del parts
                continue
            t = self.transform([read(s) for s in group]).to(dtype)
            if tuple(t.shape) != want:
                raise ValueError(f"weight {self.name}: transform of {group} gave {list(t.shape)}, "
                                 f"expected {list(want)}")
            if t.is_contiguous() or t.dim() == 0:
                yield group, t.contiguous()
            else:
                rows = max(1, BLOCK_BYTES // max(1, t[0].numel() * t.element_size()))
                for r in range(0, t.shape[0], rows):
                    yield group, t[r:r + rows].contiguous()
            del t

    def load(self, checkpoint, act_dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor (tests and eager runs; the export streams `chunks` instead)."""
        whole = torch.cat([c.reshape(-1) for _, c in self.chunks(checkpoint, act_dtype)])
        return whole.reshape(self.shape)


def _raw_fp8(checkpoint, name: str) -> torch.Tensor:
    t = checkpoint.get_raw(name)
    if t.dtype != torch.float8_e4m3fn or checkpoint.scale_name(name) is None:
        raise ValueError(f"checkpoint tensor {name} is {t.dtype}, not an FP8 block weight")
    return t


def is_fp8_in(spec: WeightSpec, checkpoint) -> bool:
    """Every source of `spec` is an FP8 block weight of `checkpoint` (the official FP8 release)."""
    return spec.fp8 is not None and all(checkpoint.scale_name(s) is not None for s in spec.sources)


def _t(ts):  # nn.Linear [out, in] -> [in, out]
    return ts[0].T


def _one(ts):
    return ts[0]


def _one_plus(ts):
    return 1.0 + ts[0]


def _qkvz(cfg: ModelConfig) -> Transform:
    Hk, Dk, Dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // Hk

    def f(ts):
        w = ts[0].reshape(Hk, 2 * Dk + 2 * r * Dv, -1)
        q, k, v, z = torch.split(w, [Dk, Dk, r * Dv, r * Dv], dim=1)
        return torch.cat([p.reshape(-1, w.shape[-1]) for p in (q, k, v, z)], dim=0).T
    return f


def _ba(cfg: ModelConfig) -> Transform:
    Hk = cfg.linear_num_key_heads
    r = cfg.linear_num_value_heads // Hk

    def f(ts):
        w = ts[0].reshape(Hk, 2 * r, -1)
        b, a = torch.split(w, [r, r], dim=1)
        return torch.cat([b.reshape(-1, w.shape[-1]), a.reshape(-1, w.shape[-1])], dim=0).T
    return f


def _cat_t(ts):  # gate [I,H], up [I,H] -> [H, 2I]
    return torch.cat(ts, dim=0).T


def _cat(ts):
    return torch.cat(ts, dim=0)


def _squeeze_conv(ts):  # [C, 1, K] -> [C, K]
    return ts[0][:, 0, :]


def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    H, V = cfg.hidden_size, cfg.vocab_size
    specs = [WeightSpec("embed_tokens", (V, H), ("model.embed_tokens.weight",), _one)]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        w = lambda name, shape, sources, fn, fp32=False, stacked=0, fp8=None: specs.append(  # noqa: E731
            WeightSpec(f"{dst}.{name}", tuple(shape), tuple(f"{src}.{s}" for s in sources), fn, fp32, stacked, fp8))
        P = "projection"
        w("input_norm", (H,), ["input_layernorm.weight"], _one_plus, True)
        w("post_norm", (H,), ["post_attention_layernorm.weight"], _one_plus, True)
        if cfg.layer_types[i] == "linear_attention":
            Hv, Dv, C, K = cfg.linear_num_value_heads, cfg.linear_value_head_dim, cfg.conv_dim, cfg.linear_conv_kernel_dim
            w("in_proj_qkvz", (H, C + cfg.value_dim), ["linear_attn.in_proj_qkvz.weight"], _qkvz(cfg), fp8=P)
            w("in_proj_ba", (H, 2 * Hv), ["linear_attn.in_proj_ba.weight"], _ba(cfg), fp8=P)
            w("conv_weight", (C, K), ["linear_attn.conv1d.weight"], _squeeze_conv)
            w("A_log", (Hv,), ["linear_attn.A_log"], _one, True)
            w("dt_bias", (Hv,), ["linear_attn.dt_bias"], _one)
            w("gdn_norm", (Dv,), ["linear_attn.norm.weight"], _one)
            w("out_proj", (cfg.value_dim, H), ["linear_attn.out_proj.weight"], _t, fp8=P)
        else:
            Hq, KVH, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            w("q_proj", (H, 2 * Hq * D), ["self_attn.q_proj.weight"], _t, fp8=P)
            w("k_proj", (H, KVH * D), ["self_attn.k_proj.weight"], _t, fp8=P)
            w("v_proj", (H, KVH * D), ["self_attn.v_proj.weight"], _t, fp8=P)
            w("o_proj", (Hq * D, H), ["self_attn.o_proj.weight"], _t, fp8=P)
            if cfg.attention_bias:
                w("q_bias", (2 * Hq * D,), ["self_attn.q_proj.bias"], _one)
                w("k_bias", (KVH * D,), ["self_attn.k_proj.bias"], _one)
                w("v_bias", (KVH * D,), ["self_attn.v_proj.bias"], _one)
                w("o_bias", (H,), ["self_attn.o_proj.bias"], _one)
            w("q_norm", (D,), ["self_attn.q_norm.weight"], _one_plus, True)
            w("k_norm", (D,), ["self_attn.k_norm.weight"], _one_plus, True)
        if cfg.is_moe_layer(i):
            E, I, Is = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
            w("router", (E, H), ["mlp.gate.weight"], _one)
            # stacked expert by expert: slice e = cat(gate_e, up_e) [2I, H] (gate rows first), down_e [H, I]
            w("experts_gate_up", (E, 2 * I, H),
              [f"mlp.experts.{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up")], _cat, stacked=E,
              fp8="expert")
            w("experts_down", (E, H, I), [f"mlp.experts.{e}.down_proj.weight" for e in range(E)], _one, stacked=E,
              fp8="expert")
            w("shared_gate_up", (2 * Is, H), ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"], _cat,
              fp8="shared_expert")
            w("shared_down", (H, Is), ["mlp.shared_expert.down_proj.weight"], _one, fp8="shared_expert")
            w("shared_gate", (1, H), ["mlp.shared_expert_gate.weight"], _one)
        else:
            I = cfg.intermediate_size
            w("mlp_gate_up", (H, 2 * I), ["mlp.gate_proj.weight", "mlp.up_proj.weight"], _cat_t, fp8=P)
            w("mlp_down", (I, H), ["mlp.down_proj.weight"], _t, fp8=P)
    specs.append(WeightSpec("final_norm", (H,), ("model.norm.weight",), _one_plus, True))
    lm_source = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    specs.append(WeightSpec("lm_head", (H, V), (lm_source,), _t))
    return specs
