"""What a pass's rule gets besides the graph: :class:`PassContext`.

A row of the pass table (plan.py) makes its rule from a context: the target module, the
recipe's quantization options, which graph it runs on, the weights of the graph (read the
export's, add new ones: ``weights.passes.bin``, compile/passes/quant/weights.py) and the
activation ranges calibrated for it (compile/passes/quant/calibrate.py). The plugin lowerings
ignore it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..recipe import QuantizationOptions
    from .quant.calibrate import ActivationRange
    from .quant.weights import PassWeights


@dataclass
class PassContext:
    module: str                       # target module: onnxruntime | tensorrt | tensorrt_rtx
    quant: "QuantizationOptions"
    graph: str                        # "prefill" | "decode" (the graphs share weights and ranges)
    weights: "PassWeights"
    # calibration key (a pass's choice; the FP8 rules use the weight's initializer name) -> range,
    # shared by every graph: filled from the prefill graph before the pass that asked runs
    ranges: dict[str, "ActivationRange"] = field(default_factory=dict)
    # int4 (AWQ): (prefill proto, tensor names, progress label) -> one {name: array} per calibration
    # batch, for passes that accumulate their own statistics (None: no calibration source)
    activations: "Callable[..., Iterator[dict]] | None" = None
    # per-stage state a pass shares between its graphs (the INT4 plan, made on prefill), by pass key
    shared: dict = field(default_factory=dict)
