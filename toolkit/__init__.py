"""qwen3-deploy: compile, run and evaluate Qwen3-Embedding / Qwen3-Reranker."""
