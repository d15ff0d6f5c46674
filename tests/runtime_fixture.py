"""A tiny hand-made artifact that follows docs/CONTRACT.md, plus a numpy reference of its math.

The model (3 layers: linear, attention, linear; H=8) is not Qwen3-Next, but it exercises every
kind of state the contract defines, and its logits depend on the token history through each:

- linear layers: u = h @ Wu; a depthwise causal conv (kernel K) over [conv_state ; u] -> tanh
  gives c; q, k, v = c @ Wq/Wk/Wv per head; recurrent state S_h <- decay_h * S_h + k_h (x) v_h;
  o_h = S_h^T q_h; h += o @ Wo.
  The graph evaluates a whole chunk in closed form (decay matrices); the reference steps
  token by token, so the two are independent implementations.
- attention layer: q, k get an additive positional signal sin(pos * freq + phase) with
  pos = past_len + t (so a wrong past_len changes the result), GQA (head h reads KV head
  h // (Hq/KVH)), causal softmax attention over [cache positions < past_len ; new tokens]
  exactly as the contract's CachedAttention masking. new_key/new_value are the new tokens'
  K/V.
- logits = h @ W_lm, of the last token ("last") or of every token ("all").

Weights are ONNX external data in one weights.bin shared by prefill.onnx and decode.onnx.
The tokenizer is a byte-level BPE trained on a few lines; V = its vocabulary size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcn.artifact import (DTYPES, FORMAT, FORMAT_VERSION, LOGITS_MODES, CheckpointInfo, GenerationDefaults, GraphSpec,
                          Manifest, ModelSpec, RuntimeSpec, StateSpec, TensorSpec, TokenizerSpec, hash_files,
                          manifest_to_json, write_manifest)

OPSET = 21
INT64_MAX = np.iinfo(np.int64).max

H = 8  # hidden
C = 6  # conv channels
K = 3  # conv kernel
HV, DK, DV = 2, 3, 2  # linear-attention heads and head dims (Dk != Dv on purpose)
HQ, KVH, D = 4, 2, 4  # attention heads (GQA group 2) and head dim
LAYER_TYPES = ("linear_attention", "full_attention", "linear_attention")
EOS_TOKENS = ("<|endoftext|>", "<|im_end|>")

CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n    print(i, i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
    "The quick brown fox jumps over the lazy dog.",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "Grüße aus Köln: café, naïve, façade, €100, 日本語のテキスト, emoji 😀🚀.",
    "while True:\n    line = input()\n    if not line:\n        break\n",
    "return {'key': value, 'list': [1, 2, 3]}",
]


# ----------------------------------------------------------------------------------------
# reference model


@dataclass
class ReferenceModel:
    """Pure-numpy, token-by-token implementation of the fixture's math (float64)."""

    w: dict[str, np.ndarray]
    vocab_size: int

    def logits(self, ids, ablate: frozenset[str] = frozenset()) -> np.ndarray:
        """Logits [n, V] for every position of ``ids``, computed from scratch.

        ``ablate`` drops history from one state kind ("conv", "recurrent", "kv") to show the
        output really depends on it.
        """
        ids = list(ids)
        n = len(ids)
        w = self.w
        h = w["embed"][ids].astype(np.float64)  # [n, H]
        for layer, kind in enumerate(LAYER_TYPES):
            p = f"l{layer}."
            if kind == "linear_attention":
                u = h @ w[p + "wu"]  # [n, C]
                cw = w[p + "conv"][:, 0, :]  # [C, K]
                S = np.zeros((HV, DK, DV))
                out = np.zeros((n, HV * DV))
                for t in range(n):
                    acc = np.zeros(C)
                    for j in range(K):  # window position j reads input t - (K-1) + j
                        s = t - (K - 1) + j
                        if s >= 0 and (s == t or "conv" not in ablate):
                            acc += cw[:, j] * u[s]
                    c = np.tanh(acc)
                    q = (c @ w[p + "wq"]).reshape(HV, DK)
                    k = (c @ w[p + "wk"]).reshape(HV, DK)
                    v = (c @ w[p + "wv"]).reshape(HV, DV)
                    if "recurrent" in ablate:
                        S = np.zeros_like(S)
                    S = w[p + "decay"][:, None, None] * S + k[:, :, None] * v[:, None, :]
                    out[t] = np.einsum("hkv,hk->hv", S, q).reshape(-1)
                h = h + out @ w[p + "wo"]
            else:
                pos = np.arange(n, dtype=np.float64)
                pe = 0.5 * np.sin(pos[:, None] * w[p + "freq"][None, :] + w[p + "phase"][None, :])  # [n, D]
                q = (h @ w[p + "wq"]).reshape(n, HQ, D) + pe[:, None, :]
                k = (h @ w[p + "wk"]).reshape(n, KVH, D) + pe[:, None, :]
                v = (h @ w[p + "wv"]).reshape(n, KVH, D)
                g = HQ // KVH
                out = np.zeros((n, HQ, D))
                for t in range(n):
                    lo = t if "kv" in ablate else 0
                    for hh in range(HQ):
                        kv = hh // g
                        sc = k[lo : t + 1, kv] @ q[t, hh] * D**-0.5
                        pr = np.exp(sc - sc.max())
                        pr /= pr.sum()
                        out[t, hh] = pr @ v[lo : t + 1, kv]
                h = h + out.reshape(n, HQ * D) @ w[p + "wo"]
        return h @ w["lm_head"]

    def greedy(self, prompt_ids, max_new_tokens: int, eos_ids=()) -> list[int]:
        """Greedy continuation (recomputes from scratch every step)."""
        ids = list(prompt_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(self.logits(ids)[-1]))
            out.append(tok)
            if tok in eos_ids:
                break
            ids.append(tok)
        return out


