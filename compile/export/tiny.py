"""Tiny random Qwen3-Next checkpoints in exactly the Hugging Face on-disk layout.

`write_tiny_checkpoint(out_dir, TINY_SPECS["default"])` writes config.json,
generation_config.json, model safetensors (sharded + index when over `shard_max_bytes`),
`mtp.*` tensors, and a byte-level BPE tokenizer with Qwen's special tokens at the end of the
vocabulary. Same spec + seed + dtype -> byte-identical tensor files.

Console script: `qcn-tiny-checkpoint OUT [--spec NAME] [--dtype ...] [--seed N] [--force]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (SINGLE_FILE, CheckpointError, SafetensorsWriter, expected_tensors, layer_tensors,
                         open_checkpoint)
from .config import ModelConfig, load_model_config

__all__ = ["TinySpec", "TINY_SPECS", "SPECIAL_TOKENS", "config_dict", "train_bpe_tokenizer", "write_tokenizer",
           "write_tiny_checkpoint", "main"]

logger = logging.getLogger(__name__)

# Qwen's special tokens, in Qwen's order; they take the ids right after the BPE vocabulary.
# (content, special) -- Qwen marks the tool/FIM/repo tokens as non-special added tokens.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Fixed training corpus: these stdlib modules in sorted order, capped at CORPUS_BYTES.
CORPUS_FILES = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "contextlib.py",
    "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py", "fnmatch.py",
    "fractions.py", "functools.py", "glob.py", "heapq.py", "inspect.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "locale.py", "logging/__init__.py", "operator.py",
    "os.py", "pathlib.py", "pprint.py", "queue.py", "random.py", "shlex.py", "shutil.py",
    "statistics.py", "string.py", "subprocess.py", "tempfile.py", "textwrap.py", "threading.py",
    "tokenize.py", "traceback.py", "typing.py", "uuid.py", "warnings.py", "weakref.py",
)
CORPUS_BYTES = 1_000_000
MARKER_FILE = "qcn-tiny.json"  # what wrote this directory; lets the CLI reuse it


@dataclass(frozen=True)
class TinySpec:
    """Config values of a tiny checkpoint (names as in config.json).

    layer_types None -> config.json gets full_attention_interval instead (transformers derives
    the pattern). vocab_size must exceed 256 byte tokens + the special tokens.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    intermediate_size: int
    linear_conv_kernel_dim: int = 4
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    layer_types: tuple[str, ...] | None = None
    full_attention_interval: int = 4
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6


_L, _F = "linear_attention", "full_attention"
TINY_SPECS: dict[str, TinySpec] = {
    # The demo model: Qwen3-Next proportions scaled down (3 linear + 1 full, Hv = 2 Hk,
    # GQA 2:1, top-4 of 16 experts), ~13 MB in fp32.
    "default": TinySpec(
        vocab_size=2048, hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, intermediate_size=256,
    ),
    # Odd sizes, explicit layer pattern starting with attention, MQA, Hv == Hk, Dk != Dv,
    # top-3 without renormalisation.
    "odd": TinySpec(
        vocab_size=1000, hidden_size=72, num_hidden_layers=5, num_attention_heads=3,
        num_key_value_heads=1, head_dim=24, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=24, linear_value_head_dim=40, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=40, shared_expert_intermediate_size=56, intermediate_size=88,
        norm_topk_prob=False, layer_types=(_F, _L, _L, _F, _L),
    ),
    # Dense MLP on odd layers via decoder_sparse_step=2; 1 linear + 1 full; top-1; K=3.
    "sparse_step2": TinySpec(
        vocab_size=700, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=40, linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=40, linear_value_head_dim=24, num_experts=5, num_experts_per_tok=1,
        moe_intermediate_size=24, shared_expert_intermediate_size=40, intermediate_size=72,
        decoder_sparse_step=2, full_attention_interval=2, linear_conv_kernel_dim=3,
    ),
    # Dense MLP via mlp_only_layers; 2 linear + 1 full; GQA 3:1; tied embeddings; K=5.
    "mlp_only": TinySpec(
        vocab_size=900, hidden_size=64, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=2, head_dim=24, linear_num_key_heads=3, linear_num_value_heads=6,
        linear_key_head_dim=16, linear_value_head_dim=24, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
        norm_topk_prob=False, mlp_only_layers=(0, 2), full_attention_interval=3,
        tie_word_embeddings=True, linear_conv_kernel_dim=5,
    ),
    # 7 layers (pattern 3+1 cut short), GQA 4:1, Hv = 2 Hk, last layer dense, rope on half
    # the head dims, short context.
    "seven": TinySpec(
        vocab_size=1100, hidden_size=80, num_hidden_layers=7, num_attention_heads=8,
        num_key_value_heads=2, head_dim=24, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=16, linear_value_head_dim=16, num_experts=12, num_experts_per_tok=3,
        moe_intermediate_size=24, shared_expert_intermediate_size=40, intermediate_size=100,
        mlp_only_layers=(6,), partial_rotary_factor=0.5, rope_theta=1_000_000.0,
        max_position_embeddings=512,
    ),
    # Attention biases, adjacent attention layers, top-k == num_experts, Hv = 4 Hk.
    "bias": TinySpec(
        vocab_size=600, hidden_size=56, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=40, linear_num_key_heads=1, linear_num_value_heads=4,
        linear_key_head_dim=24, linear_value_head_dim=16, num_experts=4, num_experts_per_tok=4,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, intermediate_size=64,
        attention_bias=True, layer_types=(_L, _F, _F, _L),
    ),
}


