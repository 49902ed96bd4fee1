"""qwen3-deploy: compile, run and evaluate Qwen3-Embedding / Qwen3-Reranker.

    from toolkit import Embedder, Reranker, Engine
"""
__all__ = ["Embedder", "Reranker", "Engine", "ToolkitError"]


def __getattr__(name):  # lazy: `import toolkit` stays cheap (no torch / onnxruntime / tvm until used)
    if name in ("Embedder", "Reranker"):
        from toolkit import api

        return getattr(api, name)
    if name == "Engine":
        from toolkit.runtime import Engine

        return Engine
    if name == "ToolkitError":
        from toolkit.errors import ToolkitError

        return ToolkitError
    raise AttributeError(name)
