"""qcn-serve end to end: the real openai client against servers on free local ports, serving a
compiled qcn-pico artifact (compiled once for this module)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from qcn.compile.pipeline import compile_recipe
from qcn.compile.recipe import ExportOptions, Recipe, RuntimeOptions
from qcn.runtime import cli as run_cli
from qcn.runtime.generate import load
from qcn.runtime.serve import ServeConfig, Server, create_app
from qcn.runtime.serve import scheduler as scheduler_mod

PICO = Path(__file__).resolve().parent.parent / "models" / "qcn-pico"
PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\n\n\ndef list_python_files(root):\n"]
LONG_PROMPT = "".join(PROMPTS) * 4  # > prefill_chunk tokens: prefilled in several chunks


class LiveServer:
    """uvicorn in a thread on a socket bound to a free port."""

    def __init__(self, server: Server):
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, key="unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(timeout=30)
        self.server.close()
        self.sock.close()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    recipe = Recipe(name="test-serve-pico", checkpoint=PICO, output=tmp_path_factory.mktemp("serve") / "pico",
                    export=ExportOptions(), runtime=RuntimeOptions(prefill_chunk=16, max_batch=4, max_context=512))
    return compile_recipe(recipe)


@pytest.fixture(scope="module")
def live(artifact):
    s = LiveServer(Server(ServeConfig(artifact, threads=1, model_name="pico", prefix_cache_bytes=0)))
    yield s
    s.close()


@pytest.fixture(scope="module")
def small(artifact):
    """One slot, a queue of one, an API key: for 429, disconnect and auth."""
    s = LiveServer(Server(ServeConfig(artifact, threads=1, model_name="pico", max_batch=1, queue_size=1, api_key="sesame", prefix_cache_bytes=0)))
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(artifact):
    """Single-request greedy results straight from the runtime (no server)."""
    g = load(artifact, threads=1)
    cache = {}

    def greedy(prompt, n):
        key = (prompt if isinstance(prompt, str) else tuple(prompt), n)
        if key not in cache:
            cache[key] = g.generate([prompt], g.params(temperature=0.0, max_new_tokens=n))[0]
        return cache[key]

    greedy.generator = g
    yield greedy
    g.close()


def sse_lines(url, body, headers=None):
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


# -- endpoints ---------------------------------------------------------------------------
def test_models_health_metrics(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["pico"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    text = httpx.get(live.url + "/metrics").text
    for name in ("qcn_queue_depth", "qcn_running_sequences", "qcn_generation_tokens_per_second", "qcn_time_to_first_token_seconds_bucket", "qcn_inter_token_latency_seconds_bucket"):
        assert name in text


def test_greedy_completion_equals_qcn_run(live, artifact, capsys):
    prompt, n = PROMPTS[0], 40
    r = live.client().completions.create(model="pico", prompt=prompt, max_tokens=n, temperature=0)
    assert run_cli.main([str(artifact), "--prompt", prompt, "--greedy", "--max-new-tokens", str(n), "--threads", "1"]) == 0
    assert r.choices[0].text == capsys.readouterr().out[:-1]  # qcn-run ends with a newline
    assert r.choices[0].text


def test_completion_streaming_usage_and_done(live, reference):
    prompt, n = LONG_PROMPT, 24
    ref = reference(prompt, n)
    c = live.client()
    r = c.completions.create(model="pico", prompt=prompt, max_tokens=n, temperature=0)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == {"eos": "stop"}.get(ref.finish_reason, ref.finish_reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids), len(ref.prompt_token_ids) + len(ref.token_ids))
    chunks = list(c.completions.create(model="pico", prompt=prompt, max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    lines = sse_lines(live.url + "/v1/completions", {"model": "pico", "prompt": prompt, "max_tokens": 4, "stream": True})
    assert lines[-1] == "data: [DONE]" and all(l.startswith("data: ") for l in lines)
    # a prompt given as token ids
    t = c.completions.create(model="pico", prompt=ref.prompt_token_ids, max_tokens=n, temperature=0)
    assert t.choices[0].text == ref.text


def test_chat_streaming_and_not(live, reference, hf_chat_ids):
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    ids = hf_chat_ids(msgs)
    ref = reference(ids, 32)
    c = live.client()
    r = c.chat.completions.create(model="pico", messages=msgs, max_tokens=32, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    stream = c.chat.completions.create(model="pico", messages=msgs, max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.total_tokens == len(ids) + len(ref.token_ids)
    lines = sse_lines(live.url + "/v1/chat/completions", {"model": "pico", "messages": msgs, "max_tokens": 3, "stream": True})
    assert lines[-1] == "data: [DONE]"


@pytest.fixture(scope="module")
def hf_chat_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(PICO)
    return lambda msgs: tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def test_stop_strings(live, reference):
    prompt = PROMPTS[1]
    ref = reference(prompt, 48)
    words = [w for w in ref.text.split() if len(w) >= 2]
    assert words, ref.text
    stop = words[len(words) // 2]
    want = ref.text[: ref.text.index(stop)]
    c = live.client()
    r = c.completions.create(model="pico", prompt=prompt, max_tokens=48, temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="pico", prompt=prompt, max_tokens=48, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == want


def test_seed_reproducible_and_manifest_defaults(live):
    c = live.client()
    kw = dict(model="pico", prompt=PROMPTS[2], max_tokens=24)
    a = c.completions.create(seed=7, **kw).choices[0].text  # temperature/top_p/top_k: the manifest's
    b = c.completions.create(seed=7, **kw).choices[0].text
    others = {c.completions.create(seed=s, **kw).choices[0].text for s in (8, 9, 10)}
    assert a == b
    assert others - {a}, "three other seeds all gave the seed-7 text"
    g = c.completions.create(seed=7, temperature=0, **kw).choices[0].text
    assert c.completions.create(seed=7, temperature=1.0, top_p=0.95, extra_body={"top_k": 40}, **kw).choices[0].text == a
    assert g != a or True  # greedy may coincide; the point is that explicit card values equal the defaults


def test_concurrent_requests_more_than_slots_each_equal_single(live, reference):
    prompts = [p + str(i) for i, p in enumerate(PROMPTS * 3)]  # 9 requests, 4 slots
    refs = [reference(p, 20).text for p in prompts]
    c = live.client()

    def one(p):
        return "".join(ch.choices[0].text for ch in c.completions.create(model="pico", prompt=p, max_tokens=20, temperature=0, stream=True) if ch.choices)

    with ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(one, prompts))
    assert got == refs


# -- errors ------------------------------------------------------------------------------
def _error(url, body, status=400, headers=None):
    r = httpx.post(url, json=body, headers=headers, timeout=30) if not isinstance(body, bytes) else httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "pico"}, "messages"),
        ({"model": "pico", "messages": []}, "messages"),
        ({"model": "pico", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "pico", "messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        ({"model": "pico", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"model": "pico", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "pico", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, "max_tokens"),
        ({"model": "pico", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"model": "pico", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
        ({"model": "pico", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
        ({"model": "pico", "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages[0].tool_calls[0].function.arguments"),
    ],
)
def test_bad_chat_requests_get_400_naming_the_field(live, body, param):
    err = _error(live.url + "/v1/chat/completions", body)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in err["message"]


def test_other_request_errors(live):
    assert _error(live.url + "/v1/completions", {"model": "pico", "prompt": [99999]})["param"] == "prompt"
    assert _error(live.url + "/v1/completions", {"model": "pico", "prompt": ["a", "b"]})["param"] == "prompt"
    assert _error(live.url + "/v1/completions", {"model": "pico", "prompt": "x", "echo": True})["param"] == "echo"
    assert _error(live.url + "/v1/completions", {"model": "pico", "prompt": "x" * 3000})["param"] == "prompt"  # longer than the context
    assert _error(live.url + "/v1/completions", b"{not json")["param"] is None
    err = _error(live.url + "/v1/completions", {"model": "gpt-4", "prompt": "x"}, status=404)
    assert err["param"] == "model" and "pico" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:  # and through the client
        live.client().chat.completions.create(model="pico", messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert e.value.body["param"] == "temperature"


# -- tools through the whole server, on a scripted token stream ----------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
SCRIPT = "I'll check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>"


@pytest.fixture
def scripted(monkeypatch, live):
    """The model still runs every step, but the sampler plays back SCRIPT's tokens then EOS."""
    tok = live.server.tokenizer
    tokens = tok.encode(SCRIPT) + [live.server.manifest.tokenizer.eos_token_ids[0]]
    real = scheduler_mod._Seq

    class ScriptedSeq(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            it = iter(tokens)
            self.sampler = lambda _logits: next(it)

    monkeypatch.setattr(scheduler_mod, "_Seq", ScriptedSeq)
    return tokens


def test_tool_calls_non_streaming(live, scripted):
    r = live.client().chat.completions.create(model="pico", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, max_tokens=200)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content == "I'll check.\n\n"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in ch.message.tool_calls] == [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Oslo"})]
    assert r.usage.completion_tokens == len(scripted)


def test_tool_calls_streaming(live, scripted):
    stream = live.client().chat.completions.create(model="pico", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, max_tokens=200, stream=True)
    content, calls, finish = "", {}, None
    for ch in stream:
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.id:
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "I'll check.\n\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Oslo"})]
    assert "<tool_call>" not in content


