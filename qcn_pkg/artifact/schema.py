"""One reader and one writer for the contract's frozen dataclasses (no schema library needed).

``from_json(cls, value, source)`` builds ``cls`` from parsed JSON, driven by its type hints:
every key must be a field (unknown keys are errors), a field without a default must be
present, and every value must have its field's type (``int`` refuses JSON ``true``; ``float``
takes ints; ``tuple[X, ...]`` is a JSON list, ``Mapping[str, X]`` an object, ``X | None``
takes null, ``Any`` any JSON value, deep-frozen). A field's ``metadata`` may hold ``check``,
a function of the decoded value that returns an error message or None, and ``what``, the
expected value in words. Fields with ``metadata={"local": True}`` are not part of the JSON
(they describe where the object was read from). ``to_json(obj)`` is the inverse.

Every failure is an :class:`~qcn.errors.ArtifactError` that names the source, the dotted key
and what would be valid: ``<dir>/manifest.json: key 'runtime.max_batch': must be a positive
integer, got 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable, get_args, get_origin

from ..errors import ArtifactError

__all__ = ["LOCAL", "Frozen", "from_json", "to_json", "freeze", "describe", "checked", "SchemaFailure"]

LOCAL = MappingProxyType({"local": True})


def checked(check: Callable[[Any], str | None], what: str | None = None, **kw) -> dataclasses.Field:
    """A dataclass field whose decoded value must pass ``check`` (message or None)."""
    meta = {"check": check} | ({"what": what} if what else {})
    return dataclasses.field(metadata=meta, **kw)


class SchemaFailure(Exception):
    def __init__(self, key: str, msg: str):
        super().__init__(key, msg)
        self.key, self.msg = key, msg


def freeze(v):
    """JSON value -> read-only: dicts become MappingProxyType, lists tuples."""
    if isinstance(v, Mapping):
        return MappingProxyType({k: freeze(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    return v


class Frozen:
    """Mixin for the contract's frozen dataclasses: a dict or list given to a JSON field (by
    code that builds a manifest) is stored read-only, as the reader would store it."""

    def __post_init__(self):
        for f in _json_fields(type(self)):
            v = getattr(self, f.name)
            if isinstance(v, (dict, list)):
                object.__setattr__(self, f.name, freeze(v))


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _json_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("local")]


def _is_union(tp) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def describe(tp) -> str:
    if tp is Any:
        return "any JSON value"
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(describe(a) for a in get_args(tp))
    origin = get_origin(tp)
    if origin is tuple:
        return f"a list of {_plural(get_args(tp)[0])}"
    if origin is not None and issubclass(origin, Mapping):
        return f"an object of {_plural(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "an object with keys " + ", ".join(f.name for f in _json_fields(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, tp.__name__)


def _plural(tp) -> str:
    d = describe(tp)
    return {"an integer": "integers", "a number": "numbers", "a string": "strings"}.get(d, d)


def _decode(tp, v, key: str):
    if tp is Any:
        return freeze(v)
    if _is_union(tp):
        args = get_args(tp)
        if v is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            return _decode(real[0], v, key)
        for a in real:
            try:
                return _decode(a, v, key)
            except SchemaFailure:
                pass
        raise SchemaFailure(key, f"must be {describe(tp)}, got {v!r}")
    origin = get_origin(tp)
    if origin is tuple:
        if not isinstance(v, list):
            raise SchemaFailure(key, f"must be {describe(tp)}, got {v!r}")
        item = get_args(tp)[0]
        return tuple(_decode(item, x, f"{key}[{i}]") for i, x in enumerate(v))
    if origin is not None and issubclass(origin, Mapping):
        if not isinstance(v, dict):
            raise SchemaFailure(key, f"must be {describe(tp)}, got {v!r}")
        item = get_args(tp)[1]
        return MappingProxyType({k: _decode(item, x, f"{key}.{k}") for k, x in v.items()})
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, v, key)
    ok = {
        int: lambda: isinstance(v, int) and not isinstance(v, bool),
        float: lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda: isinstance(v, str),
        bool: lambda: isinstance(v, bool),
    }[tp]()
    if not ok:
        raise SchemaFailure(key, f"must be {describe(tp)}, got {v!r}")
    return float(v) if tp is float else v


def _decode_dataclass(cls, v, key: str):
    if not isinstance(v, dict):
        raise SchemaFailure(key or "<root>", f"must be {describe(cls)}, got {type(v).__name__}")
    fields = _json_fields(cls)
    names = [f.name for f in fields]
    unknown = [k for k in v if k not in names]
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise SchemaFailure(where, f"unknown key (a {cls.__name__} has: {', '.join(names)})")
    hints = _hints(cls)
    kwargs = {}
    for f in fields:
        sub = f"{key}.{f.name}" if key else f.name
        what = f.metadata.get("what") or describe(hints[f.name])
        if f.name not in v:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaFailure(sub, f"missing (expected {what})")
            continue
        try:
            val = _decode(hints[f.name], v[f.name], sub)
        except SchemaFailure as e:
            if e.key == sub and "what" in f.metadata:
                raise SchemaFailure(sub, f"must be {what}, got {v[f.name]!r}") from None
            raise
        check = f.metadata.get("check")
        if check is not None and val is not None and (msg := check(val)):
            raise SchemaFailure(sub, msg)
        kwargs[f.name] = val
    return cls(**kwargs)


def from_json(cls, value, source: str, key: str = ""):
    """``cls`` from parsed JSON ``value``; ArtifactError naming ``source`` and the key otherwise."""
    try:
        return _decode(cls, value, key)
    except SchemaFailure as e:
        raise ArtifactError(f"{source}: key {e.key!r}: {e.msg}") from None


def to_json(obj):
    """The JSON value of a contract object: fields in declaration order; an optional field
    (default None) that is None is left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in _json_fields(type(obj)):
            val = getattr(obj, f.name)
            if val is None and f.default is None:
                continue
            out[f.name] = to_json(val)
        return out
    if isinstance(obj, Mapping):
        return {k: to_json(x) for k, x in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_json(x) for x in obj]
    return obj
