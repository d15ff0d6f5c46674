"""Chat prompts rendered from the artifact's ``tokenizer_config.json`` ``chat_template``.

The template is rendered the way transformers' ``apply_chat_template`` renders it (same jinja2
sandbox, ``trim_blocks`` / ``lstrip_blocks``, its ``tojson`` that does not escape HTML,
``raise_exception``, ``strftime_now``, ``namespace``, the special tokens as variables), so the
prompt a request gets here is the prompt the model was trained on.

OpenAI messages are first brought into the shape templates expect (what vLLM does too):

- content given as a list of ``{"type": "text", "text": ...}`` parts becomes one string (parts
  joined by newlines); ``None`` content becomes ``""``,
- an assistant message's ``tool_calls[i].function.arguments`` arrives as a JSON string; it is
  parsed into a mapping, because templates (Qwen3-Coder's among them) iterate it with
  ``|items``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ArtifactError, RequestError

__all__ = ["ChatTemplate", "ChatTemplateError", "normalize_messages"]

log = logging.getLogger(__name__)

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(RequestError):
    """The messages cannot be rendered (a template's raise_exception, or malformed messages).
    ``param`` names the offending request field when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): renders its
    body unchanged, so templates that use it compile here too."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """OpenAI chat messages -> the plain dicts templates read (see the module docstring)."""
    out = []
    for i, m in enumerate(messages):
        msg = {k: v for k, v in m.items() if v is not None}
        content = m.get("content")
        if content is None:
            msg["content"] = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ChatTemplateError(
                        "only text content parts ({'type': 'text', 'text': ...}) are supported", f"messages[{i}].content[{j}]"
                    )
                texts.append(part["text"])
            msg["content"] = "\n".join(texts)
        calls = m.get("tool_calls")
        if calls:
            norm = []
            for j, call in enumerate(calls):
                call = dict(call)
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                where = f"messages[{i}].tool_calls[{j}].function.arguments"
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError as e:
                        raise ChatTemplateError(f"must be a JSON object encoded as a string: {e}", where) from None
                if args is None:
                    args = {}
                if not isinstance(args, Mapping):
                    raise ChatTemplateError(f"must encode a JSON object, got {type(args).__name__}", where)
                fn["arguments"] = dict(args)
                call["function"] = fn
                norm.append(call)
            msg["tool_calls"] = norm
        out.append(msg)
    return out


class ChatTemplate:
    """A compiled chat template plus the special-token variables it may read."""

    def __init__(self, source: str, special_tokens: Mapping[str, Any] | None = None, *, tool_source: str | None = None):
        env = _environment()
        try:
            self._template = env.from_string(source)
            self._tool_template = env.from_string(tool_source) if tool_source else None
        except jinja2.TemplateSyntaxError as e:
            raise ArtifactError(f"chat_template does not compile: {e} (line {e.lineno})") from None
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_artifact(cls, artifact_dir: str | Path) -> "ChatTemplate | None":
        """The template of ``tokenizer_config.json`` (or ``chat_template.jinja``); None if none."""
        adir = Path(artifact_dir)
        cfg_path = adir / "tokenizer_config.json"
        cfg: dict = {}
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{cfg_path}: cannot read: {e}") from None
        source = cfg.get("chat_template")
        tool_source = None
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            source, tool_source = named.get("default"), named.get("tool_use")
        jinja_file = adir / "chat_template.jinja"
        if source is None and jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        if not isinstance(source, str):
            return None
        special = {k: t for k in _SPECIAL_KEYS if (t := _token_text(cfg.get(k))) is not None}
        extra = cfg.get("additional_special_tokens")
        if isinstance(extra, list):
            special["additional_special_tokens"] = [t for t in (_token_text(x) for x in extra) if t is not None]
        return cls(source, special, tool_source=tool_source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        **kwargs,
    ) -> str:
        """The prompt text for ``messages`` (OpenAI shape; normalised here) and ``tools``."""
        msgs = normalize_messages(messages)
        template = self._tool_template if tools and self._tool_template is not None else self._template
        variables = {**self.special_tokens, **kwargs}
        try:
            return template.render(
                messages=msgs, tools=list(tools) if tools else None, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template rejected the messages: {e}", "messages") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatTemplateError(f"the model's chat template cannot render these messages: {type(e).__name__}: {e}", "messages") from None
