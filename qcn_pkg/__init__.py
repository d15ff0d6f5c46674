"""qcn: Qwen3-Coder-Next ahead-of-time compiler (`qcn.compile`) and runtime (`qcn.runtime`)."""

__version__ = "0.1.0"
