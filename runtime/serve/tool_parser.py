"""Streaming parser of Qwen3-Coder's XML tool-call format (``qwen3_coder``).

The model writes calls as::

    optional text before the calls
    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    ...
    </function>
    </tool_call>

:class:`Qwen3CoderToolParser` is fed the generated text in arbitrary pieces and returns, for
every piece, the content text that is certainly not part of a call plus OpenAI tool-call
deltas:

- text before (and between) calls is streamed as content as soon as it cannot be the start of
  ``<tool_call>``; a partial tag is held back until it resolves,
- a call's name is sent as soon as ``<function=NAME>`` is complete (with its id and empty
  arguments); each parameter is sent when its value is complete, as a piece of the JSON object
  (``{"a": 1`` then ``, "b": "x"`` then ``}``), so the pieces of one call always concatenate to
  ``json.dumps(arguments, ensure_ascii=False)``,
- values are typed by the tool's JSON schema (:func:`convert_value`): ``string`` kept raw,
  ``integer`` / ``number`` / ``boolean`` / ``object`` / ``array`` / ``null`` parsed; a value
  that does not parse as its declared type stays a string (the caller sees what the model wrote),
- whitespace between ``</tool_call>`` and the next call (or the end) is dropped,
- ``<tool_call>`` followed by something other than ``<function=NAME>`` is ordinary content,
- at the end of generation (:meth:`finish`) open tags are closed: an unterminated value ends
  where the text ends.

A value is delimited by ``</parameter>``; a missing ``</parameter>`` is tolerated when the next
``<parameter=``, ``</function>`` or ``</tool_call>`` follows (the model sometimes drops it).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = ["ToolCallDelta", "ParseDelta", "Qwen3CoderToolParser", "convert_value", "ParsedMessage", "collect"]

TOOL_START = "<tool_call>"
TOOL_END = "</tool_call>"
FUNC_START = "<function="
FUNC_END = "</function>"
PARAM_START = "<parameter="
PARAM_END = "</parameter>"
_MAX_NAME = 256  # a function/parameter name longer than this is not a tag

# parser states
_TEXT, _OPEN, _FNAME, _FUNC, _PNAME, _VALUE, _AFTER_FUNC = range(7)


@dataclass
class ToolCallDelta:
    """One piece of tool call ``index``: the first piece has ``id`` and ``name``."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ParseDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def extend(self, other: "ParseDelta") -> None:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


