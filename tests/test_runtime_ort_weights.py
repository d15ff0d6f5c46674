"""The onnxruntime backend's shared weights: the protobuf reader agrees with onnx, both
sessions get one memory-mapped copy, and sharing changes no result."""

import numpy as np
import onnx
import pytest

from qcn.runtime.backends import create_backend  # noqa: E402
from qcn.runtime.backends.onnx_weights import external_initializers  # noqa: E402
from qcn.runtime.errors import ArtifactError  # noqa: E402
from qcn.runtime.manifest import load_manifest  # noqa: E402
from qcn.runtime.session import Session  # noqa: E402


def test_reader_agrees_with_onnx(art):
    for graph in ("prefill.onnx", "decode.onnx"):
        ours = {t.name: t for t in external_initializers(art.path / graph)}
        model = onnx.load(str(art.path / graph), load_external_data=False)
        want = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert want and sorted(ours) == sorted(t.name for t in want)
        for t in want:
            ext = {e.key: e.value for e in t.external_data}
            o = ours[t.name]
            assert (o.data_type, o.dims, o.location, o.offset, o.length) == (
                t.data_type, tuple(t.dims), ext["location"], int(ext.get("offset", 0)), int(ext.get("length", -1)))


def test_both_sessions_share_one_map(art):
    be = create_backend(load_manifest(art.path))
    names = set()
    for graph in ("prefill.onnx", "decode.onnx"):
        names |= {(t.location, t.offset) for t in external_initializers(art.path / graph)}
    assert len(be._weights._maps) == 1  # weights.bin mapped once
    assert len(be._weights._views) == len(be._shared_values) == len(names)  # one view + OrtValue per tensor
    be.close()


def test_sharing_changes_no_result(art):
    out = {}
    for share in (True, False):
        be = create_backend(load_manifest(art.path), share_weights=share)
        s = Session(be.manifest, be)
        h = s.allocate()
        logits = [s.prefill(h, [5, 6, 7, 8, 9])]
        for t in (3, 4, 5):
            logits.append(s.decode([h], [t])[0])
        out[share] = np.stack(logits)
        be.close()
    np.testing.assert_allclose(out[True], out[False], atol=1e-5)
    np.testing.assert_allclose(out[True][0], art.model.logits([5, 6, 7, 8, 9])[-1], atol=2e-4)


def test_damaged_model_is_an_artifact_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x3a\xff\xff\xff\xff\x0f")  # field 7, length-delimited, length beyond the file
    with pytest.raises(ArtifactError, match="bad.onnx"):
        external_initializers(bad)


def _logits(be):
    s = Session(be.manifest, be)
    h = s.allocate()
    out = [s.prefill(h, [5, 6, 7, 8, 9])]
    for t in (3, 4, 5):
        out.append(s.decode([h], [t])[0])
    be.close()
    return np.stack(out)


def test_prepacking_the_decode_graph_changes_no_result(art):
    m = load_manifest(art.path)
    packed = create_backend(m)
    assert packed.prepack == {"decode"}  # the default: the per-token graph packs, prefill reads the map
    default, none = _logits(packed), _logits(create_backend(m, prepack=()))
    np.testing.assert_allclose(default, none, atol=1e-5)
    np.testing.assert_allclose(_logits(create_backend(m, prepack=("prefill", "decode"))), none, atol=1e-5)


@pytest.mark.parametrize("bad", [("decoder",), "decode", (1,)])
def test_prepack_names_graphs_of_the_artifact(art, bad):
    from qcn.runtime.errors import BackendError
    with pytest.raises(BackendError, match="prepack") as e:
        create_backend(load_manifest(art.path), prepack=bad)
    if bad == ("decoder",):
        assert "prefill, decode" in str(e.value)


def test_graph_ops_reader_agrees_with_onnx(art):
    from qcn.runtime.backends.onnx_weights import graph_ops
    for graph in ("prefill.onnx", "decode.onnx"):
        model = onnx.load(str(art.path / graph), load_external_data=False)
        assert graph_ops(art.path / graph) == {(n.domain, n.op_type) for n in model.graph.node}


def test_a_graph_with_a_packed_only_op_is_prepacked_by_default(art, monkeypatch):
    from qcn.runtime.backends import onnxruntime as ob
    from qcn.runtime.backends.onnx_weights import graph_ops
    only_prefill = sorted(graph_ops(art.path / "prefill.onnx") - graph_ops(art.path / "decode.onnx"))
    op = only_prefill[0] if only_prefill else sorted(graph_ops(art.path / "prefill.onnx"))[0]
    monkeypatch.setattr(ob, "PACKED_OPS", frozenset({op}))
    be = create_backend(load_manifest(art.path))
    assert be.prepack == {"prefill", "decode"}
    be.close()
    monkeypatch.setattr(ob, "PACKED_OPS", frozenset({("com.example", "Nothing")}))
    be = create_backend(load_manifest(art.path))
    assert be.prepack == {"decode"}
    be.close()
