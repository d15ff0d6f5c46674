"""Packaging: the wheel holds every package and data file, and the runtime alone installs and runs.

``test_runtime_only_install_runs_pico`` is the runtime user's path end to end: a fresh virtualenv
(no system site-packages), ``pip install`` of the wheel with no extras (numpy, onnxruntime,
tokenizers and what they pull; no torch, no transformers, no onnx), then that venv's ``qcn-run``
on the qcn-pico artifact this (full) environment compiled, which must print what this
environment's runtime prints. It needs pip to reach the package index (or its cache) and takes
about half a minute; it carries the ``install`` marker (``pytest -m "not install"`` skips it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# source root -> where its files land in the wheel (setup.py's ROOTS, read the other way)
ROOTS = {"qcn_pkg": "qcn", "compile": "qcn/compile", "runtime": "qcn/runtime"}
BASE_REQUIREMENTS = {"numpy", "onnxruntime", "tokenizers"}
# what only the compile extra (or the tests) may bring; none of it may reach a runtime-only venv
NOT_IN_BASE = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors", "triton", "tensorrt_rtx")
# the compile extra's modules that the base pulls in anyway (huggingface_hub, a dependency of
# tokenizers, brings pyyaml and tqdm): installed in the venv, but the runtime must not import them
NOT_IMPORTED = NOT_IN_BASE + ("yaml", "tqdm")
PROMPT = "def fibonacci(n):\n"


def _source_files(root: Path) -> list[Path]:
    return [f for f in sorted(root.rglob("*"))
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A real (non-editable) wheel built from a copy of the package sources, as pip builds it."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for root in ROOTS:
        shutil.copytree(REPO / root, src / root, ignore=ignore)
    for f in ("pyproject.toml", "setup.py"):
        shutil.copy2(REPO / f, src / f)
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("qcn-*.whl")
    return whl


def test_wheel_holds_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"{dest}/{f.relative_to(REPO / root).as_posix()}"
            for root, dest in ROOTS.items() for f in _source_files(REPO / root)}
    assert want - names == set(), "files of the source tree missing from the wheel"
    stray = {n for n in names if not n.startswith("qcn-") and n not in want}
    assert stray == set(), "files in the wheel that the source tree does not have"
    # every directory with an __init__.py is a package in the wheel, subpackages included
    assert "qcn/compile/plugins/moe/__init__.py" in names and "qcn/runtime/backends/__init__.py" in names


def test_wheel_base_requirements_are_the_runtime_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    reqs = meta.get_all("Requires-Dist")
    base = {r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("[")[0].strip().lower()
            for r in reqs if "extra ==" not in r}
    assert base == BASE_REQUIREMENTS
    extras = set(meta.get_all("Provides-Extra"))
    assert {"compile", "serve", "test"} <= extras
    compile_reqs = {r.split(";")[0] for r in reqs if 'extra == "compile"' in r}
    assert any(r.startswith("torch") for r in compile_reqs) and any(r.startswith("transformers") for r in compile_reqs)


@pytest.fixture(scope="module")
def pico_artifact(tmp_path_factory) -> Path:
    """qcn-pico compiled by this (full) environment; the runtime-only venv compiles nothing."""
    from qcn.compile.pipeline import compile_recipe
    from qcn.compile.recipe import ExportOptions, Recipe, RuntimeOptions

    recipe = Recipe(name="install-pico", checkpoint=REPO / "models" / "qcn-pico",
                    output=tmp_path_factory.mktemp("pico") / "artifact", export=ExportOptions(),
                    runtime=RuntimeOptions(prefill_chunk=64, max_batch=2, max_context=256))
    return compile_recipe(recipe)


def _run_args(art: Path, *extra: str) -> list[str]:
    return [str(art), "--prompt", PROMPT, "--max-new-tokens", "24", "--threads", "1", *extra]


@pytest.mark.install
def test_runtime_only_install_runs_pico(wheel, pico_artifact, tmp_path, capsys):
    from qcn.runtime.cli import main

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    py, bindir = env_dir / "bin" / "python", env_dir / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr

    # nothing of the compile extra came along, and qcn.runtime loads without it
    # every runtime module imports (the server's own extra aside), and brings nothing of the others
    probe = ("import importlib, importlib.util, pkgutil, sys, qcn.runtime\n"
             "mods = [m.name for m in pkgutil.walk_packages(qcn.runtime.__path__, 'qcn.runtime.')"
             " if not m.name.startswith('qcn.runtime.serve')]\n"
             "for m in mods: importlib.import_module(m)\n"
             "print(len(mods))\n"
             f"print([m for m in {list(NOT_IN_BASE)!r} if importlib.util.find_spec(m)])\n"
             "print(sorted(m for m in sys.modules if m.startswith('qcn.compile') or m.split('.')[0] in "
             f"{list(NOT_IMPORTED)!r}))")
    r = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    n_modules, found, imported = r.stdout.splitlines()
    assert int(n_modules) >= 8 and found == "[]" and imported == "[]", r.stdout
    r = subprocess.run([str(py), "-c", "import qcn.runtime; print(qcn.runtime.__file__)"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert Path(r.stdout.strip()).is_relative_to(env_dir), r.stdout  # the venv's copy, not this checkout

    for extra in (["--greedy"], ["--temperature", "0.8", "--top-k", "40", "--seed", "7"]):
        r = subprocess.run([str(bindir / "qcn-run"), *_run_args(pico_artifact, *extra)],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert main(_run_args(pico_artifact, *extra)) == 0
        ours = capsys.readouterr().out
        assert len(ours.strip()) > 10
        assert r.stdout == ours, (extra, r.stdout, ours)

    # the other commands exist in a runtime-only install, and say which extra they need
    for extra, cmd in (("compile", ["qcn-compile", str(REPO / "recipes" / "pico_cpu.yaml"), "--out", str(tmp_path / "out")]),
                       ("compile", ["qcn-tiny-checkpoint", str(tmp_path / "ckpt")]),
                       ("serve", ["qcn-serve", str(pico_artifact), "--port", "0"])):
        r = subprocess.run([str(bindir / cmd[0]), *cmd[1:]], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
        assert r.returncode == 2 and r.stdout == "", (cmd, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and f"'{extra}' extra" in r.stderr and f"qcn[{extra}]" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_missing_extra_is_one_line_and_other_import_errors_are_not_hidden(monkeypatch, capsys):
    from qcn import _entry

    def fake_import(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_entry, "import_module", lambda m: fake_import("torch"))
    assert _entry.run("qcn-compile", "qcn.compile.cli", "compile") == 2
    assert "needs the 'compile' extra ('torch' is not installed)" in capsys.readouterr().err
    monkeypatch.setattr(_entry, "import_module", lambda m: fake_import("qcn.compile.no_such_module"))
    with pytest.raises(ModuleNotFoundError):  # a bug of ours, not a missing extra: the traceback stays
        _entry.run("qcn-compile", "qcn.compile.cli", "compile")
