"""qcn.runtime: loads an artifact directory by its manifest and decodes. Never imports qcn.compile.

    from qcn.runtime import load, SamplingParams
    with load("build/artifacts/tiny_cpu") as gen:
        print(gen.generate(["def fibonacci(n):"], gen.params(max_new_tokens=32))[0].text)
"""

from .generate import Generator, Result, generate, load
from .sampling import SamplingParams

__all__ = ["Generator", "Result", "SamplingParams", "generate", "load"]
