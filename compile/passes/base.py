"""What every graph pass shares: a rule base over onnxscript's rewriter, its result, and the
graph <-> IR plumbing.

A pass is one onnxscript rewrite rule (``pattern / check / rewrite`` over ``onnx_ir``) in its
own file. :class:`QcnRule` adds what the passes stage reports: every node the pattern matched,
every one the check refused (with the reason the check gave), every one rewritten, and the
registration config the rewritten nodes need (one per pass: TensorRT registers a plugin id
once per process, so the first accepted node fixes it and a node that needs another one is
refused). :func:`apply` runs one rule over an ``ir.Model`` and returns a :class:`PassResult`.

Shapes come from ONNX shape inference (:func:`to_ir`), run in strict mode: a graph whose
shapes cannot be inferred is a :class:`PassError`, not a silently weaker check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRule, RewriteRuleClassBase, RewriteRuleSet

from ..recipe import RecipeError

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_VERSION = "1"
ACT_DTYPES = {ir.DataType.BFLOAT16: "bf16", ir.DataType.FLOAT16: "fp16", ir.DataType.FLOAT: "fp32"}


class PassError(RecipeError):
    """A pass could not run on a graph (e.g. its shapes cannot be inferred); names the graph."""


@dataclass
class PassResult:
    """What one pass did to one graph."""

    pass_name: str
    matched: int = 0
    rewritten: int = 0
    refused: list = field(default_factory=list)      # [(node name, reason)]
    new_nodes: int = 0                               # nodes the rewrites emitted
    plugins: set = field(default_factory=set)        # plugin ids ("ns::name") the rewritten graph uses
    config: dict | None = None                       # registration config (None: nothing rewritten)

    @property
    def changed(self) -> bool:
        return self.rewritten > 0

    def counts(self) -> dict[str, int]:
        return {"matched": self.matched, "rewritten": self.rewritten, "refused": len(self.refused),
                "new_nodes": self.new_nodes}

    def to_dict(self) -> dict:
        return {**self.counts(), "refusals": [{"node": n, "reason": r} for n, r in self.refused],
                "plugins": sorted(self.plugins), "config": self.config}


def refuse(reason: str) -> MatchResult:
    """A failed check with its reason (what the report shows)."""
    return MatchResult().fail(reason)


class QcnRule(RewriteRuleClassBase):
    """One rule of one pass. Subclasses give ``pattern(op, ...)``, ``check_node(context, ...)``
    returning the registration config (a dict) or a refusal (:func:`refuse`), and
    ``rewrite(op, ..., **bindings)``; the accepted config is ``self.config`` during rewrite."""

    #: the op the pattern roots at, for the report of a pass that does not apply to a target
    root_domain = "qcn"
    root_op = ""
    #: match only nodes of the main graph, never inside a function body (qcn ops' bodies are the
    #: ops' semantics; a quantization pass rewrites the model's own nodes)
    graph_only = False

    def __init__(self, config: dict | None = None):
        super().__init__(name=type(self).__name__)
        self.result = PassResult(self.pass_name, config=config)

    @property
    def pass_name(self) -> str:
        raise NotImplementedError

    def check_node(self, context, **bindings) -> dict | MatchResult:
        raise NotImplementedError

    def candidate(self, context, **bindings) -> bool:
        """False: the match is not this pass's business (not counted, not reported), e.g. a node
        an earlier rewrite of this or another pass produced. Default: every match is a candidate."""
        return True

    def check(self, context, **bindings):
        if (self.graph_only and context.root.graph is not context.model.graph) or not self.candidate(context, **bindings):
            return MatchResult().fail("not a candidate")  # inside a function body, or a node a rule just built
        node = self._root = context.root  # rewrite() runs right after a successful check of this node
        self.result.matched += 1
        got = self.check_node(context, **bindings)
        if isinstance(got, dict) and self.result.config is not None and got != self.result.config:
            got = refuse(f"config {got} differs from {self.result.config}, which the plugins are registered "
                         "with (one registration per plugin id)")
        if not isinstance(got, dict):
            self.result.refused.append((node.name, got.reason))
            return got
        self.result.config = got
        return MatchResult()

    @property
    def config(self) -> dict:
        return self.result.config

    def count_rewrite(self, op, outputs, plugins: set[str]) -> Any:
        """Call at the end of ``rewrite`` with the builder and what it built; returns ``outputs``."""
        self.result.rewritten += 1
        self.result.new_nodes += len(op.nodes)
        self.result.plugins |= plugins
        return outputs


def apply(rule: QcnRule, model: ir.Model) -> PassResult:
    """Run ``rule`` over ``model`` (in place); drop model functions no node calls any more."""
    count = RewriteRuleSet([RewriteRule(rule.pattern, rule.rewrite, rule.check, name=rule.name)]).apply_to_model(model)
    res = rule.result
    if count != res.rewritten:
        raise PassError(f"{res.pass_name}: the rewriter applied {count} rewrites, the rule counted {res.rewritten}")
    if res.rewritten:
        if res.plugins:
            model.opset_imports.setdefault(PLUGIN_DOMAIN, 1)
        for name in [n for n, v in model.graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
            del model.graph.initializers[name]  # replaced weights (their bytes stay in the file they were in)
        # a function is (domain, name, overload): an overload no node calls any more goes too (TensorRT-RTX's
        # parser ignores overloads and would inline a stale one: compile/passes/lower_moe_rtx.py)
        used = {(n.domain, n.op_type, n.overload or "") for n in model.graph.all_nodes()}
        for key in [k for k, f in model.functions.items() if (f.domain, f.name, f.overload or "") not in used]:
            del model.functions[key]
    return res


# --- graph <-> IR -------------------------------------------------------------------------

def infer_shapes(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """Strict ONNX shape inference; a failure names the graph and the error."""
    try:
        return onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        raise PassError(f"{where}: ONNX shape inference failed, so the passes cannot check shapes: {e}") from e


def to_ir(proto: onnx.ModelProto, where: str) -> ir.Model:
    """Shapes inferred, then the IR (external weights stay references; nothing is loaded)."""
    return ir.serde.deserialize_model(infer_shapes(proto, where))


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


# --- helpers for checks -------------------------------------------------------------------

def dims(value: ir.Value | None, rank: int, what: str, static: tuple[int, ...]) -> tuple | MatchResult:
    """The shape (None for a symbolic dim) if it has ``rank`` dims and the ``static`` axes are
    known ints; otherwise a refusal."""
    shape = None if value is None else value.shape
    if shape is None or len(shape) != rank:
        return refuse(f"{what}: rank {None if shape is None else len(shape)} (need {rank}, known)")
    out = tuple(d if isinstance(d, int) else None for d in shape)
    unknown = [ax for ax in static if out[ax] is None]
    if unknown:
        return refuse(f"{what}: axes {unknown} of {list(shape)} are not static (the AOT kernels compile sizes in)")
    return out


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def plugin_op(op, name: str, namespace: str, inputs, *, outputs: int = 1, **attrs):
    """A TensorRT plugin node (the parser maps an unknown op to the registered plugin of the same
    name): op_type = plugin name, domain :data:`PLUGIN_DOMAIN`, ``plugin_namespace``,
    ``plugin_version`` "1", ``aot`` 1 (use the plugin's aot_impl: PTX embedded in the engine)."""
    return op.op(name, *inputs, _domain=PLUGIN_DOMAIN, _version=1, _outputs=outputs, plugin_namespace=namespace,
                 plugin_version=PLUGIN_VERSION, aot=1, **attrs)
