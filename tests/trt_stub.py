"""The one stub of ``tensorrt`` / ``tensorrt.plugin`` (no full TensorRT here). :func:`make_trt_stub`
returns modules that record every plugin registration; the ``trt_stub`` fixture (conftest.py)
installs them for one test; subprocess scripts that compile real PTX import it from here."""

from __future__ import annotations

import types


class SymExpr(int):
    """A shape expression of the stub: a known int (what every test here builds with)."""

    is_constant = True

    def constant_value(self) -> int:
        return int(self)

    def __mul__(self, o):
        return SymExpr(int(self) * int(o))

    __rmul__ = __mul__

    def __add__(self, o):
        return SymExpr(int(self) + int(o))

    __radd__ = __add__


class TensorDesc:
    def __init__(self, shape, dtype=None):
        self.shape_expr, self.dtype = [SymExpr(s) for s in shape], dtype

    def like(self):
        return TensorDesc(self.shape_expr, self.dtype)

    def aliased(self):
        return self


class SymExprs:
    pass


class SymIntExprs(SymExprs):
    from_tuple = staticmethod(list)


def make_trt_stub() -> tuple[types.ModuleType, types.ModuleType, dict]:
    """(tensorrt, tensorrt.plugin, registry): the registry maps plugin id -> {"desc", "autotune",
    "aot"} -> the decorated function. Install with ``sys.modules.update`` or :func:`trt_stub`."""
    reg: dict[str, dict] = {}

    def deco(kind):
        return lambda pid: (lambda f: reg.setdefault(pid, {}).__setitem__(kind, f) or f)

    trt = types.ModuleType("tensorrt")
    trtp = types.ModuleType("tensorrt.plugin")
    for n in ("float32", "float16", "bfloat16", "int32", "int64", "uint8"):
        setattr(trt, n, n)
    trt.plugin = trtp
    trtp.__dict__.update(TensorDesc=TensorDesc, SymExprs=SymExprs, SymIntExprs=SymIntExprs, SymInt32=int,
                         KernelLaunchParams=types.SimpleNamespace, cdiv=lambda a, b: -(-a // b),
                         from_shape_expr=lambda shape, dtype: TensorDesc(shape, dtype),
                         AutoTuneCombination=lambda *a: a[0],
                         register=deco("desc"), autotune=deco("autotune"), aot_impl=deco("aot"))
    return trt, trtp, reg
