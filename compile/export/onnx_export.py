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

from ..artifacts import raise_if_interrupted
from ..plugins.gated_deltanet.op import VERIFY_OP
from ..plugins.onnx_function import DOMAIN, DOMAIN_VERSION
from ..plugins.registry import OPS
from .config import ModelConfig
from .fp8 import emit_fp8, emit_fp8_moe, initializer_names, kept_fp8
from .modeling import QcnModel, RopeTables
from .mtp import MTP_INPUTS, MTP_OUTPUTS, MtpModel
from .weights_file import WeightsWriter

log = logging.getLogger(__name__)

# torch.onnx's op registry logs one warning per torchvision op when torchvision is absent (it is not
# a dependency of qcn, and no qcn graph uses it): keep that chatter away from users.
logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(
    lambda record: not record.getMessage().startswith("torchvision is not installed")
)

# the op registry's rows (plugins/registry.py), and the GatedDeltaNet verify form (no plugin of its own)
QCN_OPS = tuple(e.export for e in OPS) + (VERIFY_OP,)
WEIGHTS_FILE = "weights.bin"
GRAPHS = ("prefill", "decode")
MTP_GRAPHS = ("verify", "mtp")  # exported when the checkpoint has an MTP head (docs/MTP.md)
HIDDEN_OUTPUT = "hidden"  # prefill/decode/verify: [batch, tokens, H] after the final norm, the MTP head's input


def per_token_output(s: "StateTensor") -> str:
    """The verify graph's output holding carried state `s` after every token."""
    return "per_token." + s.output[len("present."):]
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
            raise_if_interrupted()  # a Ctrl-C that a finalizer swallowed stops the export here
            self.attach_value(value, out_dir)

    def attach_value(self, value: ir.Value, out_dir: Path) -> None:
        """Point one initializer `value` at its bytes in weights.bin (writing them the first time)."""
        loc = self.writer.locations.get(value.name) or self._write(value.name, [d for d in value.shape])
        value.const_value = loc.ir_tensor(value, base_dir=out_dir)


def _trace(model: QcnModel, layout, dynamic_tokens: bool, opset: int) -> ir.Model:
    act = model.act_dtype
    args = _example_inputs(model.cfg, layout, 3 if dynamic_tokens else 1, act)
    input_names = ["input_ids", "past_len"] + [s.input for s in layout]
    output_names = ["logits"] + [per_token_output(s) if model.verify and s.kind in ("conv_state", "recurrent_state")
                                 else s.output for s in layout]
    if model.hidden:
        output_names.append(HIDDEN_OUTPUT)
    return _export(model, args, input_names, output_names, _dynamic_shapes(layout, dynamic_tokens), opset)


def mtp_state_layout(cfg: ModelConfig, act_dtype: str) -> list[StateTensor]:
    """The MTP graph's own KV cache (layer index = num_hidden_layers, after the main layers)."""
    shape = (cfg.num_key_value_heads, "max_context", cfg.head_dim)
    L = cfg.num_hidden_layers
    return [StateTensor(L, "key", MTP_INPUTS[4], MTP_OUTPUTS[2], shape, act_dtype),
            StateTensor(L, "value", MTP_INPUTS[5], MTP_OUTPUTS[3], shape, act_dtype)]


def _trace_mtp(model: MtpModel, opset: int) -> ir.Model:
    cfg, act = model.cfg, model.act_dtype
    B, T, P = 2, 3, 5
    kv = (B, cfg.num_key_value_heads, P, cfg.head_dim)
    args = (torch.zeros(B, T, dtype=torch.int64, device="meta"), torch.zeros(B, T, cfg.hidden_size, dtype=act, device="meta"),
            torch.zeros(B, dtype=torch.int64, device="meta"), torch.zeros(B, dtype=torch.int64, device="meta"),
            torch.zeros(kv, dtype=act, device="meta"), torch.zeros(kv, dtype=act, device="meta"))
    batch, tokens, past = torch.export.Dim("batch"), torch.export.Dim("tokens"), torch.export.Dim("past")
    dyn = ({0: batch, 1: tokens}, {0: batch, 1: tokens}, {0: batch}, {0: batch}, {0: batch, 2: past}, {0: batch, 2: past})
    return _export(model, args, list(MTP_INPUTS), list(MTP_OUTPUTS), dyn, opset)