def _schema_types(schema: Mapping | None) -> list[str]:
    if not isinstance(schema, Mapping):
        return []
    t = schema.get("type")
    types: list[str] = [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else []
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            types += [x for x in _schema_types(sub) if x not in types]
    if not types and "enum" in schema:
        types = ["string"]
    return types


def convert_value(raw: str, schema: Mapping | None) -> Any:
    """A parameter's text as the type its JSON schema declares (see the module docstring)."""
    types = _schema_types(schema)
    s = raw.strip()
    if "null" in types and s.lower() in ("null", "none"):
        return None
    for t in types:
        if t == "string":
            return raw
        if t == "integer":
            try:
                return int(s)
            except ValueError:
                try:
                    f = float(s)
                except ValueError:
                    continue
                if f.is_integer():
                    return int(f)
        elif t == "number":
            try:
                v = json.loads(s)
            except ValueError:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return v
        elif t == "boolean":
            if s.lower() in ("true", "false"):
                return s.lower() == "true"
        elif t in ("object", "array"):
            try:
                v = json.loads(s)
            except ValueError:
                continue
            if isinstance(v, dict if t == "object" else list):
                return v
    return raw


def _partial_suffix(text: str, tags: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


class Qwen3CoderToolParser:
    """Feed generated text with :meth:`feed`, then call :meth:`finish` once.

    ``tools``: the request's OpenAI ``tools`` list (``{"type": "function", "function": {"name",
    "parameters"}}``); parameter schemas type the values.
    """

    def __init__(self, tools: Iterable[Mapping] | None = None):
        self._props: dict[str, Mapping] = {}
        for t in tools or ():
            fn = t.get("function", t) if isinstance(t, Mapping) else {}
            params = fn.get("parameters") if isinstance(fn, Mapping) else None
            props = params.get("properties") if isinstance(params, Mapping) else None
            if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
                self._props[fn["name"]] = props if isinstance(props, Mapping) else {}
        self._buf = ""
        self._state = _TEXT
        self._scan = 0  # in _VALUE: where the terminator search resumes
        self._ncalls = 0  # calls started
        self._hold_ws = False  # after a call: whitespace-only content is held
        self._ws = ""
        self._fname = ""
        self._pname = ""
        self._nparams = 0
        self._finished = False
        self._opened = ""  # text between <tool_call> and the function name (for _not_a_call)

    @property
    def called(self) -> bool:
        """Whether at least one tool call was emitted."""
        return self._ncalls > 0

    # -- public --------------------------------------------------------------------------
    def feed(self, text: str) -> ParseDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        out = ParseDelta()
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> ParseDelta:
        """End of generation: flush held text and close open tags."""
        out = ParseDelta()
        while self._step(out, final=True):
            pass
        self._finished = True
        return out

    # -- machinery -----------------------------------------------------------------------
    def _content(self, out: ParseDelta, text: str) -> None:
        if not text:
            return
        if self._hold_ws:
            if not text.strip():
                self._ws += text
                return
            text, self._ws, self._hold_ws = self._ws + text, "", False
        out.content += text

    def _call(self, out: ParseDelta, arguments: str, **first) -> None:
        out.tool_calls.append(ToolCallDelta(index=self._ncalls - 1, arguments=arguments, **first))

    def _end_call(self, out: ParseDelta) -> None:
        self._call(out, "}" if self._nparams else "{}")
        self._state, self._hold_ws, self._ws = _AFTER_FUNC, True, ""

    def _emit_param(self, out: ParseDelta, raw: str) -> None:
        if raw.startswith("\n"):
            raw = raw[1:]
        if raw.endswith("\n"):
            raw = raw[:-1]
        value = convert_value(raw, self._props.get(self._fname, {}).get(self._pname))
        piece = ("{" if self._nparams == 0 else ", ") + json.dumps(self._pname, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False)
        self._nparams += 1
        self._call(out, piece)

    def _step(self, out: ParseDelta, final: bool) -> bool:
        """Advance as far as the buffer allows; True when more progress may be possible."""
        b = self._buf
        st = self._state
        if st == _TEXT:
            i = b.find(TOOL_START)
            if i >= 0:
                self._content(out, b[:i])
                self._buf = b[i:]
                self._state = _OPEN
                return True
            k = 0 if final else _partial_suffix(b, (TOOL_START,))
            self._content(out, b[: len(b) - k])
            self._buf = b[len(b) - k :]
            return False
        if st == _OPEN:  # buffer starts with <tool_call>; expect whitespace then <function=
            rest = b[len(TOOL_START) :].lstrip()
            if rest.startswith(FUNC_START):
                self._opened = b[len(TOOL_START) : len(b) - len(rest) + len(FUNC_START)]
                self._buf = rest[len(FUNC_START) :]
                self._state = _FNAME
                return True
            if not final and FUNC_START.startswith(rest) and len(b) - len(TOOL_START) - len(rest) <= _MAX_NAME:
                return False
            return self._not_a_call(out)
        if st == _FNAME:
            j = b.find(">")
            if j < 0:
                if final or len(b) > _MAX_NAME or "\n" in b or "<" in b:
                    return self._not_a_call(out)
                return False
            name = b[:j].strip()
            if not name or "\n" in name or "<" in name:
                return self._not_a_call(out)
            self._buf = b[j + 1 :]
            self._ncalls += 1
            self._fname, self._nparams, self._hold_ws, self._ws = name, 0, False, ""
            self._call(out, "", id=f"call_{uuid.uuid4().hex[:24]}", name=name)
            self._state = _FUNC
            return True
        if st == _FUNC:  # inside a function: expect <parameter=, </function> (or </tool_call>)
            s = b.lstrip()
            if s.startswith(PARAM_START):
                self._buf, self._state = s[len(PARAM_START) :], _PNAME
                return True
            if s.startswith(FUNC_END):
                self._buf = s[len(FUNC_END) :]
                self._end_call(out)
                return True
            if s.startswith(TOOL_END):
                self._buf = s
                self._end_call(out)
                return True
            if final:
                self._buf = ""
                self._end_call(out)
                return True
            if any(t.startswith(s) for t in (PARAM_START, FUNC_END, TOOL_END)):
                self._buf = s
                return False
            j = s.find("<", 1)  # stray text inside a function: skip to the next tag
            self._buf = s[j:] if j >= 0 else ""
            return j >= 0
        if st == _PNAME:
            j = b.find(">")
            if j < 0:
                if final:
                    self._buf = ""
                    self._end_call(out)
                    return True
                return False
            self._pname = b[:j].strip()
            self._buf, self._state, self._scan = b[j + 1 :], _VALUE, 0
            return True
        if st == _VALUE:
            terms = (PARAM_END, PARAM_START, FUNC_END, TOOL_END)
            hits = [(b.find(t, self._scan), t) for t in terms]
            hits = [(i, t) for i, t in hits if i >= 0]
            if hits:
                i, t = min(hits)
                self._emit_param(out, b[:i])
                self._buf = b[i + len(PARAM_END) :] if t == PARAM_END else b[i:]
                self._state = _FUNC
                return True
            if final:
                self._emit_param(out, b)
                self._buf = ""
                self._state = _FUNC
                return True
            self._scan = max(0, len(b) - max(len(t) for t in terms) + 1)
            return False
        if st == _AFTER_FUNC:  # expect whitespace then </tool_call>
            s = b.lstrip()
            if s.startswith(TOOL_END):
                self._buf, self._state = s[len(TOOL_END) :], _TEXT
                return True
            if not final and TOOL_END.startswith(s):
                return False
            self._buf, self._state = s, _TEXT  # </tool_call> missing: carry on with text
            return bool(s) or not final
        raise AssertionError(f"unknown parser state {st}")

    def _not_a_call(self, out: ParseDelta) -> bool:
        """What looked like the start of a call is not one: "<tool_call>" is content, and the
        text after it is scanned again as ordinary text."""
        self._content(out, TOOL_START)
        self._buf = self._opened + self._buf if self._state == _FNAME else self._buf[len(TOOL_START) :]
        self._state = _TEXT
        return True


@dataclass
class ParsedMessage:
    """A whole message: content and complete tool calls (``arguments`` a JSON string)."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


def collect(deltas: Iterable[ParseDelta]) -> ParsedMessage:
    """Concatenate parser deltas into one message (what a non-streaming response returns)."""
    msg = ParsedMessage()
    for d in deltas:
        msg.content += d.content
        for tc in d.tool_calls:
            if tc.index == len(msg.tool_calls):
                msg.tool_calls.append({"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": ""}})
            msg.tool_calls[tc.index]["function"]["arguments"] += tc.arguments
    return msg
