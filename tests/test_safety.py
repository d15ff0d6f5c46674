"""A careless user cannot lose data or get stale or broken models (issue #16): outputs replace
only qcn artifacts, the checkpoint is never the output, a same-shape retrain rebuilds, no
temporary directory survives SIGINT / SIGTERM / SIGKILL (+ rerun), everything the runtime would
refuse is refused before work, and every mistake is one line with a non-zero exit."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qcn.compile import cli
from qcn.compile import artifacts as art_mod
from qcn.compile.artifacts import HashCache, OutputError, atomic_dir, check_output, remove_stale, sha256_file
from qcn.compile.build.preflight import PreflightError
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
from qcn.compile.pipeline import checkpoint_fingerprint, run_pipeline
from qcn.compile.recipe import RecipeError, RuntimeOptions, load_recipe
from qcn.errors import QcnError

SPEC = "sparse_step2"  # the smallest tiny config
ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_SPECS[SPEC], seed=1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _recipe_file(tmp_path: Path, ckpt: Path, out: Path | str, **top) -> Path:
    data = yaml.safe_load((ROOT / "recipes/tiny_cpu.yaml").read_text())
    data.update(checkpoint=str(ckpt), output=str(out), **top)
    data["runtime"]["max_context"] = 256
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _recipe(ckpt: Path, out: Path, **export):
    r = load_recipe(ROOT / "recipes/tiny_cpu.yaml", checkpoint=ckpt, output=out)
    r = dataclasses.replace(r, runtime=RuntimeOptions(max_context=256))
    return dataclasses.replace(r, export=dataclasses.replace(r.export, **export)) if export else r


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def _qcn_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".qcn-") or ".tmp-" in p.name)


def _one_line_error(capsys, argv, *needles, code=2) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert err.startswith("qcn-compile: error:") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# ---------------------------------------------------------------------------------------
# output safety

def test_users_folder_and_file_survive_a_compile_pointed_at_them(ckpt, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.py").write_text("print('mine')\n")
    (src / "notes.txt").write_text("do not delete\n")
    before = _tree(src)
    recipe = _recipe_file(tmp_path, ckpt, src)
    _one_line_error(capsys, [str(recipe), "-q"], str(src), "a directory holding 2 entries (main.py, notes.txt",
                    "--force")
    assert _tree(src) == before
    blocker = tmp_path / "a_file"
    blocker.write_text("user data")
    _one_line_error(capsys, [str(recipe), "--out", str(blocker), "-q"], str(blocker), "is a file (9 B)")
    assert blocker.read_text() == "user data"
    assert _qcn_leftovers(tmp_path) == []


def test_checkpoint_is_never_the_output_even_with_force(ckpt, tmp_path, capsys):
    mine = _copy(ckpt, tmp_path / "models" / "ckpt")
    before = _tree(mine)
    recipe = _recipe_file(tmp_path, mine, mine)
    _one_line_error(capsys, [str(recipe), "--force", "-q"], "is the checkpoint directory", "never replaces it")
    _one_line_error(capsys, [str(recipe), "--out", str(mine.parent), "--force", "-q"],
                    "contains the checkpoint directory")
    assert _tree(mine) == before


def test_out_dot_and_parents_of_the_current_directory(ckpt, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "file.txt").write_text("x")
    monkeypatch.chdir(work)
    recipe = _recipe_file(tmp_path, ckpt, "build/a")
    _one_line_error(capsys, [str(recipe), "--out", ".", "-q"], "output . is the current directory")
    _one_line_error(capsys, [str(recipe), "--out", "..", "--force", "-q"], "contains the current directory")
    assert (work / "file.txt").read_text() == "x"


def test_file_blocked_and_unwritable_output_paths(ckpt, tmp_path, capsys):
    (tmp_path / "plain").write_text("")
    recipe = _recipe_file(tmp_path, ckpt, tmp_path / "plain" / "sub" / "out")
    _one_line_error(capsys, [str(recipe), "-q"], f"cannot create it, {tmp_path / 'plain'} is a file")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _one_line_error(capsys, [str(recipe), "--out", str(ro / "out"), "-q"], "permission denied")


def test_qcn_artifacts_and_empty_folders_are_replaced_force_replaces_a_users_folder(ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty)  # nothing to lose
    fake = tmp_path / "artifact"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"format": "qcn-artifact"}))
    check_output(fake)
    user = tmp_path / "user"
    user.mkdir()
    (user / "a.txt").write_text("a")
    with pytest.raises(OutputError, match="qcn replaces only directories it wrote"):
        check_output(user)
    with atomic_dir(user, force=True, protect=[ckpt]) as tmp:  # what --force does to each stage directory
        (tmp / "manifest.json").write_text(json.dumps({"format": "qcn-artifact"}))
    assert json.loads((user / "manifest.json").read_text())["format"] == "qcn-artifact"
    assert not (user / "a.txt").exists() and _qcn_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------
# exact staleness

def test_same_shape_retrain_rebuilds_and_a_noop_reads_nothing(ckpt, tmp_path):
    mine = _copy(ckpt, tmp_path / "ckpt")
    out = tmp_path / "out"
    recipe = _recipe(mine, out)
    assert run_pipeline(recipe).ran == ["export", "passes"]
    weights = sha256_file(out / "weights.bin")
    cache = HashCache(art_mod.default_cache_path())
    assert run_pipeline(recipe, hash_cache=cache).skipped == ["export", "passes"]
    assert cache.hashed_bytes == 0, "a no-op recompile re-read files it had hashed"

    # retrain in place: same shapes, new weights, written over the same files; mtimes put back
    retrained = write_tiny_checkpoint(tmp_path / "retrained", TINY_SPECS[SPEC], seed=2)
    shards = sorted(p.name for p in mine.glob("*.safetensors"))
    assert shards == sorted(p.name for p in retrained.glob("*.safetensors"))
    for name in shards:
        st = (mine / name).stat()
        data = (retrained / name).read_bytes()
        assert len(data) == st.st_size  # same shapes: same sizes
        with open(mine / name, "r+b") as f:
            f.write(data)
        os.utime(mine / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = run_pipeline(recipe)
    assert result.ran == ["export", "passes"], "a same-shape retrain was taken as up to date"
    assert sha256_file(out / "weights.bin") != weights
    m = json.loads((out / "manifest.json").read_text())
    assert m["checkpoint"]["files_sha256"] == {p.name: sha256_file(p) for p in
                                               sorted(mine.iterdir()) if p.name in m["checkpoint"]["files_sha256"]}
    assert set(shards) | {"config.json", "tokenizer.json"} <= set(m["checkpoint"]["files_sha256"])


def test_hash_cache_hits_only_unchanged_files(tmp_path):
    f = tmp_path / "shard.bin"
    f.write_bytes(b"a" * 1000)
    c = HashCache(tmp_path / "cache.json")
    first = c.sha256(f)
    c.save()
    c2 = HashCache(tmp_path / "cache.json")
    assert c2.sha256(f) == first and c2.hashed_bytes == 0
    st = f.stat()
    with open(f, "r+b") as fh:  # one byte, same size, mtime restored
        fh.seek(500)
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert c2.sha256(f) != first and c2.hashed_bytes == 1000
    assert checkpoint_fingerprint(tmp_path, HashCache()) == {}  # no checkpoint files here


# ---------------------------------------------------------------------------------------
# temporary directories: SIGTERM, SIGKILL + rerun, Ctrl-C

def _start_compile(tmp_path: Path, ckpt: Path, out: Path) -> subprocess.Popen:
    recipe = _recipe_file(tmp_path, ckpt, out)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg-cache"))
    return subprocess.Popen([sys.executable, "-m", "qcn.compile.cli", str(recipe), "-q"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_tmp(proc: subprocess.Popen, parent: Path, timeout: float = 120) -> Path:
    """The first temporary directory of the compile: the export's, in <out>.stages/ (the cpu
    artifact, <out>, is the passes stage's)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        tmps = [p for d in (parent, parent / "out.stages") if d.exists() for p in d.iterdir()
                if p.name.startswith(art_mod.TMP_PREFIX)]
        if tmps:
            return tmps[0]
        if proc.poll() is not None:
            raise AssertionError(f"compile ended before it wrote anything: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no temporary directory appeared")