def make_weights(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def rnd(*shape, scale=1.0):
        fan_in = shape[0] if len(shape) > 1 else 1
        return (rng.standard_normal(shape) * scale / np.sqrt(fan_in)).astype(np.float32)

    w: dict[str, np.ndarray] = {"embed": rnd(vocab_size, H, scale=1.0) * np.float32(np.sqrt(vocab_size) / 2)}
    for layer, kind in enumerate(LAYER_TYPES):
        p = f"l{layer}."
        if kind == "linear_attention":
            w[p + "wu"] = rnd(H, C, scale=1.5)
            w[p + "conv"] = (rng.standard_normal((C, 1, K)) * 0.8).astype(np.float32)
            w[p + "wq"] = rnd(C, HV * DK, scale=1.5)
            w[p + "wk"] = rnd(C, HV * DK, scale=1.5)
            w[p + "wv"] = rnd(C, HV * DV, scale=1.5)
            w[p + "decay"] = np.array([0.85, 0.6], dtype=np.float32)
            w[p + "wo"] = rnd(HV * DV, H, scale=1.0)
        else:
            w[p + "wq"] = rnd(H, HQ * D, scale=1.5)
            w[p + "wk"] = rnd(H, KVH * D, scale=1.5)
            w[p + "wv"] = rnd(H, KVH * D, scale=1.5)
            w[p + "wo"] = rnd(HQ * D, H, scale=1.0)
            w[p + "freq"] = np.array([1.0, 0.5, 0.25, 0.125], dtype=np.float32)
            w[p + "phase"] = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    w["lm_head"] = rnd(H, vocab_size, scale=0.6)
    return w


# ----------------------------------------------------------------------------------------
# ONNX graphs


class _Builder:
    def __init__(self, weights: dict[str, np.ndarray]):
        self.nodes: list = []
        self.inits: dict[str, TensorProto] = {}
        self.weights = weights
        self.n = 0

    def W(self, name: str) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(self.weights[name], name)
        return name

    def c(self, value, dtype=np.float32) -> str:
        self.n += 1
        name = f"const_{self.n}"
        self.inits[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def i64(self, value) -> str:
        return self.c(value, np.int64)

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self.n += 1
        out = out or f"{op_type.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self.n}_{op_type}", **attrs))
        return out


