"""TensorRT backend: runs a build-stage artifact (`manifest.json` stage "build", one engine for
both graphs) with `tensorrt` or `tensorrt_rtx`, whichever built it (manifest `build.module`).

One module per job:
  engine.py        the engine against the manifest (`EngineInfo`, `verify_engine`)   pure, tested
  profiles.py      which optimization profile a call uses, and whether it fits        pure, tested
  plan.py          what is bound to which tensor; the device buffers allocated once   pure, tested
  backend.py       `TensorRTBackend`: load, check, `run(graph, feeds)`, `create_state`  NEEDS A GPU
  device_state.py  `DeviceState`, the Session's state store on the GPU (the same
                   qcn.runtime.state.StateStore interface as the onnxruntime backend's);
                   `append_kv`, the device-side K/V scatter                           NEEDS A GPU

NEEDS A GPU: CI has neither a GPU nor full TensorRT. What CI tests are the pure modules and
`append_kv` on CPU tensors. `TensorRTBackend` and `DeviceState` are written against the
TensorRT 10 / TensorRT-RTX 1.x Python API and have NOT been executed: neither captured decode
nor append_kv on a GPU has ever run.

Never imports qcn.compile.
"""

from .backend import TensorRTBackend
from .device_state import DeviceState, append_kv
from .engine import EngineInfo, Profile, verify_engine
from .plan import Binding, binding_plan, buffer_sizes
from .profiles import check_profile, select_profile

__all__ = ["EngineInfo", "Profile", "verify_engine", "select_profile", "check_profile", "Binding", "binding_plan",
           "buffer_sizes", "TensorRTBackend", "DeviceState", "append_kv"]