def config_dict(spec: TinySpec, *, dtype: str = "float32", fp8_block: int | None = None) -> dict:
    """The config.json written for `spec` (Hub-style keys, special-token ids at the vocab end)."""
    if spec.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size {spec.vocab_size} < 256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1")
    ids = _special_ids(spec.vocab_size)
    cfg = {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "attention_bias": spec.attention_bias, "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "decoder_sparse_step": spec.decoder_sparse_step, "head_dim": spec.head_dim,
        "hidden_act": "silu", "hidden_size": spec.hidden_size, "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "linear_conv_kernel_dim": spec.linear_conv_kernel_dim,
        "linear_key_head_dim": spec.linear_key_head_dim,
        "linear_num_key_heads": spec.linear_num_key_heads,
        "linear_num_value_heads": spec.linear_num_value_heads,
        "linear_value_head_dim": spec.linear_value_head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "mlp_only_layers": list(spec.mlp_only_layers),
        "moe_intermediate_size": spec.moe_intermediate_size, "norm_topk_prob": spec.norm_topk_prob,
        "num_attention_heads": spec.num_attention_heads, "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.num_experts_per_tok, "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads, "output_router_logits": False,
        "partial_rotary_factor": spec.partial_rotary_factor, "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": None, "rope_theta": spec.rope_theta, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
        "tie_word_embeddings": spec.tie_word_embeddings, "torch_dtype": dtype,
        "use_cache": True, "use_sliding_window": False, "vocab_size": spec.vocab_size,
    }
    if spec.layer_types is None:
        cfg["full_attention_interval"] = spec.full_attention_interval
    else:
        cfg["layer_types"] = list(spec.layer_types)
    if fp8_block is not None:
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [fp8_block, fp8_block],
            "modules_to_not_convert": None,  # filled by write_tiny_checkpoint
        }
    return dict(sorted(cfg.items()))


def _special_ids(vocab_size: int) -> dict[str, int]:
    """Special tokens follow the BPE vocabulary, which fills the rest of vocab_size."""
    first = vocab_size - len(SPECIAL_TOKENS)
    return {tok: first + i for i, (tok, _) in enumerate(SPECIAL_TOKENS)}