def _linear_layer(b: _Builder, h: str, layer: int, tpos: str, tf: str) -> str:
    p = f"l{layer}."
    u = b.op("MatMul", h, b.W(p + "wu"))
    cat = b.op("Concat", f"conv_state.{layer}", b.op("Transpose", u, perm=[0, 2, 1]), axis=2)  # [B, C, K-1+T]
    conv = b.op("Conv", cat, b.W(p + "conv"), group=C, kernel_shape=[K])  # [B, C, T]
    b.op("Slice", cat, b.i64([-(K - 1)]), b.i64([INT64_MAX]), b.i64([2]), out=f"present.conv_state.{layer}")
    c = b.op("Tanh", b.op("Transpose", conv, perm=[0, 2, 1]))  # [B, T, C]

    def heads(wname, dh):
        return b.op("Transpose", b.op("Reshape", b.op("MatMul", c, b.W(wname)), b.i64([0, 0, HV, dh])), perm=[0, 2, 1, 3])

    q, k, v = heads(p + "wq", DK), heads(p + "wk", DK), heads(p + "wv", DV)  # [B, HV, T, d]
    logd = b.op("Reshape", b.op("Log", b.W(p + "decay")), b.i64([HV, 1, 1]))
    diff = b.op("Sub", b.op("Unsqueeze", tpos, b.i64([1])), b.op("Unsqueeze", tpos, b.i64([0])))  # [T, T] = t - s
    dm = b.op(
        "Where",
        b.op("GreaterOrEqual", diff, b.c(0.0)),
        b.op("Exp", b.op("Mul", logd, b.op("Relu", diff))),
        b.c(0.0),
    )  # [HV, T, T]
    a = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), dm)
    o_intra = b.op("MatMul", a, v)
    s0 = f"recurrent_state.{layer}"
    tcol = b.op("Unsqueeze", tpos, b.i64([0, 2]))  # [1, T, 1]
    dq = b.op("Exp", b.op("Mul", logd, b.op("Add", tcol, b.c(1.0))))  # [HV, T, 1]
    o_state = b.op("Mul", b.op("MatMul", q, s0), dq)
    o = b.op("Reshape", b.op("Transpose", b.op("Add", o_intra, o_state), perm=[0, 2, 1, 3]), b.i64([0, 0, HV * DV]))
    h = b.op("Add", h, b.op("MatMul", o, b.W(p + "wo")))
    # state after the chunk: decay^T * S0 + sum_s decay^(T-1-s) k_s (x) v_s
    ks = b.op("Mul", k, b.op("Exp", b.op("Mul", logd, b.op("Sub", b.op("Sub", tf, b.c(1.0)), tcol))))
    b.op(
        "Add",
        b.op("Mul", b.op("Exp", b.op("Mul", logd, tf)), s0),
        b.op("MatMul", b.op("Transpose", ks, perm=[0, 1, 3, 2]), v),
        out=f"present.recurrent_state.{layer}",
    )
    return h


def _attention_layer(b: _Builder, h: str, layer: int, tpos_i: str) -> str:
    p = f"l{layer}."
    g = HQ // KVH
    pos = b.op("Cast", b.op("Add", b.op("Unsqueeze", "past_len", b.i64([1])), b.op("Unsqueeze", tpos_i, b.i64([0]))), to=TensorProto.FLOAT)
    pe = b.op("Mul", b.op("Sin", b.op("Add", b.op("Mul", b.op("Unsqueeze", pos, b.i64([2])), b.W(p + "freq")), b.W(p + "phase"))), b.c(0.5))
    pe = b.op("Unsqueeze", pe, b.i64([2]))  # [B, T, 1, D]
    q = b.op("Transpose", b.op("Add", b.op("Reshape", b.op("MatMul", h, b.W(p + "wq")), b.i64([0, 0, HQ, D])), pe), perm=[0, 2, 1, 3])
    b.op("Transpose", b.op("Add", b.op("Reshape", b.op("MatMul", h, b.W(p + "wk")), b.i64([0, 0, KVH, D])), pe), perm=[0, 2, 1, 3], out=f"new_key.{layer}")
    b.op("Transpose", b.op("Reshape", b.op("MatMul", h, b.W(p + "wv")), b.i64([0, 0, KVH, D])), perm=[0, 2, 1, 3], out=f"new_value.{layer}")
    kall = b.op("Concat", f"past_key.{layer}", f"new_key.{layer}", axis=2)  # [B, KVH, L, D]
    vall = b.op("Concat", f"past_value.{layer}", f"new_value.{layer}", axis=2)

    def rep(x):  # [B, KVH, L, D] -> [B, HQ, L, D], head h reads KV head h // g
        u = b.op("Unsqueeze", x, b.i64([2]))
        return b.op("Reshape", b.op("Concat", *([u] * g), axis=2), b.i64([0, HQ, -1, D]))

    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", rep(kall), perm=[0, 1, 3, 2])), b.c(D**-0.5))  # [B, HQ, T, L]
    past = b.op("Gather", b.op("Shape", f"past_key.{layer}"), b.i64(2), axis=0)
    tlen = b.op("Gather", b.op("Shape", "input_ids"), b.i64(1), axis=0)
    jpos = b.op("Range", b.i64(0), b.op("Add", past, tlen), b.i64(1))  # [L]
    cond1 = b.op(
        "And",
        b.op("Less", jpos, past),
        b.op("Less", b.op("Unsqueeze", jpos, b.i64([0])), b.op("Unsqueeze", "past_len", b.i64([1]))),
    )  # [B, L]
    cond1 = b.op("Unsqueeze", cond1, b.i64([1, 2]))  # [B, 1, 1, L]
    cond2 = b.op(
        "And",
        b.op("GreaterOrEqual", jpos, past),
        b.op("LessOrEqual", b.op("Unsqueeze", b.op("Sub", jpos, past), b.i64([0])), b.op("Unsqueeze", tpos_i, b.i64([1]))),
    )  # [T, L]
    visible = b.op("Or", cond1, cond2)  # [B, 1, T, L]
    probs = b.op("Softmax", b.op("Where", visible, scores, b.c(-1e30)), axis=-1)
    out = b.op("MatMul", probs, rep(vall))  # [B, HQ, T, D]
    out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.i64([0, 0, HQ * D]))
    return b.op("Add", h, b.op("MatMul", out, b.W(p + "wo")))


