"""`toolkit serve`: Qwen3-Embedding / Qwen3-Reranker artifacts behind an HTTP service that speaks TEI's and OpenAI's
APIs, batches rows across requests, and exports Prometheus metrics; on uvicorn, or as a Ray Serve deployment.

- `schemas.py`: request / response bodies (pydantic);
- `service.py`: the async layer over `Embedder` / `Reranker` (admission, tokenisation, the batch scheduler);
- `metrics.py`: Prometheus metrics, one registry per app;
- `app.py`: the FastAPI app (routes, errors, middleware);
- `server.py`: options and running on uvicorn; `ray_app.py`: the same app as a Ray Serve deployment.
"""