def test_without_tools_the_same_text_is_plain_content(live, scripted):
    r = live.client().chat.completions.create(model="pico", messages=[{"role": "user", "content": "weather?"}], max_tokens=200)
    assert r.choices[0].message.content == SCRIPT and r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls


# -- capacity, disconnects, auth -----------------------------------------------------------
def _health(s):
    return httpx.get(s.url + "/health").json()


def _wait(pred, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_auth(small):
    r = httpx.get(small.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        small.client("wrong").models.list()
    assert small.client("sesame").models.list().data[0].id == "pico"
    assert httpx.get(small.url + "/health").status_code == 200  # health and metrics need no key


def _counter(s, outcome):
    for line in httpx.get(s.url + "/metrics").text.splitlines():
        if line.startswith(f'qcn_requests_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def slow(monkeypatch):
    """pico decodes a token in about a millisecond; 10 ms per token keeps a request running
    long enough to observe it."""
    real = scheduler_mod._Seq

    class SlowSeq(real):
        def accept(self, token):
            time.sleep(0.01)
            super().accept(token)

    monkeypatch.setattr(scheduler_mod, "_Seq", SlowSeq)


def test_queue_full_gets_429_and_disconnect_frees_the_slot(small, slow):
    c = small.client("sesame")
    cancelled = _counter(small, "cancelled")
    hdr = {"Authorization": "Bearer sesame"}
    long_body = {"model": "pico", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", small.url + "/v1/completions", json=long_body, headers=hdr) as a:
            it = a.iter_lines()
            assert next(it).startswith("data: ")  # A holds the only slot and is decoding
            assert _health(small)["running"] == 1
            with ThreadPoolExecutor(1) as ex:
                fb = ex.submit(lambda: c.completions.create(model="pico", prompt=PROMPTS[1], max_tokens=8, temperature=0))
                _wait(lambda: _health(small)["waiting"] == 1, "B to wait in the queue")
                with pytest.raises(openai.RateLimitError) as e:  # C: slots and queue full
                    c.completions.create(model="pico", prompt=PROMPTS[2], max_tokens=8)
                assert e.value.status_code == 429 and "queue" in e.value.body["message"]
                a.close()  # A's client goes away: its slot goes to B
                b = fb.result(timeout=60)
    assert b.choices[0].text and b.usage.completion_tokens <= 8
    _wait(lambda: _health(small) == {**_health(small), "running": 0, "waiting": 0}, "the slot to be free")
    assert _counter(small, "cancelled") == cancelled + 1


def test_non_streaming_disconnect_cancels(small, slow):
    """A non-streaming client that gives up while its request waits: the request is dropped."""
    hdr = {"Authorization": "Bearer sesame"}
    cancelled = _counter(small, "cancelled")
    long_body = {"model": "pico", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", small.url + "/v1/completions", json=long_body, headers=hdr, timeout=60) as a:
        lines = a.iter_lines()  # (a dropped iterator would close the response)
        assert next(lines).startswith("data: ")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(small.url + "/v1/completions", json={"model": "pico", "prompt": "x", "max_tokens": 4}, headers=hdr, timeout=0.5)
        _wait(lambda: _health(small)["waiting"] == 0, "the abandoned request to leave the queue")
        assert _health(small)["running"] == 1
    _wait(lambda: _health(small)["running"] == 0, "the slot to be free")
    assert _counter(small, "cancelled") == cancelled + 2
    r = small.client("sesame").completions.create(model="pico", prompt=PROMPTS[1], max_tokens=4)
    assert r.usage.completion_tokens == 4



# -- exact multi-turn state reuse ------------------------------------------------------------
@pytest.fixture(scope="module")
def reuse(artifact):
    s = LiveServer(Server(ServeConfig(artifact, threads=1, model_name="pico", prefix_cache_bytes=64 << 20)))
    yield s
    s.close()


def _idle(s):
    _wait(lambda: (lambda h: h["running"] == 0 and h["waiting"] == 0 and h["background"] == 0)(_health(s)), "the server to be idle")


TURNS = ["def add(a, b):", "Now subtract.", "And multiply?", "Divide, with a check for zero."]


def _chat(s, turns, max_tokens=24):
    c = s.client()
    msgs, out = [{"role": "system", "content": "You write Python."}], []
    for u in turns:
        msgs.append({"role": "user", "content": u})
        r = c.chat.completions.create(model="pico", messages=msgs, max_tokens=max_tokens, temperature=0)
        out.append((r.choices[0].message.content, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
        _idle(s)
    return out


def test_multi_turn_reuse_gives_the_same_replies_and_prefills_less(live, reuse):
    assert _health(reuse)["kept_states"] == 0
    plain, reused = _chat(live, TURNS), _chat(reuse, TURNS)
    assert [t for t, _, _ in reused] == [t for t, _, _ in plain]
    assert [p for _, p, _ in reused] == [p for _, p, _ in plain]
    assert all(c == 0 for _, _, c in plain) and reused[0][2] == 0
    chunk = reuse.server.session.prefill_chunk
    for (_, prev_prompt, _), (_, prompt, cached) in zip(reused, reused[1:]):
        # kept states sit at chunk boundaries; at least the previous prompt's was restored
        assert cached % chunk == 0 and prev_prompt // chunk * chunk <= cached < prompt
    assert any(cached > prev_prompt for (_, prev_prompt, _), (_, _, cached) in zip(reused, reused[1:])), "no reply state was ever reused"
    assert _health(reuse)["kept_states"] > 0


def test_restored_prefill_is_bit_identical_to_prefilling_from_scratch(artifact):
    """Through the scheduler itself: the logits at the end of turn 2's prompt, restored from
    turn 1's kept state, equal bit for bit those of a scheduler without reuse."""
    import numpy as np

    from qcn.runtime.serve.prefix_cache import PrefixCache
    from qcn.runtime.serve.scheduler import Request, Scheduler

    g = load(artifact, threads=1)
    try:
        calls = []
        real = g.session.prefill

        def recording(handle, ids):
            start = g.session.past_len(handle)
            out = real(handle, ids)
            calls.append((start, len(ids), out.copy()))
            return out

        g.session.prefill = recording

        def run(sched, ids, n):
            done, text = threading.Event(), []

            def sink(ev):
                if ev.kind == "delta":
                    text.append(ev.text)
                elif ev.kind in ("done", "cancelled", "error"):
                    text.append(ev)
                    done.set()

            req = Request(ids, g.params(temperature=0.0, max_new_tokens=n), sink)
            sched.submit(req)
            assert done.wait(60)
            assert text[-1].kind == "done"
            return "".join(text[:-1]), req

        def end_logits(prompt_len):
            (hit,) = [lg for start, n, lg in calls if start + n == prompt_len]
            return hit

        tok = g.tokenizer
        p1 = tok.encode(LONG_PROMPT)  # several chunks (prefill_chunk 16)
        results = {}
        for cache in (None, PrefixCache(64 << 20)):
            sched = Scheduler(g.session, tok, queue_size=4, prefix_cache=cache)
            sched.start()
            try:
                text1, r1 = run(sched, p1, 20)
                _wait(lambda: sched.background == 0, "the kept reply state")
                reply = tok.encode(text1)
                p2 = p1 + reply + tok.encode("\n# next\n")
                calls.clear()
                text2, r2 = run(sched, p2, 20)
                results[cache is not None] = (text1, text2, r2.cached_tokens, end_logits(len(p2)))
            finally:
                sched.stop()
        (a1, a2, a_cached, a_logits), (b1, b2, b_cached, b_logits) = results[False], results[True]
        chunk = g.session.prefill_chunk
        assert a_cached == 0 and b_cached >= len(p1) // chunk * chunk and b_cached % chunk == 0
        assert (a1, a2) == (b1, b2)
        assert np.array_equal(a_logits, b_logits), f"max |diff| {np.abs(a_logits - b_logits).max()}"
    finally:
        g.close()


def test_long_prompt_prefill_is_interleaved_with_running_decode(reference):
    """A long prompt arriving while another request decodes is prefilled one chunk per decode
    step of the running batch (it never stalls that stream for more than a chunk), then joins
    the batch: both decode in one call."""
    from qcn.runtime.serve.scheduler import Request, Scheduler

    g = reference.generator
    session = g.session
    calls = []
    real_prefill, real_decode = session.prefill, session.decode
    session.prefill = lambda h, ids: (calls.append(("P", len(ids))), real_prefill(h, ids))[1]
    session.decode = lambda hs, toks: (calls.append(("D", len(hs))), real_decode(hs, toks))[1]
    sched = Scheduler(session, g.tokenizer, queue_size=4)
    sched.start()
    try:
        deltas, done = [], [threading.Event(), threading.Event()]

        def sink(i):
            return lambda ev: (deltas.append(i) if ev.kind == "delta" else done[i].set())

        sched.submit(Request(g.tokenizer.encode(PROMPTS[0]), g.params(temperature=0.0, max_new_tokens=120), sink(0), ignore_eos=True))
        _wait(lambda: len(deltas) >= 3, "the first request to stream")
        long_ids = g.tokenizer.encode(LONG_PROMPT)
        n_chunks = -(-len(long_ids) // session.prefill_chunk)
        assert n_chunks >= 4
        sched.submit(Request(long_ids, g.params(temperature=0.0, max_new_tokens=4), sink(1)))
        assert done[1].wait(60) and done[0].wait(60)
    finally:
        sched.stop()
        del session.prefill, session.decode
    first_b = next(i for i, c in enumerate(calls) if c[0] == "P" and i > 1)
    b_part = calls[first_b:]
    b_chunks = [i for i, c in enumerate(b_part) if c[0] == "P"][:n_chunks]
    assert [b_part[i][1] for i in b_chunks] == [min(session.prefill_chunk, len(long_ids) - k * session.prefill_chunk) for k in range(n_chunks)]
    for i, j in zip(b_chunks, b_chunks[1:]):
        assert b_part[i + 1 : j] == [("D", 1)], f"between prefill chunks: {b_part[i + 1 : j]}"
    assert ("D", 2) in b_part[b_chunks[-1] :]  # then both decode together


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from qcn.runtime.serve import cli

    assert cli.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qcn-serve: error: ") and "\n" not in err and "Traceback" not in err
    assert cli.main([str(tmp_path), "--prefix-cache-mb", "-1"]) == 2
    assert "--prefix-cache-mb" in capsys.readouterr().err
    assert cli.main([str(tmp_path), "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err