def _io_specs(vocab_size: int, decode: bool, logits: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    tok = 1 if decode else "tokens"
    ins = [TensorSpec("input_ids", "int64", ("batch", tok)), TensorSpec("past_len", "int64", ("batch",))]
    outs = [TensorSpec("logits", "float32", ("batch", vocab_size) if logits == "last" else ("batch", tok, vocab_size))]
    for layer, kind in enumerate(LAYER_TYPES):
        if kind == "linear_attention":
            for name, shape in ((f"conv_state.{layer}", ("batch", C, K - 1)), (f"recurrent_state.{layer}", ("batch", HV, DK, DV))):
                ins.append(TensorSpec(name, "float32", shape))
                outs.append(TensorSpec("present." + name, "float32", shape))
        else:
            for kv in ("key", "value"):
                ins.append(TensorSpec(f"past_{kv}.{layer}", "float32", ("batch", KVH, "past", D)))
                outs.append(TensorSpec(f"new_{kv}.{layer}", "float32", ("batch", KVH, tok, D)))
    return ins, outs


def _state_list() -> tuple[StateSpec, ...]:
    out = []
    for layer, kind in enumerate(LAYER_TYPES):
        if kind == "linear_attention":
            out.append(StateSpec(layer, "conv_state", f"conv_state.{layer}", f"present.conv_state.{layer}", (C, K - 1), "float32"))
            out.append(StateSpec(layer, "recurrent_state", f"recurrent_state.{layer}", f"present.recurrent_state.{layer}", (HV, DK, DV), "float32"))
        else:
            for kv in ("key", "value"):
                out.append(StateSpec(layer, kv, f"past_{kv}.{layer}", f"new_{kv}.{layer}", (KVH, "max_context", D), "float32"))
    return tuple(out)


def build_graph(weights: dict[str, np.ndarray], vocab_size: int, *, decode: bool, logits: str) -> onnx.ModelProto:
    b = _Builder(weights)
    tlen = b.op("Gather", b.op("Shape", "input_ids"), b.i64(1), axis=0)
    tpos_i = b.op("Range", b.i64(0), tlen, b.i64(1))
    tpos = b.op("Cast", tpos_i, to=TensorProto.FLOAT)
    tf = b.op("Cast", tlen, to=TensorProto.FLOAT)
    h = b.op("Gather", b.W("embed"), "input_ids", axis=0)  # [B, T, H]
    for layer, kind in enumerate(LAYER_TYPES):
        if kind == "linear_attention":
            h = _linear_layer(b, h, layer, tpos, tf)
        else:
            h = _attention_layer(b, h, layer, tpos_i)
    if logits == "last":
        h = b.op("Squeeze", b.op("Slice", h, b.i64([-1]), b.i64([INT64_MAX]), b.i64([1])), b.i64([1]))
    b.op("MatMul", h, b.W("lm_head"), out="logits")
    ins, outs = _io_specs(vocab_size, decode, logits)
    vi = lambda t: helper.make_tensor_value_info(t.name, DTYPES[t.dtype].onnx, t.shape)  # noqa: E731
    graph = helper.make_graph(
        b.nodes, "qcn_fixture_" + ("decode" if decode else "prefill"), [vi(t) for t in ins], [vi(t) for t in outs], initializer=list(b.inits.values())
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qcn-test-fixture")
    model.ir_version = 10
    return model


def _externalize(models: list[onnx.ModelProto], weights: dict[str, np.ndarray], path: Path) -> None:
    """Write every named weight once to ``path`` and point both graphs' initializers at it."""
    offsets: dict[str, tuple[int, int]] = {}
    with open(path, "wb") as f:
        for name in sorted(weights):
            pad = (-f.tell()) % 64
            f.write(b"\0" * pad)
            data = np.ascontiguousarray(weights[name]).tobytes()
            offsets[name] = (f.tell(), len(data))
            f.write(data)
    for m in models:
        for t in m.graph.initializer:
            if t.name in offsets:
                off, n = offsets[t.name]
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", path.name), ("offset", str(off)), ("length", str(n))):
                    e = t.external_data.add()
                    e.key, e.value = k, v


def train_tokenizer(path: Path, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(EOS_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(path))
    return tok


@dataclass
class FixtureArtifact:
    path: Path
    model: ReferenceModel
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    manifest: dict = field(repr=False)  # the JSON written (manifest_to_json of the typed Manifest)


def write_fixture_artifact(
    directory,
    logits: str = "last",
    *,
    prefill_chunk: int = 4,
    max_batch: int = 4,
    max_context: int = 64,
    seed: int = 0,
) -> FixtureArtifact:
    """Write a complete artifact (manifest.json, prefill.onnx, decode.onnx, weights.bin,
    tokenizer.json, tokenizer_config.json) into ``directory``; return it with its reference."""
    assert logits in LOGITS_MODES
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(d / "tokenizer.json")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_ids = tuple(tok.token_to_id(t) for t in EOS_TOKENS)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TOKENS[1], "model_max_length": max_context}, indent=1))

    weights = make_weights(vocab_size, seed)
    prefill = build_graph(weights, vocab_size, decode=False, logits=logits)
    decode = build_graph(weights, vocab_size, decode=True, logits=logits)
    _externalize([prefill, decode], weights, d / "weights.bin")
    onnx.save(prefill, str(d / "prefill.onnx"))
    onnx.save(decode, str(d / "decode.onnx"))
    for name in ("prefill.onnx", "decode.onnx"):
        onnx.checker.check_model(str(d / name), full_check=False)

    graphs = {}
    for gname, is_decode in (("prefill", False), ("decode", True)):
        ins, outs = _io_specs(vocab_size, is_decode, logits)
        graphs[gname] = GraphSpec(file=f"{gname}.onnx", logits=logits, inputs=tuple(ins), outputs=tuple(outs))
    typed = Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        stage="export",
        created_utc="2025-01-01T00:00:00Z",
        qcn_version="0.1.0",
        tools={"onnx": onnx.__version__},
        recipe={"name": "test-fixture"},
        recipe_sha256="0" * 64,
        checkpoint=CheckpointInfo(path="<hand-made test fixture>", config_sha256="0" * 64),
        model=ModelSpec(architecture="Qwen3NextForCausalLM", vocab_size=vocab_size, hidden_size=H,
                        num_layers=len(LAYER_TYPES), layer_types=LAYER_TYPES, activation_dtype="float32",
                        max_context=max_context),
        tokenizer=TokenizerSpec(files=("tokenizer.json", "tokenizer_config.json"), eos_token_ids=eos_ids,
                                bos_token_id=None, pad_token_id=eos_ids[0], chat_template=False),
        generation=GenerationDefaults(temperature=1.0, top_p=0.95, top_k=40),
        runtime=RuntimeSpec(backend="onnxruntime", prefill_chunk=prefill_chunk, max_batch=max_batch),
        graphs=graphs,
        state=_state_list(),
        files=hash_files(d),
    )
    write_manifest(d, typed)
    manifest = manifest_to_json(typed)
    return FixtureArtifact(d, ReferenceModel(weights, vocab_size), vocab_size, eos_ids, manifest)


def rewrite_manifest(directory, **changes) -> dict:
    """Load manifest.json, apply ``changes`` (dotted keys allowed: "runtime.max_batch"), save."""
    p = Path(directory) / "manifest.json"
    m = json.loads(p.read_text())
    for key, value in changes.items():
        obj = m
        *parents, last = key.split(".")
        for k in parents:
            obj = obj[k]
        if value is _DELETE:
            del obj[last]
        else:
            obj[last] = value
    p.write_text(json.dumps(m, indent=1))
    return m


_DELETE = object()
DELETE = _DELETE
