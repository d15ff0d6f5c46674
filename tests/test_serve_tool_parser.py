"""The streaming qwen3_coder tool-call parser on scripted text streams, split at every boundary."""

from __future__ import annotations

import json

import pytest

from qcn.runtime.serve.tool_parser import TOOL_START, Qwen3CoderToolParser, collect, convert_value

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "ratio": {"type": "number"},
                    "opts": {"type": "object"},
                    "tags": {"type": "array"},
                    "note": {"type": ["string", "null"]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "list_files", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}},
]

TWO_CALLS = (
    "Let me look that up.\n\n"
    "<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nSão Paulo\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n"
    "<parameter=metric>\nTrue\n</parameter>\n"
    "<parameter=ratio>\n0.25\n</parameter>\n"
    '<parameter=opts>\n{"a": [1, 2], "b": null}\n</parameter>\n'
    '<parameter=tags>\n["x", "y"]\n</parameter>\n'
    "<parameter=note>\nnull\n</parameter>\n"
    "</function>\n</tool_call>\n"
    "<tool_call>\n<function=list_files>\n<parameter=path>\n/tmp/a b\n  indented\n</parameter>\n</function>\n</tool_call>"
)
TWO_CALLS_ARGS = [
    {"city": "São Paulo", "days": 3, "metric": True, "ratio": 0.25, "opts": {"a": [1, 2], "b": None}, "tags": ["x", "y"], "note": None},
    {"path": "/tmp/a b\n  indented"},
]


def run(pieces, tools=TOOLS):
    p = Qwen3CoderToolParser(tools)
    deltas = [p.feed(x) for x in pieces] + [p.finish()]
    return collect(deltas), deltas, p


def summary(msg):
    return msg.content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.tool_calls]


def test_two_calls_typed_by_schema():
    msg, _, p = run([TWO_CALLS])
    assert p.called
    content, calls = summary(msg)
    assert content == "Let me look that up.\n\n"
    assert calls == list(zip(["get_weather", "list_files"], TWO_CALLS_ARGS))
    # the pieces of each call concatenate to exactly json.dumps of its arguments
    assert [c["function"]["arguments"] for c in msg.tool_calls] == [json.dumps(a, ensure_ascii=False) for a in TWO_CALLS_ARGS]
    assert len({c["id"] for c in msg.tool_calls}) == 2 and all(c["id"].startswith("call_") for c in msg.tool_calls)


@pytest.mark.parametrize("text", [TWO_CALLS, "plain text, no calls <tool but not a tag>", "a <tool_call> b <tool_call>\n<func", "x" + TOOL_START])
def test_every_split_point_gives_the_same_message(text):
    whole = summary(run([text])[0])
    for i in range(len(text) + 1):
        assert summary(run([text[:i], text[i:]])[0]) == whole, f"split at {i}: {text[:i]!r} | {text[i:]!r}"
    assert summary(run(list(text))[0]) == whole  # one character at a time
    for i in range(0, len(text), 7):  # three pieces
        j = min(len(text), i + 11)
        assert summary(run([text[:i], text[i:j], text[j:]])[0]) == whole


def test_partial_tags_are_held_back_and_content_streams_early():
    p = Qwen3CoderToolParser(TOOLS)
    assert p.feed("Hello <tool").content == "Hello "  # "<tool" may start a call: held
    assert p.feed("box> and").content == "<toolbox> and"  # resolved: not a tag
    d = p.feed(" <tool_call>\n<function=list_")
    assert d.content == " " and not d.tool_calls  # name incomplete: nothing yet
    d = p.feed("files>\n<parameter=path>\n/x")
    assert [(t.index, t.name, t.arguments) for t in d.tool_calls] == [(0, "list_files", "")] and d.tool_calls[0].id
    d = p.feed("y\n</parameter>\n")
    assert [t.arguments for t in d.tool_calls] == ['{"path": "/xy"']
    d = p.feed("</function>\n</tool_call>\n\n")
    assert [t.arguments for t in d.tool_calls] == ["}"] and d.content == ""
    assert not p.finish()  # trailing whitespace after a call is dropped


def test_text_after_a_call_and_calls_without_parameters():
    msg, _, _ = run(["<tool_call>\n<function=list_files>\n</function>\n</tool_call>\n\nDone."])
    assert summary(msg) == ("\n\nDone.", [("list_files", {})])


def test_not_a_call_is_content():
    text = "use <tool_call> tags like <tool_call>this</tool_call>"
    msg, _, p = run([text])
    assert msg.content == text and not msg.tool_calls and not p.called


def test_missing_closing_tags_are_tolerated():
    # </parameter> dropped before the next parameter, </tool_call> dropped at the end of generation
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n<parameter=days>\n2\n</function>"
    assert summary(run([text])[0]) == ("", [("get_weather", {"city": "Oslo", "days": 2})])
    # generation stopped inside a value (e.g. max_tokens): the call is closed with what exists
    assert summary(run(["<tool_call>\n<function=list_files>\n<parameter=path>\n/tm"])[0]) == ("", [("list_files", {"path": "/tm"})])


def test_unknown_tool_and_unknown_parameter_keep_strings():
    msg, _, _ = run(["<tool_call>\n<function=nope>\n<parameter=n>\n5\n</parameter>\n</function>\n</tool_call>"])
    assert summary(msg) == ("", [("nope", {"n": "5"})])


@pytest.mark.parametrize(
    "raw, schema, want",
    [
        ("42", {"type": "integer"}, 42),
        ("4.0", {"type": "integer"}, 4),
        ("four", {"type": "integer"}, "four"),  # does not parse: the model's text is kept
        ("1e3", {"type": "number"}, 1000.0),
        ("-7", {"type": "number"}, -7),
        ("FALSE", {"type": "boolean"}, False),
        ("null", {"type": "string"}, "null"),  # a string parameter is never turned into null
        ("null", {"type": ["integer", "null"]}, None),
        ("3", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 3),
        ("[1, 2]", {"type": "array"}, [1, 2]),
        ('{"k": 1}', {"type": "object"}, {"k": 1}),
        ("{bad", {"type": "object"}, "{bad"),
        ("  spaced  ", {"type": "string"}, "  spaced  "),
        ("red", {"enum": ["red", "blue"]}, "red"),
        ("5", None, "5"),
    ],
)
def test_convert_value(raw, schema, want):
    got = convert_value(raw, schema)
    assert got == want and type(got) is type(want)
