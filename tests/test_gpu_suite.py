"""benchmarks/gpu_suite.py on the CPU: the --dry-run (imports, Triton API, GPU plan and its time budget, every
section's code path at tiny shapes under the Triton interpreter), the failures it must report (a broken
kernel import, a plan over the 8-minute limit), and the goal arithmetic of the summary on synthetic results.
No GPU is needed; nothing is timed."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(args, tmp_path, env_extra=None, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(SUITE), *args, "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_runs_every_section(tmp_path):
    r = _run(["--dry-run"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "dry run: ok" in r.stdout, out[-4000:]
    d = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert (tmp_path / "out" / "gpu_suite.md").read_text().startswith("# qcn GPU suite")
    assert d["dry_run"] and d["finished"] and not d["plan"]["problems"]
    assert d["plan"]["estimate_s"] <= d["plan"]["budget_s"] <= 480
    assert [s["status"] for s in d["sections"].values()] == ["done"] * 3, d["sections"]
    assert d["env"]["triton_api"]["missing"] == [], d["env"]["triton_api"]
    by = {}
    for res in d["results"]:
        by.setdefault(res["section"], []).append(res)
    corr = by["correctness"]
    assert {c["kind"] for c in corr} >= {"gdn", "moe", "attn"}
    for c in corr:  # every check compared a kernel output against its reference, and passed
        assert c["status"] == "pass" and c["checks"], c
        assert all(ch["err"] is not None and ch["err"] <= ch["bound"] for ch in c["checks"]), c
    assert {k["kind"] for k in by["kernels"]} == {"t_gdn", "t_fla", "t_moe", "t_attn"}
    assert all(k["status"] == "ok" and k["bytes"] > 0 for k in by["kernels"] if k["kind"] != "t_fla")
    assert [k["status"] for k in by["kernels"] if k["kind"] == "t_fla"] == ["skipped"]  # no fla here / not on CPU
    dec = by["decode_step"]
    assert len(dec) == 1 and dec[0]["checked"] > 0 and dec[0]["bytes"] > 0, dec
    assert len(d["goals"]) == 6 and all(g["result"] == "not measured" for g in d["goals"])


def test_dry_run_fails_on_a_plan_over_budget(tmp_path):
    r = _run(["--dry-run", "--budget", "120"], tmp_path)
    assert r.returncode == 2, r.stdout[-2000:]
    assert "plan problem: plan needs" in r.stdout and "> budget 120s" in r.stdout
    gs = _suite()
    assert any("exceeds the suite's limit of 480s" in p for p in gs.plan_problems(gs.build_plan(True, 600), 600))


def test_dry_run_fails_on_a_kernel_import_error(tmp_path):
    fake = tmp_path / "fake" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('triton is broken here (test)')\n")
    r = _run(["--dry-run"], tmp_path, env_extra={"PYTHONPATH": f"{fake.parent}{os.pathsep}"
                                                              f"{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 2, r.stdout[-2000:]
    assert "import error: qcn.compile.plugins.gated_deltanet: ImportError: triton is broken here" in r.stdout, \
        r.stdout[-2000:]
    assert "dry run: FAILED" in r.stdout


def test_plan_shape_checks_catch_bad_cases():
    gs = _suite()
    assert gs.case_shape_problems(gs.Case("correctness", "x", "moe", dict(
        fmt="dense", dtype="bf16", n=20, top_k=3, path="decode", cfg="default", size="small"), 1))
    assert gs.case_shape_problems(gs.Case("correctness", "x", "attn", dict(
        dtype="bf16", B=1, P=8, HQ=3, KVH=2, D=16, cfg="default"), 1))
    assert gs.case_shape_problems(gs.Case("correctness", "x", "gdn", dict(
        cfg="gqa", B=1, T=2, K=4, dtype="fp32", op="decode"), 1))
    assert gs.case_shape_problems(gs.Case("correctness", "x", "moe", dict(
        fmt="int4", group=48, dtype="fp32", n=5, top_k=3, path="decode", cfg="test", size="small"), 1))
    plan = gs.build_plan(True, gs.DEFAULT_BUDGET_S)
    assert gs.plan_problems(plan, gs.DEFAULT_BUDGET_S) == []
    assert gs.decode_layers("bf16") < 48 and gs.decode_layers("bf16") % 4 == 0 and gs.decode_layers("fp8") == 48
    # the real sizes of the issue are in the plan
    params = [c.params for s in plan for c in s.cases]
    assert any(p.get("cfg") == "real" and p.get("op") == "prefill" and p.get("T") == 4096 for p in params)
    assert any(p.get("size") == "real" and p.get("fmt") == f for p in params for f in ("dense", "fp8", "int4"))
    assert any(p.get("HQ") == 16 and p.get("KVH") == 2 and p.get("D") == 256 for p in params)
    assert {(p["batch"], p["context"]) for p in params if "batch" in p} == set(gs.DECODE_POINTS)


def test_rel_err_never_passes_nan():
    torch = pytest.importorskip("torch")
    gs = _suite()
    ref = torch.randn(4, 5)
    bad = ref.clone()
    bad[1, 2] = float("nan")
    assert gs.rel_err(bad, ref) == float("inf")
    assert gs.rel_err(ref, ref) == 0.0
    checks = []
    gs._check(checks, "y", bad, ref, 1e-2)
    gs._check(checks, "y2", ref * 1.1, ref, 1e-2)
    assert [c["ok"] for c in checks] == [False, False]


def _synthetic(gdn_us, fla_us, ours_prefill_us, moe_frac, fp8_frac):
    def k(name, kind, params, **kw):
        return dict(name=name, section="kernels", kind=kind, params=params, status="ok", **kw)
    res = [dict(name="c", section="correctness", kind="gdn", params={}, status="pass",
                checks=[dict(output="y", err=1e-6, bound=1e-5, ok=True)]),
           k("gdn decode B1", "t_gdn", dict(B=1, T=1), impl="qcn", us=gdn_us, GBps=1.0, copy_frac=0.1, TFLOPs=0.0,
             bytes=1, flops=1),
           k("gdn prefill T4096", "t_gdn", dict(B=1, T=4096), impl="qcn", us=ours_prefill_us, GBps=1.0,
             copy_frac=0.1, TFLOPs=1.0, bytes=1, flops=1),
           k("fla gdn prefill T4096", "t_fla", dict(B=1, T=4096), impl="fla-core", us=fla_us, GBps=1.0,
             copy_frac=0.1, TFLOPs=1.0, bytes=1, flops=1),
           k("moe decode fp8 N1", "t_moe", dict(fmt="fp8", n=1, path="decode"), impl="qcn", us=10.0, GBps=2000.0,
             copy_frac=moe_frac, TFLOPs=0.1, bytes=1, flops=1),
           dict(name="decode fp8 B1 ctx4096", section="decode_step", kind="decode",
                params=dict(experts="fp8", batch=1, context=4096), status="ok", experts="fp8", proj="fp8",
                proj_probe="ok", layers=48, batch=1, context=4096, ms=2.0, tokens_per_s=500.0, GBps=2000.0,
                roofline_frac=fp8_frac, fp8_roofline_frac=fp8_frac, fp8_roofline_ms=2.0 * fp8_frac, build_s=9.0,
                mean_routed=10.0, checked=300)]
    return dict(results=res, env={}, sections={}, dry_run=False, started="t", updated="t", finished=True,
                commit="abc", command="gpu_suite.py")


def test_goals_pass_and_miss_with_margins():
    gs = _suite()
    by = {x["goal"]: x["result"] for x in gs.evaluate_goals(_synthetic(3.5, 100.0, 90.0, 0.65, 0.55))}
    assert by["Gated DeltaNet decode, batch 1"] == "pass"
    assert by["Gated DeltaNet chunked prefill, T=4096, B=1"] == "pass"
    assert by["MoE decode, batch 1, fp8 experts (10 routed + shared)"] == "pass"
    assert by["48-layer decode step, batch 1, 4K context, FP8 experts"] == "pass"
    goals = gs.evaluate_goals(_synthetic(5.0, 80.0, 90.0, 0.5, 0.2))
    by = {x["goal"]: x for x in goals}
    assert by["Gated DeltaNet decode, batch 1"]["result"] == "miss"
    assert by["Gated DeltaNet decode, batch 1"]["margin"].startswith("-1.00 us")
    assert by["Gated DeltaNet chunked prefill, T=4096, B=1"]["result"] == "miss"
    assert by["MoE decode, batch 1, fp8 experts (10 routed + shared)"]["margin"] == "-10.0 points"
    assert by["MoE decode, batch 1, int4 experts (10 routed + shared)"]["result"] == "not measured"
    assert by["48-layer decode step, batch 1, 4K context, FP8 experts"]["result"] == "miss"
    md = gs.render_markdown({**_synthetic(5.0, 80.0, 90.0, 0.5, 0.2), "goals": goals})
    assert "**miss**" in md and "| fla gdn prefill T4096 | fla-core |" in md and "qcn/fla 1.12" in md


def test_triton_api_check_finds_missing_names_and_keywords(tmp_path):
    gs = _suite()
    src = tmp_path / "k.py"
    src.write_text("import triton.language as tl\n"
                   "def f(a, b):\n"
                   "    x = tl.not_in_any_triton(a)\n"
                   "    return tl.dot(a, b, no_such_keyword=1) + tl.sum(x, axis=0) + tl.float32\n")
    r = gs.triton_api_check([src])
    assert r["missing"] == ["tl.not_in_any_triton", "tl.dot(..., no_such_keyword=)"], r
    assert gs.triton_api_check()["missing"] == []  # the real kernel sources, against the installed Triton


FAKE_WORKER = """
import argparse, json, os, sys, time
ap = argparse.ArgumentParser()
for a in ("--cases-file", "--jsonl", "--copy-bw", "--iters", "--warmup"):
    ap.add_argument(a)
