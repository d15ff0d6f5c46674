"""Lazy access to a Qwen3-Next safetensors checkpoint in the Hugging Face on-disk layout.

`open_checkpoint(dir)` reads only the shard headers; `Checkpoint.get(name)` loads one tensor
(FP8 block weights dequantized). `expected_tensors(config)` is the on-disk layout as data:
per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` and interleaved `in_proj_qkvz`,
exactly as the Hub stores them (transformers stacks experts on load; we do not).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CheckpointError, ModelConfig

__all__ = ["TensorInfo", "Checkpoint", "open_checkpoint", "expected_tensors", "layer_tensors", "CheckpointError",
           "SafetensorsWriter"]

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # "X.weight_scale_inv" scales "X.weight"
MTP_PREFIX = "mtp."

_DTYPES = {  # safetensors header dtype -> torch dtype
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
}


# safetensors' own dtype order: save_file lays tensors out by descending dtype, then by name
_WRITE_ORDER = {torch.float8_e4m3fn: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
_NAMES = {v: k for k, v in _DTYPES.items()} | {torch.float16: "F16"}


class SafetensorsWriter:
    """One safetensors file written tensor by tensor, in any order, in bounded memory.

    The layout (name -> (dtype, shape)) is known before any data exists, so the header and
    every tensor's offset are fixed up front; `write(name, t)` puts `t`'s bytes at its offset
    and the caller can drop `t` at once. The file is byte-identical to
    `safetensors.torch.save_file` of the same tensors. `close()` checks that every tensor was
    written (use as a context manager)."""

    def __init__(self, path: Path | str, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        for name, (dtype, _) in layout.items():
            if dtype not in _WRITE_ORDER:
                raise ValueError(f"tensor {name}: dtype {dtype}; valid: {sorted(map(str, _WRITE_ORDER))}")
        order = sorted(layout, key=lambda n: (-_WRITE_ORDER[layout[n][0]], n))
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        end = 0
        for name in order:
            dtype, shape = layout[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [end, end + nbytes]}
            self._slots[name] = (end, nbytes, dtype, tuple(shape))
            end += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._base = 8 + len(raw)
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._f.truncate(self._base + end)
        self._pending = set(layout)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, nbytes, dtype, shape = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name}: layout says {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        self._f.seek(self._base + offset)
        if nbytes:
            self._f.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
        self._pending.discard(name)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors never written: {sorted(self._pending)[:8]}")

    def abort(self) -> None:
        """Close without the completeness check (the caller discards the file)."""
        self._f.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close() if exc_type is None else self.abort()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: where it lives, its on-disk dtype and shape."""

    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]


def layer_tensors(config: ModelConfig, prefix: str, layer_type: str, moe: bool) -> dict[str, tuple[int, ...]]:
    """On-disk tensors of one decoder layer under `prefix` (e.g. "model.layers.3.")."""
    c = config
    H, D = c.hidden_size, c.head_dim
    out: dict[str, tuple[int, ...]] = {
        f"{prefix}input_layernorm.weight": (H,),
        f"{prefix}post_attention_layernorm.weight": (H,),
    }
    if layer_type == "linear_attention":
        a = f"{prefix}linear_attn."
        Hv = c.linear_num_value_heads
        out |= {
            f"{a}in_proj_qkvz.weight": (2 * c.key_dim + 2 * c.value_dim, H),  # rows interleaved per key head
            f"{a}in_proj_ba.weight": (2 * Hv, H),  # rows interleaved per key head
            f"{a}conv1d.weight": (c.conv_dim, 1, c.linear_conv_kernel_dim),  # channels q|k|v contiguous
            f"{a}dt_bias": (Hv,),
            f"{a}A_log": (Hv,),
            f"{a}norm.weight": (c.linear_value_head_dim,),
            f"{a}out_proj.weight": (H, c.value_dim),
        }
    elif layer_type == "full_attention":
        a = f"{prefix}self_attn."
        q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
        out |= {
            f"{a}q_proj.weight": (2 * q, H),  # per head [query D | gate D]
            f"{a}k_proj.weight": (kv, H),
            f"{a}v_proj.weight": (kv, H),
            f"{a}o_proj.weight": (H, q),
            f"{a}q_norm.weight": (D,),
            f"{a}k_norm.weight": (D,),
        }
        if c.attention_bias:
            out |= {f"{a}q_proj.bias": (2 * q,), f"{a}k_proj.bias": (kv,),
                    f"{a}v_proj.bias": (kv,), f"{a}o_proj.bias": (H,)}
    else:
        raise ValueError(f"unknown layer type {layer_type!r}")
    m = f"{prefix}mlp."
    if moe:
        I, Is = c.moe_intermediate_size, c.shared_expert_intermediate_size
        out[f"{m}gate.weight"] = (c.num_experts, H)
        for e in range(c.num_experts):
            out |= {f"{m}experts.{e}.gate_proj.weight": (I, H), f"{m}experts.{e}.up_proj.weight": (I, H),
                    f"{m}experts.{e}.down_proj.weight": (H, I)}
        out |= {f"{m}shared_expert.gate_proj.weight": (Is, H), f"{m}shared_expert.up_proj.weight": (Is, H),
                f"{m}shared_expert.down_proj.weight": (H, Is), f"{m}shared_expert_gate.weight": (1, H)}
    else:
        Id = c.intermediate_size
        out |= {f"{m}gate_proj.weight": (Id, H), f"{m}up_proj.weight": (Id, H), f"{m}down_proj.weight": (H, Id)}
    return out


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every decoder tensor the checkpoint must hold on disk -> shape (mtp.* not included)."""
    V, H = config.vocab_size, config.hidden_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i, kind in enumerate(config.layer_types):
        out |= layer_tensors(config, f"model.layers.{i}.", kind, config.is_moe_layer(i))
    out["model.norm.weight"] = (H,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    return out


def _read_header(file: Path) -> dict:
    """Parse a safetensors header and check the file holds all the data it announces."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file: header of {n} bytes "
                                      f"but the file has {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors header: {e}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise CheckpointError(f"{file}: truncated safetensors file: {size} bytes, header says data ends "
                              f"at byte {8 + n + end}")
    return header