def mtp_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A plausible Qwen3-Next MTP block: fc [H, 2H], three norms, one attention+MoE layer."""
    H = config.hidden_size
    out = {"mtp.fc.weight": (H, 2 * H), "mtp.norm.weight": (H,),
           "mtp.pre_fc_norm_embedding.weight": (H,), "mtp.pre_fc_norm_hidden.weight": (H,)}
    return out | layer_tensors(config, "mtp.layers.0.", "full_attention", config.num_experts > 0)


def _init(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random fp32 values that keep the model numerically sane and exercise every weight."""
    if name.endswith("linear_attn.norm.weight"):  # gated norm: w * x_hat, around 1
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    if name.endswith("norm.weight") or name.endswith("norm_embedding.weight") or name.endswith("norm_hidden.weight"):
        return 0.05 * torch.randn(shape, generator=g)  # zero-centred: x_hat * (1 + w)
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(1.0, 16.0, generator=g).log()
    if name.endswith("dt_bias"):
        return torch.ones(shape)
    if name.endswith("conv1d.weight"):  # PyTorch's default bound 1/sqrt(fan_in), fan_in = K
        bound = 1.0 / math.sqrt(shape[-1])
        return torch.empty(shape).uniform_(-bound, bound, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] fp32 -> (float8_e4m3fn [out, in], scale_inv fp32 [ceil(out/b), ceil(in/b)])."""
    out, inp = w.shape
    so, si = math.ceil(out / block), math.ceil(inp / block)
    padded = torch.zeros(so * block, si * block)
    padded[:out, :inp] = w
    blocks = padded.view(so, block, si, block)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / torch.finfo(torch.float8_e4m3fn).max, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).view(so * block, si * block)[:out, :inp]
    return q.to(torch.float8_e4m3fn), scale


def _not_converted(config: ModelConfig) -> list[str]:
    """Modules kept in `dtype` in an FP8 checkpoint: embeddings, lm_head, routers, shared gates."""
    names = ["model.embed_tokens", "lm_head"]
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            names += [f"model.layers.{i}.mlp.gate", f"model.layers.{i}.mlp.shared_expert_gate"]
    return names


def write_tiny_checkpoint(
    out_dir: Path | str,
    spec: TinySpec,
    *,
    seed: int = 0,
    dtype: str = "float32",
    shard_max_bytes: int = 2 * 1024 * 1024,
    fp8_block: int | None = None,
) -> Path:
    """Write a random checkpoint for `spec` to `out_dir` (absent or empty) and return it.

    dtype: "float32" | "bfloat16" for every tensor except, with `fp8_block`, the 2-D linear
    weights (not embeddings, lm_head, routers, shared-expert gates), which are stored as
    float8_e4m3fn with fp32 `*_scale_inv` per fp8_block x fp8_block block. The fp32 values
    drawn for a given spec + seed are the same whatever dtype/fp8_block.
    Written to a temporary sibling and renamed into place.
    """
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype {dtype!r}; valid: 'float32', 'bfloat16'")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        cfg = config_dict(spec, dtype=dtype, fp8_block=fp8_block)
        _write_json(tmp / "config.json", cfg)
        config = load_model_config(tmp)  # validates the spec
        if fp8_block is not None:
            cfg["quantization_config"]["modules_to_not_convert"] = _not_converted(config)
            _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": config.bos_token_id, "do_sample": True,
            "eos_token_id": [config.eos_token_id[0], config.pad_token_id],
            "pad_token_id": config.pad_token_id, "temperature": 1.0, "top_k": 40, "top_p": 0.95,
        })
        _write_tensors(tmp, config, seed, torch_dtype, shard_max_bytes, fp8_block)
        _write_tokenizer(tmp, spec.vocab_size, spec.max_position_embeddings)
        _write_json(tmp / MARKER_FILE, _marker(spec, seed, dtype, shard_max_bytes, fp8_block))
        for f in tmp.iterdir():  # mkdtemp and safetensors create owner-only files
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny checkpoint %s", out_dir)
    return out_dir


def _marker(spec: TinySpec, seed: int, dtype: str, shard_max_bytes: int, fp8_block: int | None) -> dict:
    marker = {"writer": "qcn.compile.export.tiny", "spec": dataclasses.asdict(spec), "seed": seed,
              "dtype": dtype, "shard_max_bytes": shard_max_bytes, "fp8_block": fp8_block}
    return json.loads(json.dumps(marker))  # as read back from disk (tuples -> lists)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _stored(name: str, shape: tuple[int, ...], dtype: torch.dtype, fp8_block: int | None,
            keep: set[str]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """What one drawn tensor becomes on disk: itself in `dtype`, or FP8 weight + fp32 block scale."""
    if fp8_block is not None and name.endswith(".weight") and len(shape) == 2 and name.rsplit(".", 1)[0] not in keep:
        scale = tuple(math.ceil(d / fp8_block) for d in shape)
        return [(name, torch.float8_e4m3fn, shape), (name + "_scale_inv", torch.float32, scale)]
    return [(name, dtype, shape)]


def _write_tensors(out: Path, config: ModelConfig, seed: int, dtype: torch.dtype,
                   shard_max_bytes: int, fp8_block: int | None) -> None:
    """Draw every tensor in a fixed order and stream it into its shard at once: the shard layout
    is planned from shapes alone, so peak memory is one tensor (fp32), whatever the model size."""
    keep = set(_not_converted(config))
    drawn = expected_tensors(config) | mtp_tensors(config)
    stored = [e for name, shape in drawn.items() for e in _stored(name, shape, dtype, fp8_block, keep)]
    shards: list[dict[str, tuple[torch.dtype, tuple[int, ...]]]] = [{}]
    size = 0
    for name, dt, shape in stored:  # greedy, in draw order
        nbytes = math.prod(shape) * dt.itemsize
        if shards[-1] and size + nbytes > shard_max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (dt, shape)
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    shard_of = {n: k for k, shard in enumerate(shards) for n in shard}

    g = torch.Generator().manual_seed(seed)
    writer, current = None, -1
    try:
        for name, shape in drawn.items():
            t = _init(name, shape, g)
            if len(_stored(name, shape, dtype, fp8_block, keep)) == 2:
                parts = dict(zip((name, name + "_scale_inv"), _quantize_fp8(t, fp8_block)))
            else:
                parts = {name: t.to(dtype).contiguous()}
            del t
            for n, value in parts.items():
                if shard_of[n] != current:  # shards hold consecutive runs of the draw order
                    if writer is not None:
                        writer.close()
                    current = shard_of[n]
                    writer = SafetensorsWriter(out / names[current], shards[current], metadata={"format": "pt"})
                writer.write(n, value)
            del parts
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    writer.close()
    if len(shards) == 1:
        return
    weight_map = {n: names[k] for n, k in shard_of.items()}
    total = sum(math.prod(shape) * dt.itemsize for _, dt, shape in stored)
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """The fixed training texts: CORPUS_FILES from this Python's stdlib, capped at CORPUS_BYTES."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for rel in sorted(CORPUS_FILES):
        p = stdlib / rel
        if not p.is_file():
            continue
        text = p.read_text(encoding="utf-8")[: CORPUS_BYTES - total]
        texts.append(text)
        total += len(text)
        if total >= CORPUS_BYTES:
            break
    if total < 100_000:
        raise RuntimeError(f"tokenizer corpus too small ({total} chars from {stdlib})")
    return tuple(texts)


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    return train_bpe_tokenizer(_corpus(), vocab_size)


