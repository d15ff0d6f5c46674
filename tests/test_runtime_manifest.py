"""manifest.json parsing and validation (docs/CONTRACT.md)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import runtime_fixture as rf  # noqa: E402

from qcn.runtime.backends import available_backends, create_backend  # noqa: E402
from qcn.runtime.backends.onnxruntime import OrtBackend  # noqa: E402
from qcn.runtime.errors import ArtifactError, BackendError  # noqa: E402
from qcn.runtime.generate import load  # noqa: E402
from qcn.runtime.manifest import SUPPORTED_FORMAT_VERSIONS, load_manifest  # noqa: E402


def _edit(path, fn):
    p = Path(path) / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def test_parses_fixture(art_copy):
    m = load_manifest(art_copy.path)
    assert m.format == "qcn-artifact" and m.format_version == 1 and m.stage == "export"
    assert m.model.vocab_size == art_copy.vocab_size and m.model.max_context == 64
    assert m.model.layer_types == rf.LAYER_TYPES
    assert m.tokenizer.eos_token_ids == art_copy.eos_token_ids
    assert m.runtime.backend == "onnxruntime" and m.runtime.prefill_chunk == 4 and m.runtime.max_batch == 4
    assert (m.generation.temperature, m.generation.top_p, m.generation.top_k) == (1.0, 0.95, 40)
    assert [s.kind for s in m.state] == ["conv_state", "recurrent_state", "key", "value", "conv_state", "recurrent_state"]
    key = next(s for s in m.state if s.kind == "key")
    assert key.shape == (rf.KVH, 64, rf.D) and key.input == "past_key.1" and key.output == "new_key.1"
    assert m.graph("prefill").logits == "last" and "past_len" in m.graph("decode").input_names
    assert set(m.files) == {"prefill.onnx", "decode.onnx", "weights.bin", "tokenizer.json", "tokenizer_config.json"}
    m.verify_files()  # intact artifact: no error
    with pytest.raises(Exception):
        m.model.vocab_size = 3  # frozen


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_format_version(art_copy, version):
    _edit(art_copy.path, lambda m: m.__setitem__("format_version", version))
    with pytest.raises(ArtifactError) as e:
        load_manifest(art_copy.path)
    msg = str(e.value)
    assert "format_version" in msg and "supports format_version 1" in msg
    assert SUPPORTED_FORMAT_VERSIONS == (1,)


def test_unknown_format(art_copy):
    _edit(art_copy.path, lambda m: m.__setitem__("format", "onnx-bundle"))
    with pytest.raises(ArtifactError, match=r"unknown format 'onnx-bundle'.*'qcn-artifact'"):
        load_manifest(art_copy.path)


def test_missing_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        load_manifest(tmp_path / "empty")
    with pytest.raises(ArtifactError, match="no such directory"):
        load_manifest(tmp_path / "nope")


def test_missing_listed_file(art_copy):
    (art_copy.path / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match=r"weights\.bin: listed in manifest.json but missing"):
        load_manifest(art_copy.path)


def test_hash_mismatch_is_lazy_but_checked_before_first_session(art_copy):
    p = art_copy.path / "weights.bin"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    m = load_manifest(art_copy.path)  # no hashing yet
    with pytest.raises(ArtifactError, match=r"weights\.bin: sha256 mismatch"):
        OrtBackend(m, art_copy.path)
    with pytest.raises(ArtifactError, match=r"weights\.bin: sha256 mismatch"):
        load(art_copy.path)
    # the opt-out skips the check, and the graphs still open
    m2 = load_manifest(art_copy.path, verify_hashes=False)
    m2.verify_files()
    OrtBackend(m2, art_copy.path)


def test_hash_mismatch_of_tokenizer(art_copy):
    (art_copy.path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"tokenizer_config\.json: sha256 mismatch"):
        load_manifest(art_copy.path).verify_files()


@pytest.mark.parametrize(
    "path, key",
    [
        (("runtime", "prefill_chunk"), "runtime.prefill_chunk"),
        (("model", "max_context"), "model.max_context"),
        (("tokenizer", "eos_token_ids"), "tokenizer.eos_token_ids"),
        (("graphs", "decode"), "graphs.decode"),
        (("state",), "state"),
        (("files",), "files"),
        (("generation", "top_k"), "generation.top_k"),
    ],
)
def test_missing_key(art_copy, path, key):
    def drop(m):
        obj = m
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]

    _edit(art_copy.path, drop)
    with pytest.raises(ArtifactError, match=rf"key '{key}': missing \(expected"):
        load_manifest(art_copy.path)


def test_invalid_values(art_copy):
    _edit(art_copy.path, lambda m: m["runtime"].__setitem__("max_batch", 0))
    with pytest.raises(ArtifactError, match=r"runtime.max_batch.*positive integer, got 0"):
        load_manifest(art_copy.path)


def test_graph_file_not_hashed(art_copy):
    _edit(art_copy.path, lambda m: m["files"].pop("decode.onnx"))
    with pytest.raises(ArtifactError, match=r"graphs.decode.file.*not listed in 'files'"):
        load_manifest(art_copy.path)


def test_path_escaping_artifact_dir(art_copy):
    _edit(art_copy.path, lambda m: m["files"].__setitem__("../outside.bin", "0" * 64))
    with pytest.raises(ArtifactError, match="relative path inside the artifact directory"):
        load_manifest(art_copy.path)


def test_state_not_in_graph(art_copy):
    def f(m):
        m["graphs"]["decode"]["inputs"] = [t for t in m["graphs"]["decode"]["inputs"] if t["name"] != "past_key.1"]

    _edit(art_copy.path, f)
    with pytest.raises(ArtifactError, match=r"graphs.decode.inputs.*'past_key.1'.*not a graph input"):
        load_manifest(art_copy.path)


def test_unknown_graph_input(art_copy):
    _edit(art_copy.path, lambda m: m["graphs"]["prefill"]["inputs"].append({"name": "attention_mask", "dtype": "int64", "shape": ["batch", "tokens"]}))
    with pytest.raises(ArtifactError, match="'attention_mask' is neither"):
        load_manifest(art_copy.path)


def test_logits_rank_must_match_mode(art_copy):
    _edit(art_copy.path, lambda m: m["graphs"]["prefill"].__setitem__("logits", "all"))
    with pytest.raises(ArtifactError, match=r"logits: 'all' means rank 3"):
        load_manifest(art_copy.path)


def test_manifest_that_disagrees_with_onnx_graph(art_copy):
    """Consistent manifest, but the ONNX graph has other input names: the backend refuses."""

    def rename(m):
        for g in m["graphs"].values():
            for t in g["inputs"]:
                if t["name"] == "conv_state.0":
                    t["name"] = "conv_state.zero"
        for s in m["state"]:
            if s["input"] == "conv_state.0":
                s["input"] = "conv_state.zero"

    _edit(art_copy.path, rename)
    m = load_manifest(art_copy.path)
    with pytest.raises(ArtifactError, match=r"prefill.onnx: graph inputs disagree.*conv_state.zero.*conv_state.0"):
        OrtBackend(m, art_copy.path)


def test_unknown_backend_lists_available(art_copy):
    _edit(art_copy.path, lambda m: m["runtime"].__setitem__("backend", "nosuch"))
    m = load_manifest(art_copy.path)
    assert "onnxruntime" in available_backends()
    with pytest.raises(BackendError, match=r"unknown backend 'nosuch'.*available backends: onnxruntime, tensorrt"):
        create_backend(m)
    assert isinstance(create_backend(m, backend="onnxruntime"), OrtBackend)
