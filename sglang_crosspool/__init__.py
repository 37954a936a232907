"""sglang-crosspool: serve many cold MoE models on shared GPUs, with the FFN weights in one
pool and a virtualized KV-cache in another.

In: requests for any served model (Python API here; SGLang/OpenAI HTTP APIs in the server).
Out: generated tokens, text and logprobs. `Engine` is the in-process entry point.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that light modules (config parsing, the planner) import without torch's cost.
    if name == "Engine":
        from sglang_crosspool.engine.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine"]
