"""One build path over `tensorrt` (full TensorRT) and `tensorrt_rtx`: the same API family,
imported lazily by name, built with Polygraphy's loaders: ``CreateConfig`` / ``CreateConfigRTX``
and ``EngineBytesFromNetwork`` (:func:`create_config`, :func:`engine_bytes`).

Kept here, each for one reason:
- :func:`import_module`: the recipe's target names the module; Polygraphy picks one per process
  from POLYGRAPHY_USE_TENSORRT_RTX, which :func:`polygraphy_backend` sets from the target.
- :class:`NetworkFromOnnxPath`: Polygraphy's raises a bare "Failed to parse ONNX model" and only
  logs the parser's errors; ours puts each error's node, op and function stack in the BuildError.
- :func:`check_profiles`: Polygraphy fills missing profile shapes with defaults; a qcn profile
  that names an input the network lacks, or misses a dynamic one, is a bug and says so.
- :class:`CollectingLogger`: the TensorRT ILogger that routes messages to Python logging and
  keeps errors for the BuildError (Polygraphy's own logger is switched to Python logging).
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import QcnError
from ..recipe import RecipeError

log = logging.getLogger(__name__)

GIB = 1 << 30
# TensorRT DataType name -> manifest dtype name
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
          "BOOL": "bool", "INT8": "int8", "FP8": "fp8", "INT4": "int4", "FP4": "fp4", "UINT8": "uint8"}


class BuildError(QcnError, RuntimeError):
    """TensorRT could not parse or build the network; the message names what and where."""


def import_module(name: str):
    if name not in ("tensorrt", "tensorrt_rtx"):
        raise ValueError(f"not a TensorRT module: {name!r}")
    return importlib.import_module(name)


class CollectingLogger:
    """A TensorRT ILogger that keeps messages (errors are put into exceptions) and forwards
    them to Python logging. The parser's 'A node named X already exists' warnings (one per
    inlined function body node) are counted, not printed."""

    def __new__(cls, trt):
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[tuple[int, str]] = []
                self.duplicate_names = 0

            def log(self, severity, msg):
                sev = int(severity)
                if "already exists, the output tensors" in msg:
                    self.duplicate_names += 1
                    return
                self.messages.append((sev, msg))
                level = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.DEBUG}.get(sev, logging.DEBUG)
                log.log(level, "[%s] %s", trt.__name__, msg)

            def errors(self) -> list[str]:
                return [m for s, m in self.messages if s <= 1]

            def layer_report(self) -> str | None:
                """The builder's per-layer report of the engine (compile/build/layers.py)."""
                from .layers import find_layer_report

                return find_layer_report(self.messages)

        return _Logger()


