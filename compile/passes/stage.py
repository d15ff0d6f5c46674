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
  weights.bin, tokenizer files  hard links of the export's (passes do not change weights yet)
  manifest.json                 the export manifest with stage "passes" and a "passes" section
The build stage reads only this directory: the lowered graph, and the plugin configs from the
manifest's "passes" section.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import onnx
from qcn.artifact import Manifest, PassesSection, sha256_file

from ..artifacts import atomic_dir
from .base import PassError, apply, to_ir, to_proto
from .plan import plan_for

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


def run_graph(proto: onnx.ModelProto, module: str, where: str, on_change=None) -> tuple[onnx.ModelProto, list[dict]]:
    """Run the pass plan for target module ``module`` over one graph. Returns the graph after the
    last pass (``proto`` itself when none changed it) and one report entry per pass;
    ``on_change(index, pass name, proto)`` sees the graph after each pass that changed it."""
    model, entries, out = None, [], proto
    for i, (spec, why) in enumerate(plan_for(module), start=1):
        if why is not None:
            entries.append({"op_nodes": _count_roots(proto, spec.root), "rewritten": 0})
            continue
        if model is None:
            model = to_ir(proto, where)
        res = apply(spec.make(None), model)
        entries.append(res.to_dict())
        for node, reason in res.refused:
            log.info("%s: %s refused %s: %s", where, spec.name, node, reason)
        if res.changed:
            out = to_proto(model)
            if on_change is not None:
                on_change(i, spec.name, out)
    return out, entries


def run_passes(export_dir: Path, out: Path, module: str, src_manifest: Manifest, cache=None) -> PassesSection:
    """Run the pass plan for target module ``module`` over every graph of ``export_dir``; write
    graphs and report into ``out`` (an empty directory). Returns the manifest's passes section."""
    export_dir, out = Path(export_dir), Path(out)
    plan = plan_for(module)
    graphs = {name: g.file for name, g in src_manifest.graphs.items()}
    rows = [{"pass": spec.name, "summary": spec.summary, "runs": why is None,
             **({"why_not": why} if why else {}), "graphs": {}} for spec, why in plan]
    written: set[str] = set()
    for graph, gfile in graphs.items():
        path = export_dir / gfile
        files: dict[int, str] = {}

        def save(i, name, proto, stem=Path(gfile).stem, files=files):
            files[i] = f"{stem}.after_{i:02d}_{name}.onnx"
            onnx.save(proto, str(out / files[i]))

        _, entries = run_graph(onnx.load(str(path), load_external_data=False), module, str(path), save)
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
        written.add(gfile)
    for rel in src_manifest.files:
        if rel not in written:
            _link(export_dir / rel, out / rel, cache)
    report = {"module": module, "graphs": list(graphs), "passes": rows}
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