@pytest.mark.parametrize("sig,code,words", [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                            (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_signal_mid_compile_exits_cleanly_and_leaves_nothing(ckpt, tmp_path, sig, code, words):
    parent = tmp_path / "arts"
    proc = _start_compile(tmp_path, ckpt, parent / "out")
    tmp = _wait_for_tmp(proc, parent)
    assert tmp.name.startswith(f".qcn-tmp-export-{proc.pid}-")  # visibly qcn's, and whose
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in parent.iterdir()) == []


class _RaisesInFinalizer:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)
        sum(range(1000))  # bytecode: the handler runs here, inside __del__, and Python drops its exception


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # nothing "Exception ignored" printed
def test_a_signal_dropped_by_a_finalizer_is_quiet_and_stops_at_the_next_check(tmp_path):
    """Python drops an exception raised inside __del__ and prints "Exception ignored in ..." with
    a traceback (seen when Ctrl-C landed in regex's Group.__del__ during a compile): nothing is
    printed, `raise_if_interrupted` (the export's weight loop) raises it, and the half-finished
    output is never renamed into place."""
    target = tmp_path / "out"
    progress = []
    with pytest.raises(art_mod.Terminated):
        with art_mod.interrupt_on_signals():
            with atomic_dir(target) as tmp:
                (tmp / "weights.bin").write_bytes(b"x")
                obj = _RaisesInFinalizer()
                del obj
                progress.append("after the finalizer")  # the body went on: the exception really was dropped
                art_mod.raise_if_interrupted()
                progress.append("after the check")
    assert progress == ["after the finalizer"]
    assert not target.exists() and _qcn_leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is not art_mod._on_signal  # handlers restored
    art_mod.raise_if_interrupted()  # outside interrupt_on_signals: nothing pending


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # dropped by the hook put in below
def test_a_signal_swallowed_by_a_finalizer_still_stops_the_swap(tmp_path):
    """Even when nothing in the body calls raise_if_interrupted, the swap itself refuses: no
    half-finished output is renamed into place."""
    target = tmp_path / "out"
    reached = False
    with pytest.raises(art_mod.Terminated):
        with art_mod.interrupt_on_signals():
            with atomic_dir(target) as tmp:
                (tmp / "weights.bin").write_bytes(b"x")
                obj = _RaisesInFinalizer()
                del obj
                reached = True
    assert reached and not target.exists() and _qcn_leftovers(tmp_path) == []


def test_sigkill_leftovers_are_removed_by_the_next_compile(ckpt, tmp_path, caplog):
    parent = tmp_path / "arts"
    proc = _start_compile(tmp_path, ckpt, parent / "out")
    tmp = _wait_for_tmp(proc, parent)
    (tmp / "partial.bin").write_bytes(b"\0" * 5000)
    proc.kill()
    proc.wait(timeout=60)
    left = _qcn_leftovers(tmp.parent)  # <out>.stages: the export's temporary directory
    assert tmp.name in left and any(n.startswith(art_mod.LOCK_PREFIX) for n in left)
    with caplog.at_level(logging.WARNING, logger="qcn.compile.artifacts"):
        assert run_pipeline(_recipe(ckpt, parent / "out")).ran == ["export", "passes"]
    assert _qcn_leftovers(tmp.parent) == [] and _qcn_leftovers(parent) == []
    assert (parent / "out" / "manifest.json").is_file()
    assert any(tmp.name in r.getMessage() and "5.0 KB" in r.getMessage() for r in caplog.records), caplog.text


def test_a_live_owners_temporary_directory_is_left_alone(tmp_path):
    token, lock, fd = art_mod._new_lock(tmp_path, "out")  # held by this (live) process
    try:
        live = tmp_path / f"{art_mod.TMP_PREFIX}{token}"
        live.mkdir()
        dead = tmp_path / f"{art_mod.TMP_PREFIX}out-1-abcdef"  # no lock: its owner is gone
        dead.mkdir()
        removed = remove_stale(tmp_path)
        assert [p for p, _ in removed] == [dead] and live.is_dir() and lock.exists()
    finally:
        os.close(fd)
    assert [p for p, _ in remove_stale(tmp_path)] == [live] and not lock.exists()


def test_interrupt_inside_atomic_dir_keeps_the_old_artifact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "qcn-artifact", "v": 1}))
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    assert json.loads((out / "manifest.json").read_text())["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------
# validation before work: what the runtime would refuse at load

def _edit_json(path: Path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("case,needle", [
    ("eos_outside_vocab", "tokenizer.eos_token_ids: id 5000 >= model.vocab_size 700"),
    ("no_eos", "has no EOS token id"),
    ("bos_outside_vocab", "tokenizer.bos_token_id: id 9999 is outside the vocabulary 0..699"),
    ("tokenizer_bigger_than_vocab", "tokenizer.json has token id 700, but model.vocab_size is 700"),
    ("bf16_on_cpu", "export.activation_dtype: bfloat16 on target 'cpu'"),
    ("rope_type", "rope_scaling.rope_type': found 'dynamic'"),
])
def test_what_the_runtime_refuses_is_refused_before_export(ckpt, tmp_path, case, needle, capsys):
    mine = _copy(ckpt, tmp_path / "ckpt")
    export = {}
    if case == "eos_outside_vocab":
        _edit_json(mine / "generation_config.json", eos_token_id=5000)
    elif case == "no_eos":
        _edit_json(mine / "generation_config.json", eos_token_id=None)
        _edit_json(mine / "config.json", eos_token_id=None)
    elif case == "bos_outside_vocab":
        _edit_json(mine / "config.json", bos_token_id=9999)
    elif case == "tokenizer_bigger_than_vocab":
        tok = json.loads((mine / "tokenizer.json").read_text())
        tok["added_tokens"].append({"id": 705, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
        (mine / "tokenizer.json").write_text(json.dumps(tok))
    elif case == "bf16_on_cpu":
        export = {"activation_dtype": "bfloat16"}
    elif case == "rope_type":
        _edit_json(mine / "config.json", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    out = tmp_path / "out"
    with pytest.raises(QcnError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        run_pipeline(_recipe(mine, out, **export))
    assert not out.exists() and _qcn_leftovers(tmp_path) == []
    if case in ("rope_type", "bf16_on_cpu"):  # and through the CLI: one line, exit 2
        recipe = _recipe_file(tmp_path, mine, out, **({"export": {**yaml.safe_load(
            (ROOT / "recipes/tiny_cpu.yaml").read_text())["export"], **export}} if export else {}))
        _one_line_error(capsys, [str(recipe), "-q"], needle)


# ---------------------------------------------------------------------------------------
# recipes: duplicate keys, ~

def test_a_repeated_yaml_key_is_an_error(tmp_path):
    text = (ROOT / "recipes/tiny_cpu.yaml").read_text().replace("  max_batch: 4", "  max_batch: 4\n  max_batch: 8")
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"r.yaml: key 'max_batch' appears twice in one mapping \(line \d+ and line \d+\)"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "top.yaml").write_text(text + "name: other\n")
    with pytest.raises(RecipeError, match="key 'name' appears twice"):
        load_recipe(tmp_path / "top.yaml")


def test_tilde_is_the_home_directory_never_a_literal_folder(ckpt, tmp_path, monkeypatch, capsys):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (home / "ck").symlink_to(ckpt)
    recipe = _recipe_file(tmp_path, "~/ck", "~/arts/x")
    r = load_recipe(recipe)
    assert r.output == home / "arts" / "x" and r.checkpoint == home / "ck"
    assert load_recipe(recipe, output="~/y").output == home / "y"
    assert cli.main([str(recipe), "-q"]) == 0, capsys.readouterr().err
    assert (home / "arts" / "x" / "manifest.json").is_file()
    assert not (work / "~").exists() and list(work.iterdir()) == []


# ---------------------------------------------------------------------------------------
# clear errors

@pytest.mark.parametrize("error", ["qcn.runtime.errors:ArtifactError", "qcn.compile.build.trt:BuildError",
                                   "qcn.compile.export.config:CheckpointError", "qcn.compile.artifacts:OutputError"])
def test_every_qcn_error_reaches_the_cli_as_one_line(ckpt, tmp_path, monkeypatch, capsys, error):
    import importlib

    mod, name = error.split(":")
    cls = getattr(importlib.import_module(mod), name)
    assert issubclass(cls, QcnError)

    def boom(*a, **k):
        raise cls(f"{name} went wrong")

    monkeypatch.setattr("qcn.compile.pipeline.run_pipeline", boom)
    _one_line_error(capsys, [str(_recipe_file(tmp_path, ckpt, tmp_path / "o")), "-q"], f"{name} went wrong")


def test_a_bug_keeps_its_traceback(ckpt, tmp_path, monkeypatch):
    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("qcn.compile.pipeline.run_pipeline", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main([str(_recipe_file(tmp_path, ckpt, tmp_path / "o")), "-q"])


# ---------------------------------------------------------------------------------------
# invalid UTF-8 prompts: argv, stdin, Python API

def test_invalid_utf8_prompt_is_one_clear_line(art, monkeypatch, capsys):
    from qcn.runtime import cli as run_cli
    from qcn.runtime.errors import TokenizerError
    from qcn.runtime.generate import load

    path = str(art.path)
    # argv: Python hands undecodable bytes over as lone surrogates (surrogateescape)
    assert run_cli.main([path, "--prompt", os.fsdecode(b"def f\xff():"), "--greedy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qcn-run: error: --prompt is not valid UTF-8 text: byte 0xff at character 5; pass UTF-8 encoded text"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xc3\x28 bad")))
    assert run_cli.main([path, "--prompt", "-", "--greedy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qcn-run: error: the prompt on standard input is not valid UTF-8 text: byte 0xc3 at offset 3")
    with load(path) as gen, pytest.raises(TokenizerError, match="prompt is not valid UTF-8 text"):
        gen.generate(["x\udcff"], gen.params(max_new_tokens=2))


def test_invalid_utf8_in_a_real_argv(art):
    proc = subprocess.run([sys.executable, "-m", "qcn.runtime.cli", str(art.path), "--prompt",
                           b"caf\xe9", "--greedy"], capture_output=True, cwd=ROOT, timeout=120)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "byte 0xe9 at character 3" in err