def train_bpe_tokenizer(texts, vocab_size: int) -> str:
    """Qwen2-style byte-level BPE trained on `texts`, SPECIAL_TOKENS at ids vocab_size-22 .. vocab_size-1.

    Returns the tokenizer.json text. Raises RuntimeError when the texts are too small to fill
    the BPE part of the vocabulary (that would leave a gap before the special tokens).
    """
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)

    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != n_bpe:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {n_bpe}")
    tok.add_special_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS])
    return tok.to_str(pretty=True)


def _write_tokenizer(out: Path, vocab_size: int, max_length: int) -> None:
    write_tokenizer(out, _tokenizer_json(vocab_size), vocab_size, max_length)


def write_tokenizer(out: Path, tokenizer_json: str, vocab_size: int, max_length: int) -> None:
    """tokenizer.json + a Qwen2Tokenizer tokenizer_config.json (specials, chat template) into `out`."""
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    ids = _special_ids(vocab_size)
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": s}
                                 for t, s in SPECIAL_TOKENS},
        "additional_special_tokens": [t for t, s in SPECIAL_TOKENS if s and t not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": max_length,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    })


def _reusable(out: Path, marker: dict, spec: TinySpec, dtype: str, fp8_block: int | None) -> bool:
    """True when `out` is a valid tiny checkpoint written from the same spec and options."""
    try:
        if json.loads((out / MARKER_FILE).read_text(encoding="utf-8")) != marker:
            return False
        cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
        want = config_dict(spec, dtype=dtype, fp8_block=fp8_block)
        cfg.get("quantization_config", {}).pop("modules_to_not_convert", None)
        want.get("quantization_config", {}).pop("modules_to_not_convert", None)
        if cfg != want or not (out / "tokenizer.json").is_file():
            return False
        open_checkpoint(out).validate(load_model_config(out))
        return True
    except (OSError, ValueError):  # CheckpointError is a ValueError
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="qcn-tiny-checkpoint",
        description="Write a tiny random Qwen3-Next checkpoint (Hugging Face layout: config.json, "
                    "safetensors shards + index, mtp.* tensors, Qwen-style BPE tokenizer) for tests and demos.")
    p.add_argument("out", type=Path, metavar="OUT", help="checkpoint directory to write (or reuse)")
    p.add_argument("--spec", default="default", choices=sorted(TINY_SPECS),
                   help="named size configuration (default: %(default)s, the demo model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the stored tensors (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.add_argument("--fp8-block", type=int, default=None, metavar="B",
                   help="store 2-D linear weights as FP8 E4M3 with B x B block scales (default: off)")
    p.add_argument("--shard-max-mb", type=float, default=2.0, metavar="MB",
                   help="start a new safetensors shard past this many MiB (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="rewrite OUT even if it already holds a matching checkpoint, and replace a "
                        "non-empty OUT that qcn-tiny-checkpoint did not write")
    a = p.parse_args(argv)
    spec, out = TINY_SPECS[a.spec], a.out
    shard_max_bytes = int(a.shard_max_mb * 1024 * 1024)
    marker = _marker(spec, a.seed, a.dtype, shard_max_bytes, a.fp8_block)
    if not a.force and _reusable(out, marker, spec, a.dtype, a.fp8_block):
        print(f"reused existing tiny checkpoint {out} (spec {a.spec}, seed {a.seed}, {a.dtype})")
        return 0
    if out.exists() and any(out.iterdir()) and not a.force and not (out / MARKER_FILE).is_file():
        print(f"error: {out} is not empty and was not written by qcn-tiny-checkpoint; use --force", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    staging = out.with_name(f".{out.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_tiny_checkpoint(staging, spec, seed=a.seed, dtype=a.dtype,
                              shard_max_bytes=shard_max_bytes, fp8_block=a.fp8_block)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if out.exists():  # swap: old out aside, new into place, old removed
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
    print(f"wrote tiny checkpoint {out} (spec {a.spec}, seed {a.seed}, {a.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