def _export(model, args, input_names, output_names, dynamic_shapes, opset: int) -> ir.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, args, dynamo=True, optimize=False, opset_version=opset, verbose=False,
            dynamic_shapes=dynamic_shapes,
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
    if any(n.domain == DOMAIN and n.op_type == "MoE" and n.overload == "fp8" for n in proto.graph.node):
        from ..plugins.moe.op import function_proto as moe_function  # the official FP8 release's experts (fp8.py)

        proto.functions.append(moe_function(opset, "fp8"))
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    del proto.metadata_props[:]
    return proto


def export_graphs(cfg: ModelConfig, checkpoint, rope: RopeTables, out_dir: Path, *, activation_dtype: str,
                  logits: str, opset: int, progress: bool = False, allow_nonfinite: bool = False,
                  fp8_roles: frozenset[str] = frozenset(), mtp: bool = False) -> dict[str, Path]:
    """Write prefill.onnx, decode.onnx and weights.bin into `out_dir`; return the graph paths.
    With `mtp` (the checkpoint has an MTP head) also verify.onnx (the target model scoring
    drafts: logits of every token and the GatedDeltaNet states after every token) and mtp.onnx
    (the draft head, `compile/export/mtp.py`), and prefill/decode/verify get the `hidden` output.

    `fp8_roles` (fp8.fp8_roles of the recipe): weights of these roles that the checkpoint
    stores as FP8 blocks (the official FP8 release) are exported as their FP8 bytes plus
    1 x b block scales behind a DequantizeLinear (fp8.py); the rest are dequantized on load.

    Weights stream from the checkpoint into weights.bin one tensor (one expert of a stacked
    expert tensor) at a time: peak memory is set by the largest tensor, not by the model.
    NaN/Inf in a weight raises `NonFiniteWeightError` naming it, unless `allow_nonfinite`."""
    if activation_dtype not in DTYPES:
        raise ValueError(f"activation dtype {activation_dtype!r}; valid: {tuple(DTYPES)}")
    layout = state_layout(cfg, activation_dtype)
    act = DTYPES[activation_dtype]
    model = QcnModel(cfg, rope, act, logits=logits, device="meta", hidden=mtp).eval()
    paths = {}
    with WeightsWriter(out_dir / WEIGHTS_FILE, allow_nonfinite=allow_nonfinite) as writer:
        kept = kept_fp8(model.specs, checkpoint, fp8_roles)
        source = InitializerSource(writer, model, checkpoint, rope, progress, fp8=kept)
        for graph in GRAPHS + (MTP_GRAPHS if mtp else ()):
            log.info("exporting %s graph", graph)
            if graph == "mtp":  # the head's weights are dequantized on load (FP8 blocks kept only in the main graphs)
                mtp_model = MtpModel(cfg, rope, act, device="meta").eval()
                ir_model = _trace_mtp(mtp_model, opset)
                InitializerSource(writer, mtp_model, checkpoint, rope, progress).attach(ir_model, out_dir)
            else:
                m = model if graph in GRAPHS else QcnModel(cfg, rope, act, logits="all", device="meta", hidden=True,
                                                           verify=True).eval()
                ir_model = _trace(m, layout, dynamic_tokens=(graph != "decode"), opset=opset)
                if kept:
                    attach = lambda v: source.attach_value(v, out_dir)  # noqa: E731
                    emit_fp8(ir_model, kept, checkpoint.block_size[1], activation_dtype, opset, attach=attach)
                    emit_fp8_moe(ir_model, kept, activation_dtype, attach=attach)
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
