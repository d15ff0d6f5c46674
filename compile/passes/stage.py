"""The passes stage: export directory -> passes directory (lowered / fused / quantized ONNX).

Output directory (written atomically; see docs/PASSES.md):
  prefill.onnx, decode.onnx     the graphs after the last pass (same names as the export's, so
                                the runtime and the build read them the same way); a graph no
                                pass changed is the export's file, hard-linked
  <graph>.after_<NN>_<pass>.onnx  the graph after pass NN, for every pass that changed it
                                except the last one (whose result is <graph>.onnx)
  passes_report.json            per pass and graph: runs or why not, matched / rewritten /
                                refused (each refusal with its node and reason), new nodes,
                                plugins used and the registration config
  weights.bin, tokenizer files  hard links of the export's
  weights.passes.bin            initializers the passes made (quantized weights, scales), when
                                any did (compile/passes/quant/weights.py); the graphs reference
                                both files
  manifest.json                 the export manifest with stage "passes" and a "passes" section
The build stage reads only this directory: the lowered graph, and the plugin configs from the
manifest's "passes" section.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from qcn.artifact import Manifest, PassesSection, sha256_file

from ..artifacts import atomic_dir
from .base import PassError, apply, to_ir, to_proto
from .context import PassContext
from .plan import plan_for
from .quant.weights import PASSES_WEIGHTS, PassWeights
from ..recipe import QuantizationOptions

log = logging.getLogger(__name__)

REPORT = "passes_report.json"


def _link(src: Path, dst: Path, cache=None) -> None:
    """Hard link (copy where links fail). A digest the hash cache had for ``src`` before the link
    stays valid for both names (linking changes the ctime, not the bytes)."""
    digest = cache.lookup(src)[0] if cache is not None else None
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        return
    if digest is not None:
        cache.remember(src, digest)
        cache.remember(dst, digest)


def _count_roots(proto: onnx.ModelProto, root: tuple[str, str]) -> int:
    return sum(1 for n in proto.graph.node if (n.domain, n.op_type) == root)


@dataclass
class StageInputs:
    """What the rules of one passes stage share across its graphs."""

    module: str
    quant: QuantizationOptions
    weights: PassWeights
    export_dir: Path | None = None  # where the graphs' external data lives (None: nowhere)
    calibrate: Callable | None = None  # (proto of the current prefill graph, {key: tensor}) -> {key: range}
    ranges: dict = field(default_factory=dict)
    calibrated: dict = field(default_factory=dict)  # pass -> number of tensors it had calibrated
    activations: Callable | None = None  # int4: (proto, names, desc) -> iterator of {name: array} per batch
    shared: dict = field(default_factory=dict)  # per-stage state of passes (PassContext.shared)

    def context(self, graph: str) -> PassContext:
        return PassContext(self.module, self.quant, graph, self.weights, self.ranges, self.activations, self.shared)


def run_graph(proto: onnx.ModelProto, module: str, where: str, on_change=None, *, graph: str = "prefill",
              inputs: StageInputs | None = None) -> tuple[onnx.ModelProto, list[dict]]:
    """Run the pass plan for target module ``module`` (and ``inputs.quant``) over one graph.
    Returns the graph after the last pass (``proto`` itself when none changed it) and one report
    entry per pass; ``on_change(index, pass name, proto)`` sees the graph after each pass that
    changed it. A pass that asks for calibration gets it on the prefill graph as it is when the
    pass runs (unquantized by this pass); the decode graph reuses those ranges."""
    if inputs is None:
        inputs = StageInputs(module, QuantizationOptions(), PassWeights(Path(".")))
    model, entries, out = None, [], proto
    for i, (spec, why) in enumerate(plan_for(module, inputs.quant), start=1):
        if why is not None:
            entries.append({"op_nodes": _count_roots(out, spec.root), "rewritten": 0})
            continue
        if model is None:
            model = to_ir(proto, where)
            if inputs.export_dir is not None:
                ir.external_data.set_base_dir(model.graph, inputs.export_dir)
        if spec.calibrate is not None and graph == "prefill" and inputs.calibrate is not None:
            targets = {k: t for k, t in spec.calibrate(model).items() if k not in inputs.ranges}
            if targets:
                inputs.ranges.update(inputs.calibrate(to_proto(model), targets))
                inputs.calibrated[spec.name] = len(targets)
        res = apply(spec.make(inputs.context(graph)), model)
        entries.append(res.to_dict())
        for node, reason in res.refused:
            log.info("%s: %s refused %s: %s", where, spec.name, node, reason)
        if res.changed:
            out = to_proto(model)
            if on_change is not None:
                on_change(i, spec.name, out)
    return out, entries


def _calibrator(export_dir: Path, out: Path, src_manifest: Manifest, quant: QuantizationOptions, progress: bool):
    """The stage's calibration: the recipe's source through the current prefill graph (run from
    ``out``, where weights.bin and weights.passes.bin are)."""
    from .quant.calibrate import GraphRunner, collect_ranges, token_windows

    cal = quant.calibration

    def calibrate(proto: onnx.ModelProto, targets: dict[str, str]) -> dict:
        windows = token_windows(cal.source, export_dir / "tokenizer.json", tokens=cal.tokens, seq_len=cal.seq_len)
        runner = GraphRunner(proto, out, src_manifest.graphs["prefill"].inputs, list(dict.fromkeys(targets.values())))
        log.info("calibrating %d tensors on %d x %d tokens of %s", len(targets), *windows.shape, cal.source)
        return collect_ranges(runner, targets, windows, cal.batch, progress=progress)

    return calibrate


def _activations(export_dir: Path, out: Path, src_manifest: Manifest, quant: QuantizationOptions, progress: bool):
    """Calibration batches for passes that keep their own statistics (int4's AWQ): the same windows
    and runner as :func:`_calibrator`, yielding each batch's {tensor: array}."""
    from tqdm import tqdm

    from .quant.calibrate import GraphRunner, batches, token_windows

    cal = quant.calibration

    def activations(proto: onnx.ModelProto, names: list[str], desc: str = "calibrating"):
        windows = token_windows(cal.source, export_dir / "tokenizer.json", tokens=cal.tokens, seq_len=cal.seq_len)
        runner = GraphRunner(proto, out, src_manifest.graphs["prefill"].inputs, list(dict.fromkeys(names)))
        log.info("%s: %d tensors on %d x %d tokens of %s", desc, len(names), *windows.shape, cal.source)
        with tqdm(total=windows.size, unit="tok", desc=desc, disable=not progress, leave=False) as bar:
            for ids in batches(windows, cal.batch):
                yield runner.run(ids)
                bar.update(ids.size)

    return activations


COMPACT_BELOW = 0.75  # rewrite the weights when the final graphs read less than this share of their bytes


def _compact(out: Path, gfiles: list[str], rows: list[dict]) -> dict | None:
    """When the passes replaced most weights (INT4: the export's fp32 projections and experts are
    no longer read), write the bytes the final graphs still reference into one new ``weights.bin``
    (replacing the hard link; the export's file is untouched) and drop ``weights.passes.bin``, so
    the artifact is only as large as what it runs. The intermediate ``<graph>.after_NN`` graphs
    referenced the dropped bytes and are removed (their report entries say so). None when the
    graphs still read at least ``COMPACT_BELOW`` of the weight bytes (e.g. FP8 of an FP8 export)."""
    from ..export.weights_file import WeightsWriter

    protos = {g: onnx.load(str(out / g), load_external_data=False) for g in gfiles}
    refs: dict[tuple[str, int, int], None] = {}
    for proto in protos.values():
        for t in _external(proto):
            info = {e.key: e.value for e in t.external_data}
            refs.setdefault((info["location"], int(info.get("offset", 0)), int(info["length"])), None)
    files = {loc for loc, _, _ in refs}
    total = sum((out / f).stat().st_size for f in files | {PASSES_WEIGHTS, "weights.bin"} if (out / f).is_file())
    used = sum(n for _, _, n in refs)
    if not total or used >= COMPACT_BELOW * total:
        return None
    tmp = out / "weights.compact.tmp"
    moved: dict[tuple[str, int, int], tuple[int, int]] = {}
    maps = {f: np.memmap(out / f, dtype=np.uint8, mode="r") for f in files}
    with WeightsWriter(tmp, allow_nonfinite=True) as w:
        for i, (loc, off, n) in enumerate(refs):
            got = w.write(f"t{i}", torch.from_numpy(np.array(maps[loc][off:off + n])))
            moved[(loc, off, n)] = (got.offset, got.length)
    del maps
    for g, proto in protos.items():
        for t in _external(proto):
            info = {e.key: e.value for e in t.external_data}
            off, n = moved[(info["location"], int(info.get("offset", 0)), int(info["length"]))]
            del t.external_data[:]
            for k, v in (("location", "weights.bin"), ("offset", str(off)), ("length", str(n))):
                t.external_data.add(key=k, value=v)
        onnx.save(proto, str(out / (g + ".tmp")))
    for f in [f for f in os.listdir(out) if ".after_" in f and f.endswith(".onnx")]:
        (out / f).unlink()
    for row in rows:
        for entry in row["graphs"].values():
            if entry.get("file", "").count(".after_"):
                entry["file"] = None
                entry["file_dropped"] = "weights compacted (the graph read weights no longer in the artifact)"
    (out / "weights.bin").unlink()
    if (out / PASSES_WEIGHTS).exists():
        (out / PASSES_WEIGHTS).unlink()
    os.replace(tmp, out / "weights.bin")
    for g in gfiles:
        os.replace(out / (g + ".tmp"), out / g)
    log.info("weights compacted: the graphs read %.1f of %.1f MiB; weights.bin rewritten", used / 2**20, total / 2**20)
    return {"weights_bytes_before": total, "weights_bytes_after": (out / "weights.bin").stat().st_size}


def _external(proto: onnx.ModelProto):
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t


def run_passes(export_dir: Path, out: Path, module: str, src_manifest: Manifest, cache=None, *,
               quant: QuantizationOptions | None = None, progress: bool = False) -> PassesSection:
    """Run the pass plan for target module ``module`` and the recipe's quantization options
    ``quant`` over every graph of ``export_dir``; write graphs, weights.passes.bin and report
    into ``out`` (an empty directory). Returns the manifest's passes section."""
    export_dir, out = Path(export_dir), Path(out)
    quant = quant if quant is not None else QuantizationOptions()
    plan = plan_for(module, quant)
    graphs = {name: g.file for name, g in src_manifest.graphs.items()}
    graphs = dict(sorted(graphs.items(), key=lambda kv: kv[0] != "prefill"))  # prefill first: it calibrates
    rows = [{"pass": spec.name, "summary": spec.summary, "runs": why is None,
             **({"why_not": why} if why else {}), "graphs": {}} for spec, why in plan]
    gfiles = set(graphs.values())
    for rel in src_manifest.files:  # weights first: graphs written during the stage resolve against out
        if rel not in gfiles:
            _link(export_dir / rel, out / rel, cache)
    with PassWeights(out) as weights:
        inputs = StageInputs(module, quant, weights, export_dir=export_dir,
                             calibrate=_calibrator(export_dir, out, src_manifest, quant, progress),
                             activations=_activations(export_dir, out, src_manifest, quant, progress))
        for graph, gfile in graphs.items():
            path = export_dir / gfile
            files: dict[int, str] = {}

            def save(i, name, proto, stem=Path(gfile).stem, files=files):
                files[i] = f"{stem}.after_{i:02d}_{name}.onnx"
                onnx.save(proto, str(out / files[i]))

            _, entries = run_graph(onnx.load(str(path), load_external_data=False), module, str(path), save,
                                   graph=graph, inputs=inputs)
            for i, (row, entry) in enumerate(zip(rows, entries), start=1):
                if i in files:
                    entry["file"] = files[i]
                row["graphs"][graph] = entry
            if files:
                last = max(files)
                os.replace(out / files[last], out / gfile)  # the graph after the last change is the graph
                rows[last - 1]["graphs"][graph]["file"] = gfile
            else:
                _link(path, out / gfile, cache)
    compacted = _compact(out, list(graphs.values()), rows) if weights.written else None
    report = {"module": module, "graphs": list(graphs), "passes": rows}
    if compacted:
        report["compacted"] = compacted
    if inputs.calibrated:
        cal = quant.calibration
        report["calibration"] = {"source": str(cal.source), "tokens": cal.tokens, "seq_len": cal.seq_len,
                                 "ranges": cal.ranges, **({"percentile": cal.percentile} if cal.ranges == "percentile" else {}),
                                 "tensors": inputs.calibrated,
                                 "values": {k: {"amax": r.amax, "used": r.value(cal)} for k, r in inputs.ranges.items()}}
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s", report_text(report))
    plugins = {}
    for row in rows:
        r = row["graphs"].get("prefill", {})
        if r.get("rewritten") and r.get("plugins"):  # a plugin lowering (fusions/quantization use no plugin)
            plugins[row["pass"]] = {"config": r["config"], "plugins": r["plugins"]}
    keep = ("op_nodes", "matched", "rewritten", "refused", "new_nodes")
    return PassesSection(run=tuple(r["pass"] for r in rows if r["runs"]), module=module, report=REPORT,
                         not_run={r["pass"]: r["why_not"] for r in rows if not r["runs"]},
                         counts={r["pass"]: {gr: {k: v for k, v in c.items() if k in keep}
                                             for gr, c in r["graphs"].items()} for r in rows},
                         plugins=plugins)


def report_text(report: dict) -> str:
    """One line per pass and graph: what the CLI prints after the stage."""
    lines = [f"passes for {report['module']}:"]
    for row in report["passes"]:
        for graph, c in row["graphs"].items():
            if row["runs"]:
                refused = c.get("refused", 0)
                lines.append(f"  {row['pass']:24s} {graph:8s} matched {c['matched']}, rewritten {c['rewritten']}, "
                             f"refused {refused}" + (f" ({c['refusals'][0]['reason']}" + (", ..." if refused > 1 else "")
                                                      + ")" if refused else ""))
            else:
                lines.append(f"  {row['pass']:24s} {graph:8s} not run ({c['op_nodes']} candidate nodes): {row['why_not']}")
    return "\n".join(lines)


def load_report(passes_dir: Path) -> dict:
    p = Path(passes_dir) / REPORT
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise PassError(f"{p}: cannot read the passes report ({e}); re-run the passes stage") from e


def files_section(d: Path, cache=None) -> dict[str, str]:
    digest = cache.sha256 if cache is not None else sha256_file
    return {p.name: digest(p) for p in sorted(Path(d).iterdir()) if p.is_file() and p.name != "manifest.json"}


__all__ = ["REPORT", "run_passes", "report_text", "load_report", "files_section", "atomic_dir"]