class Checkpoint:
    """Lazily-read checkpoint. Build with `open_checkpoint`.

    `names()` are the model tensors (no `mtp.*`, no FP8 `*_scale_inv`); `mtp_names` the
    multi-token-prediction tensors kept aside; `get` loads any of them, `get_raw` any tensor
    (scales included) as stored.
    """

    def __init__(self, directory: Path, infos: dict[str, TensorInfo], block_size: tuple[int, int] | None):
        self.directory = directory
        self._infos = infos
        self._block_size = block_size
        self._handles: dict[Path, object] = {}
        self._scales = {n[: -len(SCALE_SUFFIX)]: n for n in infos if n.endswith(".weight" + SCALE_SUFFIX)}
        self.mtp_names: list[str] = sorted(n for n in infos if n.startswith(MTP_PREFIX) and n not in self._scales.values())
        self._names = sorted(n for n in infos if not n.startswith(MTP_PREFIX) and n not in self._scales.values())
        for w, s in self._scales.items():
            if w not in infos:
                raise CheckpointError(f"{infos[s].file}: scale tensor {s} has no weight {w}")
            self._check_block_scale(w)
        for n, info in infos.items():
            if info.dtype == "F8_E4M3" and n not in self._scales:
                raise CheckpointError(f"{info.file}: float8 tensor {n} has no {n}{SCALE_SUFFIX} block scale")
        if self.mtp_names:
            logger.info("%s: %d mtp.* tensors kept aside (not part of the decoder), e.g. %s",
                        directory, len(self.mtp_names), ", ".join(self.mtp_names[:3]))

    def _check_block_scale(self, name: str) -> None:
        w, s = self._infos[name], self._infos[self._scales[name]]
        if self._block_size is None:
            raise CheckpointError(f"{s.file}: {s.name} is an FP8 block scale but config.json has no "
                                  "quantization_config.weight_block_size")
        if len(w.shape) != 2:
            raise CheckpointError(f"{w.file}: block-quantized {name} has shape {list(w.shape)}; valid: 2-D")
        want = tuple(math.ceil(d / b) for d, b in zip(w.shape, self._block_size))
        if s.shape != want:
            raise CheckpointError(f"{s.file}: {s.name}: expected {list(want)} (weight {list(w.shape)}, block "
                                  f"{list(self._block_size)}), found {list(s.shape)}")

    def names(self) -> list[str]:
        """Model tensor names, sorted."""
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor {name!r} in the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """On-disk dtype (float8_e4m3fn for FP8 block weights)."""
        info = self.info(name)
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; valid: {sorted(_DTYPES)}")
        return _DTYPES[info.dtype]

    def scale_name(self, name: str) -> str | None:
        """The `*_scale_inv` tensor of an FP8 block weight, else None."""
        return self._scales.get(name)

    @property
    def block_size(self) -> tuple[int, int] | None:
        return self._block_size

    def get_raw(self, name: str) -> torch.Tensor:
        """One tensor exactly as stored (any name, scales included)."""
        info = self.info(name)
        self.dtype(name)
        handle = self._handles.get(info.file)
        try:
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            return handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error type
            raise CheckpointError(f"{info.file}: cannot read tensor {name}: {e}") from None

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor converted to `dtype`; FP8 block weights [out, in] are dequantized as
        weight.float() * scale_inv[out // b0, in // b1] (ragged edge blocks cropped)."""
        t = self.get_raw(name)
        scale = self._scales.get(name)
        if scale is None:
            return t.to(dtype)
        s = self.get_raw(scale).float()
        b0, b1 = self._block_size
        out, inp = t.shape
        s = s.repeat_interleave(b0, dim=0)[:out].repeat_interleave(b1, dim=1)[:, :inp]
        return (t.float() * s).to(dtype)

    def validate(self, config: ModelConfig) -> None:
        """Raise one CheckpointError listing every missing, mis-shaped or unexpected tensor."""
        expected = expected_tensors(config)
        problems = []
        for name, shape in expected.items():
            if name not in self._infos:
                problems.append(f"{name}: expected {list(shape)}, missing")
            elif self._infos[name].shape != shape:
                problems.append(f"{name}: expected {list(shape)}, found {list(self._infos[name].shape)}")
            elif self._infos[name].dtype not in _DTYPES:
                problems.append(f"{name}: dtype {self._infos[name].dtype} not supported; valid: {sorted(_DTYPES)}")
        tied_lm_head = config.tie_word_embeddings and self._infos.get("lm_head.weight") and \
            self._infos["lm_head.weight"].shape == (config.vocab_size, config.hidden_size)
        for name in self._names:
            if name not in expected and not (name == "lm_head.weight" and tied_lm_head):
                problems.append(f"{name}: unexpected tensor, found {list(self._infos[name].shape)}")
        if problems:
            raise CheckpointError(f"{self.directory}: checkpoint does not match config.json "
                                  f"({len(problems)} problems):\n  " + "\n  ".join(problems))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Open a checkpoint directory (index + shards, or a single model.safetensors).

    Reads shard headers only. Raises CheckpointError for a missing shard (naming the tensors
    it should hold), a truncated or corrupt shard, or an index that disagrees with a shard.
    """
    directory = Path(path)
    index_file, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a safetensors index with a 'weight_map': {e}") from None
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
    elif single.is_file():
        by_file = {SINGLE_FILE: None}
    else:
        raise CheckpointError(f"{directory}: no {INDEX_FILE} and no {SINGLE_FILE}")

    missing = [f for f in by_file if not (directory / f).is_file()]
    if missing:
        lines = [f"{f} (should hold {len(by_file[f])} tensors: {', '.join(sorted(by_file[f])[:8])}"
                 f"{', ...' if len(by_file[f]) > 8 else ''})" for f in missing]
        raise CheckpointError(f"{directory}: missing shard file(s) listed in {INDEX_FILE}:\n  " + "\n  ".join(lines))

    infos: dict[str, TensorInfo] = {}
    for fname, listed in by_file.items():
        file = directory / fname
        _read_header(file)
        try:
            with safe_open(str(file), framework="pt") as f:
                entries = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        except Exception as e:  # SafetensorError
            raise CheckpointError(f"{file}: corrupt safetensors file: {e}") from None
        names = entries if listed is None else listed
        absent = [n for n in names if n not in entries]
        if absent:
            raise CheckpointError(f"{file}: {INDEX_FILE} lists {len(absent)} tensors that the shard does not hold: "
                                  f"{', '.join(sorted(absent)[:8])}")
        extra = set(entries) - set(names)
        if extra:
            logger.warning("%s: %d tensors not in %s are ignored: %s", file, len(extra), INDEX_FILE, sorted(extra)[:8])
        for n in names:
            infos[n] = TensorInfo(n, file, *entries[n])
    return Checkpoint(directory, infos, _block_size(directory) if any(
        n.endswith(SCALE_SUFFIX) for n in infos) else None)


def _block_size(directory: Path) -> tuple[int, int] | None:
    """quantization_config.weight_block_size from config.json, without the full config."""
    try:
        q = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
        b = q.get("weight_block_size")
        return (int(b[0]), int(b[1])) if b else None
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return None
