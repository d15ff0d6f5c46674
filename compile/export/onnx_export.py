"""Export QcnModel to ONNX: prefill (tokens dynamic) and decode (tokens = 1) graphs.

The model is traced on the meta device, so exporting needs no weights in memory. Weights are
then streamed from the checkpoint, one tensor at a time (stacked experts one expert at a
time), into a single external-data file (`weights.bin`, `weights_file.WeightsWriter`) that
both graphs reference. The qcn ops are emitted as opaque nodes by their
onnxscript translations; their function bodies are attached afterwards (torch's exporter
would inline functions it emitted itself).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from ..plugins.onnx_function import DOMAIN, DOMAIN_VERSION
from ..plugins.registry import OPS
from .config import ModelConfig
from .fp8 import emit_fp8, initializer_names, kept_fp8
from .modeling import QcnModel, RopeTables
from .weights_file import WeightsWriter

log = logging.getLogger(__name__)

# torch.onnx's op registry logs one warning per torchvision op when torchvision is absent (it is not
# a dependency of qcn, and no qcn graph uses it): keep that chatter away from users.
logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(
    lambda record: not record.getMessage().startswith("torchvision is not installed")
)

QCN_OPS = tuple(e.export for e in OPS)  # the op registry's rows (plugins/registry.py)
WEIGHTS_FILE = "weights.bin"
GRAPHS = ("prefill", "decode")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StateTensor:
    """One per-layer state tensor of the contract (docs/CONTRACT.md), shapes per sequence slot."""

    layer: int
    kind: str  # conv_state | recurrent_state | key | value
    input: str
    output: str
    shape: tuple  # ints, and "max_context" for the cache length
    dtype: str


def state_layout(cfg: ModelConfig, act_dtype: str) -> list[StateTensor]:
    out = []
    for i, kind in enumerate(cfg.layer_types):
        if kind == "linear_attention":
            Hv, Dk, Dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
            out.append(StateTensor(i, "conv_state", f"conv_state.{i}", f"present.conv_state.{i}",
                                   (cfg.conv_dim, cfg.linear_conv_kernel_dim - 1), act_dtype))
            out.append(StateTensor(i, "recurrent_state", f"recurrent_state.{i}", f"present.recurrent_state.{i}",
                                   (Hv, Dk, Dv), "float32"))
        else:
            shape = (cfg.num_key_value_heads, "max_context", cfg.head_dim)
            out.append(StateTensor(i, "key", f"past_key.{i}", f"new_key.{i}", shape, act_dtype))
            out.append(StateTensor(i, "value", f"past_value.{i}", f"new_value.{i}", shape, act_dtype))
    return out


def _example_inputs(cfg: ModelConfig, layout: list[StateTensor], tokens: int, act: torch.dtype):
    B, P = 2, 5
    states = []
    for s in layout:
        shape = (B, *[P if d == "max_context" else d for d in s.shape])
        states.append(torch.zeros(shape, dtype=DTYPES[s.dtype] if s.dtype in DTYPES else act, device="meta"))
    ids = torch.zeros(B, tokens, dtype=torch.int64, device="meta")
    return ids, torch.zeros(B, dtype=torch.int64, device="meta"), states


def _dynamic_shapes(layout: list[StateTensor], dynamic_tokens: bool):
    batch, tokens, past = torch.export.Dim("batch"), torch.export.Dim("tokens"), torch.export.Dim("past")
    ids = {0: batch, 1: tokens} if dynamic_tokens else {0: batch}
    states = [{0: batch, 2: past} if s.kind in ("key", "value") else {0: batch} for s in layout]
    return ids, {0: batch}, states


class InitializerSource:
    """Streams the graphs' initializers into weights.bin (a `WeightsWriter`), each written once:
    checkpoint weights chunk by chunk from the weight map, constants (RoPE tables) as they are."""

    def __init__(self, writer: WeightsWriter, model: QcnModel, checkpoint, rope: RopeTables, progress: bool = False,
                 fp8: dict | None = None):
        self.writer, self.model, self.checkpoint = writer, model, checkpoint
        self.specs = {s.name: s for s in model.specs}
        self.fp8 = initializer_names(fp8 or {})  # FP8 weights kept as the checkpoint stores them (fp8.py)
        self.constants = model.constant_tensors(rope)
        self.progress = progress

    def _write(self, name: str, shape: list[int]):
        if name in self.fp8:
            spec, part = self.fp8[name]
            if part == "weight":
                return self.writer.write(name, spec.fp8_chunks(self.checkpoint))
            scale = spec.fp8_scale(self.checkpoint)
            if list(scale.shape) != shape:
                raise ValueError(f"initializer {name}: graph expects {shape}, the weight map gives {list(scale.shape)}")
            return self.writer.write(name, scale)
        if name in self.specs:
            spec = self.specs[name]
            if list(spec.shape) != shape:
                raise ValueError(f"initializer {name}: graph expects {shape}, the weight map gives {list(spec.shape)}")
            return self.writer.write(name, spec.chunks(self.checkpoint, self.model.act_dtype))
        if name in self.constants:
            data = self.constants[name].contiguous()
            if list(data.shape) != shape:
                raise ValueError(f"initializer {name}: graph expects {shape}, got {list(data.shape)}")
            return self.writer.write(name, data)
        raise KeyError(f"initializer {name!r} is neither a weight of the weight map nor a known constant")

    def attach(self, model: ir.Model, out_dir: Path) -> None:
        from tqdm.auto import tqdm

        items = list(model.graph.initializers.items())
        for name, value in tqdm(items, desc="weights", unit="tensor", disable=not self.progress or not items):
            self.attach_value(value, out_dir)

    def attach_value(self, value: ir.Value, out_dir: Path) -> None:
        """Point one initializer `value` at its bytes in weights.bin (writing them the first time)."""
        loc = self.writer.locations.get(value.name) or self._write(value.name, [d for d in value.shape])
        value.const_value = loc.ir_tensor(value, base_dir=out_dir)


def _trace(model: QcnModel, layout, dynamic_tokens: bool, opset: int) -> ir.Model:
    act = model.act_dtype
    args = _example_inputs(model.cfg, layout, 3 if dynamic_tokens else 1, act)
    input_names = ["input_ids", "past_len"] + [s.input for s in layout]
    output_names = ["logits"] + [s.output for s in layout]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, args, dynamo=True, optimize=False, opset_version=opset, verbose=False,
            dynamic_shapes=_dynamic_shapes(layout, dynamic_tokens),
            custom_translation_table={op.torch_op: op.translation for op in QCN_OPS},
            input_names=input_names, output_names=output_names,
        )
    return program.model


def _finish(model: ir.Model, opset: int) -> onnx.ModelProto:
    import onnxscript.optimizer

    onnxscript.optimizer.optimize(model, num_iterations=2)
    proto = ir.serde.serialize_model(model)
    used = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    proto.functions.extend(op.function(opset) for op in QCN_OPS if op.name in used)
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    del proto.metadata_props[:]
    return proto


def export_graphs(cfg: ModelConfig, checkpoint, rope: RopeTables, out_dir: Path, *, activation_dtype: str,
                  logits: str, opset: int, progress: bool = False, allow_nonfinite: bool = False,
                  fp8_roles: frozenset[str] = frozenset()) -> dict[str, Path]:
    """Write prefill.onnx, decode.onnx and weights.bin into `out_dir`; return the graph paths.

    `fp8_roles` (fp8.fp8_roles of the recipe): weights of these roles that the checkpoint
    stores as FP8 blocks (the official FP8 release) are exported as their FP8 bytes plus
    1 x b block scales behind a DequantizeLinear (fp8.py); the rest are dequantized on load.

    Weights stream from the checkpoint into weights.bin one tensor (one expert of a stacked
    expert tensor) at a time: peak memory is set by the largest tensor, not by the model.
    NaN/Inf in a weight raises `NonFiniteWeightError` naming it, unless `allow_nonfinite`."""
    if activation_dtype not in DTYPES:
        raise ValueError(f"activation dtype {activation_dtype!r}; valid: {tuple(DTYPES)}")
    layout = state_layout(cfg, activation_dtype)
    model = QcnModel(cfg, rope, DTYPES[activation_dtype], logits=logits, device="meta").eval()
    paths = {}
    with WeightsWriter(out_dir / WEIGHTS_FILE, allow_nonfinite=allow_nonfinite) as writer:
        kept = kept_fp8(model.specs, checkpoint, fp8_roles)
        source = InitializerSource(writer, model, checkpoint, rope, progress, fp8=kept)
        for graph in GRAPHS:
            log.info("exporting %s graph", graph)
            ir_model = _trace(model, layout, dynamic_tokens=(graph == "prefill"), opset=opset)
            if kept:
                emit_fp8(ir_model, kept, checkpoint.block_size[1], activation_dtype, opset,
                         attach=lambda v: source.attach_value(v, out_dir))
            source.attach(ir_model, out_dir)
            writer.flush()
            proto = _finish(ir_model, opset)
            paths[graph] = out_dir / f"{graph}.onnx"
            onnx.save(proto, paths[graph])
            onnx.checker.check_model(str(paths[graph]), full_check=True)
    for name, (nan, inf) in writer.nonfinite.items():
        log.warning("weight %s holds %d NaN and %d Inf values (exported: export.allow_nonfinite is set)", name, nan, inf)
    log.info("wrote %d weight tensors, %.1f MB", len(writer.locations), writer.bytes_written / 1e6)
    return paths
