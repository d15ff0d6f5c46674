"""Chat templates rendered by the server equal transformers' apply_chat_template."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from qcn.runtime.serve.chat_template import ChatTemplate, ChatTemplateError
from qcn.runtime.serve.tool_parser import Qwen3CoderToolParser, collect
from qcn.runtime.tokenizer import Tokenizer
from serve_templates import QWEN3_CODER_STYLE

PICO = Path(__file__).resolve().parent.parent / "models" / "qcn-pico"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "  Weather forecast for a city.  ",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "opts": {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}}},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
]
ARGS = {"city": "Zürich <3>", "days": 3, "opts": {"unit": "C"}, "tags": ["a", "b"]}


def conversation(arguments):
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Zürich for 3 days?"},
        {"role": "assistant", "content": "  Checking.  ", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
            {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": "{}" if isinstance(arguments, str) else {}}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "And Oslo?"},
    ]


@pytest.fixture(scope="module")
def hf_tok():
    return AutoTokenizer.from_pretrained(PICO)


def test_pico_template_equals_transformers_text_and_tokens(hf_tok):
    tmpl = ChatTemplate.from_artifact(PICO)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"}, {"role": "user", "content": "again"}]
    for gen_prompt in (True, False):
        ours = tmpl.render(msgs, add_generation_prompt=gen_prompt)
        ref = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
        assert ours == ref
    ours = tmpl.render(msgs)
    tok = Tokenizer.from_file(PICO / "tokenizer.json")
    assert tok.encode(ours) == hf_tok(ours, add_special_tokens=False)["input_ids"]
    assert tok.encode(ours)[:1] == [hf_tok.convert_tokens_to_ids("<|im_start|>")]  # special tokens are matched in the text


def test_content_parts_are_joined_like_a_string(hf_tok):
    tmpl = ChatTemplate.from_artifact(PICO)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tmpl.render(parts) == hf_tok.apply_chat_template([{"role": "user", "content": "a\nb"}], tokenize=False, add_generation_prompt=True)


def test_qwen3_coder_style_template_with_tools_equals_transformers(hf_tok):
    tmpl = ChatTemplate(QWEN3_CODER_STYLE)
    # the client sends arguments as a JSON string (OpenAI); transformers is given the mapping the
    # template iterates, which is what the server's parsing produces
    ours = tmpl.render(conversation(json.dumps(ARGS)), TOOLS)
    ref = hf_tok.apply_chat_template(conversation(copy.deepcopy(ARGS)), tools=TOOLS, tokenize=False, add_generation_prompt=True, chat_template=QWEN3_CODER_STYLE)
    assert ours == ref
    assert "<parameter=opts>\n{\"unit\": \"C\"}\n</parameter>" in ours and "<parameter=city>\nZürich <3>\n</parameter>" in ours
    assert "<minimum>1</minimum>" in ours and "<required>[\"city\"]</required>" in ours
    assert ours.count("<tool_response>") == 2 and ours.count("<|im_start|>user\n<tool_response>") == 1
    # without tools the template renders a plain conversation, also as transformers does
    plain = [m for m in conversation("{}") if "tool_calls" not in m and m["role"] != "tool"]
    assert tmpl.render(plain) == hf_tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True, chat_template=QWEN3_CODER_STYLE)


def test_tool_call_round_trip_through_template_and_parser():
    """What the template renders for an earlier call parses back to the same call."""
    tmpl = ChatTemplate(QWEN3_CODER_STYLE)
    msgs = conversation(json.dumps(ARGS))[:3]
    text = tmpl.render(msgs, TOOLS, add_generation_prompt=False)
    turn = text[text.rindex("<|im_start|>assistant") + len("<|im_start|>assistant") : text.rindex("<|im_end|>")]
    p = Qwen3CoderToolParser(TOOLS)
    msg = collect([p.feed(turn), p.finish()])
    assert msg.content.strip() == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.tool_calls] == [("get_weather", ARGS), ("noop", {})]


def test_bad_arguments_and_template_errors_name_the_field():
    tmpl = ChatTemplate(QWEN3_CODER_STYLE)
    bad = conversation("{not json")
    with pytest.raises(ChatTemplateError) as e:
        tmpl.render(bad, TOOLS)
    assert e.value.param == "messages[2].tool_calls[0].function.arguments"
    with pytest.raises(ChatTemplateError) as e:
        tmpl.render(conversation("[1, 2]"), TOOLS)
    assert e.value.param == "messages[2].tool_calls[0].function.arguments"
    with pytest.raises(ChatTemplateError, match="unexpected message role") as e:
        tmpl.render([{"role": "wizard", "content": "x"}])
    assert e.value.param == "messages"
    with pytest.raises(ChatTemplateError) as e:
        tmpl.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert e.value.param == "messages[0].content[0]"