ap.add_argument("--worker", action="store_true")
ap.add_argument("--dry-run", action="store_true")
args = ap.parse_args()
out = open(args.jsonl, "a", buffering=1)
for c in json.load(open(args.cases_file)):
    out.write(json.dumps(dict(name=c["name"], event="start")) + "\\n")
    if "crash" in c["name"]:
        os._exit(3)
    if "hang" in c["name"]:
        time.sleep(60)
    out.write(json.dumps(dict(name=c["name"], section=c["section"], kind=c["kind"], params=c["params"],
                              status="pass", checks=[dict(output="y", err=0.0, bound=1e-5, ok=True)])) + "\\n")
"""


def test_orchestrator_survives_a_crashed_worker_and_enforces_the_time_box(tmp_path):
    import time
    gs = _suite()
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    args = gs.parse_args(["--dry-run"])
    report = gs.Report(tmp_path / "out", dict(dry_run=True, commit="x", command="test", budget_s=30))
    orch = gs.Orchestrator(args, report, deadline=time.time() + 30)
    orch.worker_cmd = (sys.executable, str(fake))

    def case(name):
        return gs.Case("correctness", name, "gdn", {}, 1.0)

    orch.run_section(gs.Section("correctness", (case("a"), case("b crash"), case("c"), case("d")), 1, 20), 0)
    st = {r["name"]: r["status"] for r in report.data["results"]}
    assert st == {"a": "pass", "b crash": "error", "c": "pass", "d": "pass"}, st
    assert report.data["sections"]["correctness"]["status"] == "done, with failures"
    assert "worker correctness-0 exited 3" in report.data["sections"]["correctness"]["notes"][0]
    orch.deadline = time.time() + 12  # a box under 10 s skips the section
    t0 = time.time()
    orch.run_section(gs.Section("kernels", (gs.Case("kernels", "e", "t_gdn", {}, 1.0),
                                            gs.Case("kernels", "f hang", "t_gdn", {}, 1.0),
                                            gs.Case("kernels", "g", "t_gdn", {}, 1.0)), 1, 20), 0)
    assert time.time() - t0 < 25
    st = {r["name"]: r["status"] for r in report.data["results"] if r["section"] == "kernels"}
    assert st == {"e": "pass", "f hang": "not run", "g": "not run"}, st
    assert report.data["sections"]["kernels"]["status"] == "timeout"
    d = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())  # written as it went
    assert len(d["results"]) == 7 and "worker correctness-0" in (tmp_path / "out" / "gpu_suite_workers.log").read_text()
