"""TensorRT plugin registration for the build stage (full TensorRT only).

The passes stage lowers the qcn nodes its kernels support into plugin nodes and records, per
pass, the plugin ids the lowered graph uses and the registration config (manifest
``passes.plugins``). :func:`register_plugins` registers exactly those, for the recipe's
compute capability, through the op registry's ``register`` rows (plugins/registry.py),
importing ``tensorrt`` lazily. tensorrt_rtx targets: nothing (no plugin path in TensorRT-RTX).

NOT EXECUTED: full TensorRT is not installable here and there is no GPU, so no engine was
ever parsed or built with these plugins; the plugin nodes and registrations were checked on
CPU against a stub of ``tensorrt.plugin`` only (tests/test_plugin_lowering.py).
"""

from __future__ import annotations

from ..plugins.registry import BY_PASS

__all__ = ["register_plugins", "cc_int", "PluginRegistrationError"]

_REGISTERED: dict[str, tuple] = {}  # pass -> (cc, config): TensorRT registers a plugin id once per process


class PluginRegistrationError(RuntimeError):
    """A plugin id is already registered in this process with another config or target."""


def cc_int(compute_capability: str | int) -> int:
    """"9.0" -> 90, "12.0" -> 120, 89 -> 89."""
    if isinstance(compute_capability, int):
        return compute_capability
    major, _, minor = str(compute_capability).partition(".")
    return int(major) * 10 + int(minor or 0)


def register_plugins(plugins: dict, cc: int) -> list[str]:
    """Register the plugins of manifest section ``passes.plugins`` ({pass: {"config", "plugins"}})
    for compute capability ``cc``. Returns the sorted plugin ids."""
    ids = set()
    for pass_name, entry in plugins.items():
        if pass_name not in BY_PASS:
            raise PluginRegistrationError(f"pass {pass_name!r} has no op registry row; known: {sorted(BY_PASS)}")
        config = entry["config"]
        key = (cc, repr(sorted(config.items())))
        if pass_name in _REGISTERED:
            if _REGISTERED[pass_name] != key:
                raise PluginRegistrationError(
                    f"{pass_name} plugins are already registered in this process with {_REGISTERED[pass_name]}; "
                    f"this graph needs {key} (TensorRT registers a plugin id once: use a new process)")
        else:
            BY_PASS[pass_name].register(cc, dict(config))
            _REGISTERED[pass_name] = key
        ids |= set(entry["plugins"])
    return sorted(ids)
