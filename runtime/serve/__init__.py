"""qcn.runtime.serve: an OpenAI-compatible server over the runtime (``qcn-serve ARTIFACT``).

One process, the model loaded once, a scheduler thread that owns the Session (continuous
batching, chunked prefill interleaved with decode), chat templates rendered from the artifact,
streaming ``qwen3_coder`` tool calls, and exact multi-turn state reuse. Never imports
qcn.compile.

    from qcn.runtime.serve import ServeConfig, Server, create_app
    app = create_app(Server(ServeConfig("build/artifacts/pico_cpu")))
"""

from .app import Server, create_app
from .config import ServeConfig

__all__ = ["ServeConfig", "Server", "create_app"]
