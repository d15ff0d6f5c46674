"""The checkpoint's config.json as a frozen, validated `ModelConfig`.

Build it only with `load_model_config(checkpoint_dir)`. Shape-defining keys are required
(library defaults differ from the real checkpoint); behavioural keys that the Hub's
config.json may omit default exactly as transformers' `Qwen3NextConfig` does.

Symbols used in docstrings: V vocab, H hidden, L layers, Hq attention heads, KVH key/value
heads, D attention head_dim, Hk/Dk and Hv/Dv linear-attention key/value heads and dims,
K conv kernel, E experts, I expert intermediate, Is shared-expert intermediate.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import QcnError

__all__ = ["CheckpointError", "QuantizationConfig", "ModelConfig", "load_model_config"]

LAYER_TYPES = ("linear_attention", "full_attention")
# RoPE variants whose tables are fixed at export time (transformers computes them; `rope_tables`).
# Dynamic variants (dynamic NTK, longrope) change the tables with the sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
ARCHITECTURE = "Qwen3NextForCausalLM"
MODEL_TYPE = "qwen3_next"


class CheckpointError(QcnError, ValueError):
    """A checkpoint (config.json, index, shard or tensor) that qcn cannot use as it is."""


def _error(path: Path, key: str, found: Any, valid: str) -> CheckpointError:
    return CheckpointError(f"{path}: key {key!r}: found {found!r}; valid: {valid}")


@dataclass(frozen=True)
class QuantizationConfig:
    """`quantization_config` of an FP8 block-quantized checkpoint.

    Weights `X.weight` are float8_e4m3fn [out, in] with `X.weight_scale_inv` float32
    [ceil(out/b0), ceil(in/b1)], (b0, b1) = weight_block_size; real = weight * scale_inv.
    """

    quant_method: str  # "fp8"
    weight_block_size: tuple[int, int]
    activation_scheme: str | None
    modules_to_not_convert: tuple[str, ...]


@dataclass(frozen=True)
class ModelConfig:
    """Qwen3-Next hyper-parameters read from config.json (see module docstring)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    layer_types: tuple[str, ...]
    hidden_act: str
    attention_bias: bool
    rope_theta: float
    partial_rotary_factor: float
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None
    architectures: tuple[str, ...]
    dtype: str | None  # "dtype" (transformers 5) or "torch_dtype" key, e.g. "bfloat16"
    quantization: QuantizationConfig | None
    raw: Mapping[str, Any]  # the parsed config.json, read-only

    @property
    def key_dim(self) -> int:
        """Hk * Dk."""
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        """Hv * Dv."""
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: q|k|v = 2 * key_dim + value_dim."""
        return 2 * self.key_dim + self.value_dim

    @property
    def rotary_dim(self) -> int:
        """Leading head dims that get RoPE: int(D * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_scaling(self) -> Mapping[str, Any] | None:
        """config.json's rope_scaling (or non-default rope_parameters), None if plain RoPE."""
        scaling = self.raw.get("rope_scaling")
        if scaling is None:
            params = self.raw.get("rope_parameters")
            if isinstance(params, Mapping) and params.get("rope_type", "default") != "default":
                scaling = params
        return scaling

    def is_moe_layer(self, i: int) -> bool:
        """Same rule as transformers' Qwen3NextDecoderLayer."""
        return (
            i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "linear_attention")

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")


# Keys whose absence means the checkpoint is not what we think it is.
_REQUIRED_INT = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
    "linear_num_value_heads", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size",
)
# Keys the Hub may omit: transformers' Qwen3NextConfig defaults.
_DEFAULTS: dict[str, Any] = {
    "linear_conv_kernel_dim": 4, "decoder_sparse_step": 1, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "norm_topk_prob": True, "attention_bias": False,
    "hidden_act": "silu", "mlp_only_layers": [], "full_attention_interval": 4,
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
}


