"""OpenAI request schemas (the subset qcn serves) and OpenAI-style errors.

Unknown request fields are ignored (OpenAI clients send fields a server may not know, e.g.
``user`` or ``metadata``); known fields whose values this server cannot honour (``n`` > 1,
``logprobs``, penalties, ``response_format`` other than text, forced ``tool_choice``) get a 400
that names the field, never a silent wrong answer. ``top_k`` and ``ignore_eos`` are accepted as
extensions (vLLM's names), e.g. through the openai client's ``extra_body``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "validation_error",
]


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field."""
    err = e.errors(include_url=False)[0]
    param = _loc(err["loc"]) or None
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown field"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


def _unsupported(param: str, msg: str) -> APIError:
    return APIError(400, f"{param}: {msg}", param=param)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    """Fields shared by chat and text completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, description="0 or -1 = off")
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if any(not isinstance(s, str) or not s for s in v):
                raise ValueError("stop strings must be non-empty strings")
        elif isinstance(v, str) and not v:
            raise ValueError("a stop string must be non-empty")
        return v

    def check(self) -> None:
        """400 for known fields whose values this server cannot honour."""
        if self.n != 1:
            raise _unsupported("n", "only n=1 is supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise _unsupported(name, "not supported by this server (use 0)")
        if self.logit_bias:
            raise _unsupported("logit_bias", "not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise _unsupported("stream_options", "only allowed when stream is true")

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FunctionDef(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolCallFunction(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            for i, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content[{i}]: only text parts {{'type': 'text', 'text': ...}} are supported")
            return v
        raise ValueError("must be a string, a list of text parts, or null")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict | None = None

    def check(self) -> None:
        super().check()
        if self.logprobs or self.top_logprobs:
            raise _unsupported("logprobs", "not supported by this server")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "only {'type': 'text'} is supported (no guided decoding)")
        if self.tool_choice not in (None, "auto", "none"):
            raise _unsupported("tool_choice", "only 'auto' and 'none' are supported (no guided decoding to force a call)")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_dicts(self) -> list[dict] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class CompletionRequest(_Sampling):
    prompt: Any
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # a batch of one
        if isinstance(v, str):
            if not v:
                raise ValueError("must not be empty")
            return v
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        raise ValueError("must be a non-empty string or a list of token ids (batches of several prompts are not supported; send one request each)")

    def check(self) -> None:
        super().check()
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name):
                raise _unsupported(name, "not supported by this server")
        if self.best_of not in (None, 1):
            raise _unsupported("best_of", "only 1 is supported")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens
