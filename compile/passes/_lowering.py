"""Shared machinery of the plugin-lowering passes (onnxscript-rewriter style, on onnx protos).

A pass matches one ``qcn`` op (``pattern``: domain + op_type), ``check``s each match against
what the TensorRT plugin registrations support (static sizes, dtypes, attributes) and either
``rewrite``s it into the plugin node(s) or refuses and leaves it alone -- a refused node keeps
its ONNX function body, which TensorRT's parser then inlines. Every pass returns a
:class:`PassResult` with the counts of what it matched, rewrote and refused (and why).

Plugin nodes (TensorRT's ONNX parser maps an unknown op to a registered plugin of the same
name): op_type = the plugin name, domain :data:`PLUGIN_DOMAIN`, attributes
``plugin_namespace`` (the registration's namespace), ``plugin_version`` "1" and ``aot`` 1 (use
the ``aot_impl``, i.e. PTX embedded in the engine), plus the plugin's own attributes.
NOT EXECUTED: no full TensorRT here, so that the parser accepts exactly these nodes has never
been observed; the conventions follow TensorRT's quickly-deployable-plugin documentation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import TensorProto, helper

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_VERSION = "1"
ACT_DTYPES = {TensorProto.BFLOAT16: "bf16", TensorProto.FLOAT16: "fp16", TensorProto.FLOAT: "fp32"}


@dataclass(frozen=True)
class TensorInfo:
    dtype: int | None          # TensorProto elem type, None when unknown
    shape: tuple | None        # ints for static dims, None for symbolic ones; None when rank unknown


@dataclass
class Check:
    ok: bool
    reason: str = ""
    config: dict = field(default_factory=dict)  # what the plugin registration must be given

    @classmethod
    def refuse(cls, reason: str) -> "Check":
        return cls(False, reason)


@dataclass
class PassResult:
    pass_name: str
    matched: int = 0
    rewritten: int = 0
    refused: list = field(default_factory=list)      # [(node name, reason)]
    plugin_nodes: int = 0
    plugins: set = field(default_factory=set)        # plugin ids ("ns::name") the rewritten graph uses
    config: dict | None = None                       # registration config (None: nothing rewritten)

    def counts(self) -> dict[str, int]:
        return {"matched": self.matched, "rewritten": self.rewritten, "refused": len(self.refused),
                "plugin_nodes": self.plugin_nodes}


class GraphContext:
    """Dtypes/shapes of the graph's tensors (after onnx shape inference) and fresh names."""

    def __init__(self, model: onnx.ModelProto):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001 - shape inference is best effort
            inferred = model
        g = inferred.graph
        self.info: dict[str, TensorInfo] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            t = vi.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim) \
                if t.HasField("shape") else None
            self.info[vi.name] = TensorInfo(t.elem_type or None, shape)
        for init in g.initializer:
            self.info[init.name] = TensorInfo(init.data_type, tuple(init.dims))
        taken = {n for node in model.graph.node for n in list(node.input) + list(node.output)} | set(self.info)
        self._taken = taken
        self._ids = itertools.count()

    def get(self, name: str) -> TensorInfo:
        return self.info.get(name, TensorInfo(None, None))

    def fresh(self, hint: str) -> str:
        while True:
            n = f"{hint}__{next(self._ids)}"
            if n not in self._taken:
                self._taken.add(n)
                return n


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def plugin_node(name: str, namespace: str, inputs, outputs, node_name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(name, list(inputs), list(outputs), name=node_name, domain=PLUGIN_DOMAIN,
                            plugin_namespace=namespace, plugin_version=PLUGIN_VERSION, aot=1, **attrs)


def static_dims(info: TensorInfo, rank: int, what: str, static: tuple[int, ...]) -> tuple | str:
    """The shape if it has ``rank`` dims and the ``static`` axes are known; else a refusal reason."""
    if info.shape is None or len(info.shape) != rank:
        return f"{what}: rank {None if info.shape is None else len(info.shape)} (need {rank}, known)"
    unknown = [ax for ax in static if info.shape[ax] is None]
    if unknown:
        return f"{what}: axes {unknown} of {list(info.shape)} are not static (the AOT kernels compile sizes in)"
    return info.shape


class LoweringPass:
    """pattern / check / rewrite over one graph; subclasses set op_type, name, and implement both."""

    domain = "qcn"
    op_type = ""
    name = ""

    def __init__(self, config: dict | None = None):
        # plugins are registered once per process with one config: the first accepted node fixes it
        self.fixed_config = config

    def check(self, node: onnx.NodeProto, ctx: GraphContext) -> Check:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, ctx: GraphContext, config: dict) -> tuple[list[onnx.NodeProto], set]:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto, ctx: GraphContext | None = None) -> PassResult:
        """Rewrites ``model`` in place (nodes keep their positions, so the order stays topological)."""
        ctx = ctx or GraphContext(model)
        res = PassResult(self.name, config=self.fixed_config)
        new_nodes = []
        for node in model.graph.node:
            if node.domain != self.domain or node.op_type != self.op_type:
                new_nodes.append(node)
                continue
            res.matched += 1
            c = self.check(node, ctx)
            if c.ok and res.config is not None and c.config != res.config:
                c = Check.refuse(f"config {c.config} differs from {res.config}, which the plugins are registered "
                                 "with (one registration per plugin id)")
            if not c.ok:
                res.refused.append((node.name, c.reason))
                new_nodes.append(node)
                continue
            res.config = c.config
            nodes, ids = self.rewrite(node, ctx, c.config)
            new_nodes.extend(nodes)
            res.rewritten += 1
            res.plugin_nodes += len(nodes)
            res.plugins |= ids
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        return res