def load_model_config(checkpoint_dir: Path | str) -> ModelConfig:
    """Read and validate `checkpoint_dir/config.json`; raises CheckpointError."""
    path = Path(checkpoint_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (a checkpoint directory needs config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise _error(path, "<top level>", type(raw).__name__, "a JSON object")

    def get(key: str) -> Any:
        if key in raw and raw[key] is not None or key not in _DEFAULTS:
            if key not in raw:
                raise _error(path, key, "<missing>", "required for Qwen3-Next")
            return raw[key]
        return _DEFAULTS[key]

    def integer(key: str, minimum: int = 1) -> int:
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise _error(path, key, v, f"an integer >= {minimum}")
        return v

    def boolean(key: str) -> bool:
        v = get(key)
        if not isinstance(v, bool):
            raise _error(path, key, v, "true or false")
        return v

    def number(key: str, v: Any = None) -> float:
        v = get(key) if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise _error(path, key, v, "a positive number")
        return float(v)

    def token_id(key: str) -> int | None:
        v = get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise _error(path, key, v, "null or a non-negative integer")
        return v

    architectures = tuple(raw.get("architectures") or ())
    if ARCHITECTURE not in architectures and raw.get("model_type") != MODEL_TYPE:
        raise _error(path, "architectures", list(architectures),
                     f"a list containing {ARCHITECTURE!r} (or model_type {MODEL_TYPE!r})")

    ints = {k: integer(k, minimum=0 if k == "num_experts" else 1) for k in _REQUIRED_INT}
    L = ints["num_hidden_layers"]

    if raw.get("layer_types") is not None:
        lt = raw["layer_types"]
        if not isinstance(lt, list) or len(lt) != L or any(t not in LAYER_TYPES for t in lt):
            bad = lt if not isinstance(lt, list) else [t for t in lt if t not in LAYER_TYPES] or f"{len(lt)} entries"
            raise _error(path, "layer_types", bad,
                         f"a list of {L} (num_hidden_layers) entries, each one of {list(LAYER_TYPES)}")
        layer_types = tuple(lt)
    else:  # Qwen3NextConfig.__post_init__
        interval = integer("full_attention_interval")
        layer_types = tuple("linear_attention" if (i + 1) % interval else "full_attention" for i in range(L))

    mlp_only = get("mlp_only_layers")
    if not isinstance(mlp_only, list) or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L for i in mlp_only
    ):
        raise _error(path, "mlp_only_layers", mlp_only, f"a list of layer indices in [0, {L})")

    eos = get("eos_token_id")
    eos_ids = (eos,) if isinstance(eos, int) and not isinstance(eos, bool) else tuple(eos or ())
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in eos_ids):
        raise _error(path, "eos_token_id", eos, "null, an integer or a list of integers")

    hidden_act = get("hidden_act")
    if hidden_act != "silu":
        raise _error(path, "hidden_act", hidden_act, "'silu'")

    if ints["linear_num_value_heads"] % ints["linear_num_key_heads"]:
        raise _error(path, "linear_num_value_heads", ints["linear_num_value_heads"],
                     f"a multiple of linear_num_key_heads ({ints['linear_num_key_heads']})")
    if ints["num_attention_heads"] % ints["num_key_value_heads"]:
        raise _error(path, "num_attention_heads", ints["num_attention_heads"],
                     f"a multiple of num_key_value_heads ({ints['num_key_value_heads']})")
    if ints["num_experts"] > 0 and ints["num_experts_per_tok"] > ints["num_experts"]:
        raise _error(path, "num_experts_per_tok", ints["num_experts_per_tok"],
                     f"at most num_experts ({ints['num_experts']})")

    rope_params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    rope_theta = number("rope_theta", raw.get("rope_theta", rope_params.get("rope_theta")))
    prf = raw.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 0.25))
    partial = number("partial_rotary_factor", prf)
    if partial > 1 or int(ints["head_dim"] * partial) % 2:
        raise _error(path, "partial_rotary_factor", prf,
                     f"a factor in (0, 1] giving an even number of rotary dims of head_dim {ints['head_dim']}")

    scaling = raw.get("rope_scaling")
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = rope_params
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise _error(path, "rope_scaling", scaling, "null or an object with rope_type")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise _error(path, "rope_scaling.rope_type", rope_type,
                         f"one of {list(SUPPORTED_ROPE_TYPES)} (tables fixed at export time; dynamic variants "
                         "such as 'dynamic' and 'longrope' change them with the sequence length)")

    dtype = raw.get("dtype", raw.get("torch_dtype"))
    if dtype is not None and not isinstance(dtype, str):
        raise _error(path, "torch_dtype", dtype, "a dtype name such as 'bfloat16'")

    return ModelConfig(
        **ints,
        rms_norm_eps=number("rms_norm_eps"),
        tie_word_embeddings=boolean("tie_word_embeddings"),
        linear_conv_kernel_dim=integer("linear_conv_kernel_dim"),
        norm_topk_prob=boolean("norm_topk_prob"),
        decoder_sparse_step=integer("decoder_sparse_step"),
        mlp_only_layers=tuple(mlp_only),
        layer_types=layer_types,
        hidden_act=hidden_act,
        attention_bias=boolean("attention_bias"),
        rope_theta=rope_theta,
        partial_rotary_factor=partial,
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=eos_ids,
        pad_token_id=token_id("pad_token_id"),
        architectures=architectures,
        dtype=dtype,
        quantization=_quantization(path, raw.get("quantization_config")),
        raw=_freeze(raw),
    )


def _quantization(path: Path, q: Any) -> QuantizationConfig | None:
    if q is None:
        return None
    key = "quantization_config"
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        found = q.get("quant_method") if isinstance(q, dict) else q
        raise _error(path, f"{key}.quant_method", found, "'fp8' (block-quantized FP8) or no quantization_config")
    block = q.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)):
        raise _error(path, f"{key}.weight_block_size", block, "two positive integers, e.g. [128, 128]")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _error(path, f"{key}.fmt", fmt, "'e4m3'")
    return QuantizationConfig(
        quant_method="fp8",
        weight_block_size=(block[0], block[1]),
        activation_scheme=q.get("activation_scheme"),
        modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()),
    )


def _freeze(value: Any) -> Any:
    """Deep read-only copy: dicts -> MappingProxyType, lists -> tuples."""
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value