@dataclass(frozen=True)
class Profile:
    """One optimization profile: tensor name -> (min, opt, max) shapes; the graphs it serves."""

    name: str
    graphs: tuple[str, ...]
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict:
        return {"name": self.name, "graphs": list(self.graphs),
                "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.shapes.items()}}


def symbol_ranges(mode: str, *, prefill_chunk: int, max_batch: int, max_context: int) -> list[tuple[str, tuple[str, ...], dict]]:
    """(profile name, graphs, {symbol: (min, opt, max)}) for the graph symbols batch/tokens/past.

    split (full TensorRT): profile 0 "prefill" (one sequence, 1..prefill_chunk tokens) and
    profile 1 "decode" (1..max_batch sequences, one token), one engine, weights stored once.
    single (tensorrt_rtx 1.7.1, where two differing profiles fail to build): one profile that
    covers both, 1..max_batch sequences x 1..prefill_chunk tokens, optimised for decode."""
    past = (1, min(max_context, 4096), max_context)
    if mode == "split":
        return [("prefill", ("prefill",), {"batch": (1, 1, 1), "tokens": (1, prefill_chunk, prefill_chunk), "past": past}),
                ("decode", ("decode",), {"batch": (1, max_batch, max_batch), "tokens": (1, 1, 1), "past": past})]
    if mode == "single":
        return [("all", ("prefill", "decode"),
                 {"batch": (1, max_batch, max_batch), "tokens": (1, 1, prefill_chunk), "past": past})]
    raise ValueError(f"profile mode {mode!r}")


def make_profiles(mode: str, graph_inputs: Sequence[Mapping[str, Any]], **limits) -> list[Profile]:
    """Profiles for the graph's inputs (manifest `graphs.prefill.inputs`: name, dtype, shape
    with symbol names). Pure: testable without TensorRT."""
    out = []
    for name, graphs, ranges in symbol_ranges(mode, **limits):
        shapes = {}
        for t in graph_inputs:
            dims = t["shape"]
            if all(isinstance(d, int) for d in dims):
                continue
            lo, opt, hi = [], [], []
            for d in dims:
                if isinstance(d, int):
                    r = (d, d, d)
                elif d in ranges:
                    r = ranges[d]
                else:
                    raise RecipeError(f"input {t['name']!r} has dimension {d!r}; profiles know only {sorted(ranges)}")
                lo.append(r[0]), opt.append(r[1]), hi.append(r[2])
            shapes[t["name"]] = (tuple(lo), tuple(opt), tuple(hi))
        out.append(Profile(name, graphs, shapes))
    return out


# ---------------------------------------------------------------------------------------
# loaders


@dataclass
class NetworkFromOnnxPath:
    """(builder, network, parser, logger) from an ONNX file; its external data beside it.
    qcn ops have no plugin here: the parser inlines their ONNX function bodies."""

    trt: Any
    path: Path
    logger: Any = None

    def __call__(self):
        trt = self.trt
        logger = self.logger or CollectingLogger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not Path(self.path).is_file():
            raise BuildError(f"{self.path}: ONNX file not found")
        t0 = time.perf_counter()
        ok = parser.parse_from_file(str(self.path))
        if not ok or parser.num_errors:
            errs = []
            for i in range(parser.num_errors):
                e = parser.get_error(i)
                stack = [e.local_function_stack()[j] for j in range(e.local_function_stack_size())] \
                    if e.local_function_stack_size() else []
                where = f"node {e.node_name()!r} (op {e.node_operator()!r}" + \
                        (f", inside function {' > '.join(stack)}" if stack else "") + ")"
                errs.append(f"{where}: {e.desc()}")
            raise BuildError(f"{self.path}: the {trt.__name__} ONNX parser failed:\n  " + "\n  ".join(errs or logger.errors()))
        log.info("parsed %s in %.2fs (%d layers)", Path(self.path).name, time.perf_counter() - t0, network.num_layers)
        return builder, network, parser, logger


def network_io(trt, network) -> dict[str, list[dict]]:
    """The network's inputs and outputs (name, dtype, shape with -1 for dynamic dims)."""
    def one(t):
        return {"name": t.name, "dtype": DTYPES.get(t.dtype.name, t.dtype.name), "shape": list(t.shape)}
    return {"inputs": [one(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [one(network.get_output(i)) for i in range(network.num_outputs)]}


def polygraphy_backend(module: str):
    """Polygraphy's TensorRT backend bound to ``module`` (tensorrt or tensorrt_rtx). Polygraphy
    binds one module per process when polygraphy.backend.trt is first imported."""
    import polygraphy.config as pcfg

    want = module == "tensorrt_rtx"
    if "polygraphy.backend.trt" in sys.modules and pcfg.USE_TENSORRT_RTX != want:
        bound = "tensorrt_rtx" if pcfg.USE_TENSORRT_RTX else "tensorrt"
        raise BuildError(f"Polygraphy is bound to {bound} in this process (one TensorRT module per process); "
                         f"build the {module} target in a new process")
    pcfg.USE_TENSORRT_RTX = want
    from polygraphy.backend import trt as ptrt
    from polygraphy.logger import G_LOGGER

    if not G_LOGGER.use_python_logging_system:  # its messages go to logging ("Polygraphy"), not stdout
        G_LOGGER.use_python_logging_system = True
        G_LOGGER.module_severity = G_LOGGER.WARNING
    return ptrt


def check_profiles(network, profiles: Sequence[Profile]) -> None:
    """Every profile gives shapes for exactly the network's dynamic inputs, with their ranks."""
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for prof in profiles:
        unknown = sorted(set(prof.shapes) - set(inputs))
        if unknown:
            raise BuildError(f"profile {prof.name!r} names input(s) {unknown} that the network does not have; "
                             f"the network's inputs are {list(inputs)}")
        missing = [n for n, t in inputs.items() if any(d < 0 for d in t.shape) and n not in prof.shapes]
        if missing:
            raise BuildError(f"profile {prof.name!r} gives no shape for dynamic input(s) {missing}; "
                             f"the network's inputs are {list(inputs)}")
        for name, (lo, _, _) in prof.shapes.items():
            if len(lo) != len(inputs[name].shape):
                raise BuildError(f"profile {prof.name!r}: {name!r} has rank {len(inputs[name].shape)} "
                                 f"{list(inputs[name].shape)} in the network, the profile gives {list(lo)}")


def create_config(trt, profiles: Sequence[Profile], *, workspace_gib: float = 2.0, optimization_level: int = 3,
                  compute_capabilities: Sequence[str] = (), hardware_compatibility: str = "none",
                  timing_cache: Path | None = None):
    """Polygraphy's config loader for the module: CreateConfigRTX (compute capabilities) for
    tensorrt_rtx, CreateConfig (hardware compatibility, timing cache) for full TensorRT."""
    ptrt = polygraphy_backend(trt.__name__)
    pprofiles = []
    for prof in profiles:
        pp = ptrt.Profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            pp.add(name, min=lo, opt=opt, max=hi)
        pprofiles.append(pp)
    common = dict(profiles=pprofiles, builder_optimization_level=optimization_level,
                  memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gib * GIB)})
    if trt.__name__ == "tensorrt_rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        ccs = [tuple(int(x) for x in cc.split(".")) for cc in compute_capabilities]
        return CreateConfigRTX(compute_capabilities=ccs or None, **common)
    level = getattr(trt.HardwareCompatibilityLevel, hardware_compatibility.upper())
    return ptrt.CreateConfig(hardware_compatibility_level=level,
                             load_timing_cache=str(timing_cache) if timing_cache else None, **common)


def engine_bytes(trt, network, config, *, save_timing_cache: Path | None = None) -> tuple[bytes, float, str | None]:
    """(serialized engine, build seconds, the builder's layer report or None) with Polygraphy's
    EngineBytesFromNetwork; ``network`` is a loader returning (builder, network, parser, logger).
    The layer report is the builder's VERBOSE ``Layers:`` message (Polygraphy sets profiling
    verbosity DETAILED; compile/build/layers.py parses it). A failed build is a BuildError
    carrying TensorRT's error messages."""
    from polygraphy.exception import PolygraphyException

    ptrt = polygraphy_backend(trt.__name__)
    box = {}

    def net():
        box["ret"] = network()
        return box["ret"][:3]

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # Polygraphy sets a timing cache that TensorRT-RTX ignores (and says so)
            warnings.filterwarnings("ignore", message=".*Timing cache operations are no-ops", category=DeprecationWarning)
            data = ptrt.EngineBytesFromNetwork(net, config, save_timing_cache=str(save_timing_cache)
                                               if save_timing_cache else None)()
    except PolygraphyException as e:
        errors = box["ret"][3].errors() if "ret" in box else []
        raise BuildError(f"{trt.__name__} failed to build the engine:\n  " + "\n  ".join(errors or [str(e)])) from e
    return bytes(data), time.perf_counter() - t0, box["ret"][3].layer_report()
