"""FP8 experts (contract 3): ``qcn::MoE`` with weight_format "float" -> weight_format "fp8":
the routed experts' ``gate_up`` [E, 2I, H] / ``down`` [E, H, I] and the shared expert's
``shared_gate_up`` [2Is, H] / ``shared_down`` [H, Is] become float8_e4m3fn with fp32 scales
``<name>_scale`` [..., R, G] (inputs 7..10 of the node): G = 1, one scale per output row
(``quantization.fp8_granularity: channel``, the MoE kernels' FP8 format), or G = ceil(K/128),
1x128 blocks along each row's K (``block128``). The router, the shared-expert gate and x stay
in the activation dtype; the experts compute on the dequantized weights (weight-only FP8, as
the kernels do: no activation scales). The new node calls the op's "fp8" function overload
(plugins/moe/op.py), added to the model once; float MoE nodes the rule refuses keep theirs.

Runs when ``quantization.experts: fp8``. Not rewritten (refused): a weight that is not a float
constant initializer of the expected rank.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch

from ...plugins.moe import op as moe_op
from ..base import ContextRule, attr, refuse
from ..plan import ALL_MODULES, PassSpec
from . import fp8

PASS = "fp8_experts"
RANKS = {"gate_up": 3, "down": 3, "shared_gate_up": 2, "shared_down": 2}


def quantize_rows(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, K] -> (q float8_e4m3fn [..., R, K], scale fp32 [..., R, G])."""
    w = w.float()
    K = w.shape[-1]
    if granularity == "channel":
        amax = w.abs().amax(dim=-1, keepdim=True)
        B = K
    elif granularity == "block128":
        G = math.ceil(K / fp8.BLOCK)
        padded = torch.nn.functional.pad(w.abs(), (0, G * fp8.BLOCK - K))
        amax = padded.reshape(*w.shape[:-1], G, fp8.BLOCK).amax(dim=-1)
        B = fp8.BLOCK
    else:
        raise ValueError(f"FP8 granularity {granularity!r}: choose one of {list(fp8.GRANULARITIES)}")
    s = torch.where(amax > 0, amax / fp8.FP8_MAX, torch.ones_like(amax))
    q = fp8.quantize(w, s.repeat_interleave(B, dim=-1)[..., :K])
    return q, s


class Fp8Experts(ContextRule):
    root_domain, root_op = "qcn", "MoE"
    graph_only = True

    pass_name = PASS

    def __init__(self, ctx):
        super().__init__(ctx)
        self._model = None

    def pattern(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        return op.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, _domain="qcn",
                      _allow_other_inputs=True)

    def candidate(self, context, **_) -> bool:
        return attr(context.root, "weight_format", "float") == "float"

    def check_node(self, context, **values):
        self._model = context.model
        for name, rank in RANKS.items():
            v = values[name]
            if v.const_value is None or not v.is_initializer():
                return refuse(f"{name} {v.name!r} is not a constant initializer")
            if v.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16) or v.shape is None \
                    or len(v.shape) != rank:
                return refuse(f"{name} {v.name!r}: {v.dtype} rank {None if v.shape is None else len(v.shape)} "
                              f"(need a float rank-{rank} tensor)")
        return {}

    def rewrite(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        node = self._root
        self._install_body()
        g = self.ctx.quant.fp8_granularity
        qs, scales = [], []
        for v in (gate_up, down, shared_gate_up, shared_down):
            q, s = quantize_rows(self.ctx.weights.torch(v), g)
            qs.append(self.ctx.weights.add(op, f"{v.name}.fp8", q))
            scales.append(self.ctx.weights.add(op, f"{v.name}.fp8_scale", s))
        y = op.MoE(x, router_weight, *qs, shared_gate, *scales, _domain="qcn", top_k=attr(node, "top_k"),
                   norm_topk_prob=attr(node, "norm_topk_prob", 1), weight_format="fp8")
        y.producer().overload = moe_op.overload("fp8")
        y.shape, y.type = node.outputs[0].shape, node.outputs[0].type
        return self.count_rewrite(op, y, set())

    def _install_body(self) -> None:
        key = (moe_op.DOMAIN, moe_op.OP_NAME, moe_op.overload("fp8"))
        if key not in self._model.functions:
            opset = self._model.opset_imports.get("", 23)
            self._model.functions[key] = ir.serde.deserialize_function(moe_op.function_proto(opset, "fp8"))


SPEC = PassSpec(
    PASS, Fp8Experts, ALL_MODULES, ("qcn", "MoE"),
    "qcn::MoE float -> fp8 experts (routed + shared; E4M3 weights, per-row or 1x128 scales; weight-only)",
    wanted=lambda q: None if q.experts == "fp8" else f"quantization.experts is {q.experts!r}",
    provides=(("experts", "fp8"),),
)
