"""`toolkit eval`: the torch reference and the compiled artifact on the same inputs, metrics side by side, the deltas,
and how closely the two engines' outputs agree item by item."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..api import Embedder, Reranker, find_artifacts
from ..artifact import source_checkpoint
from ..errors import ToolkitError
from ..report import format_table
from .datasets import load_dataset
from .metrics import ranking_agreement, reranking_metrics, sts_correlations

ENGINES = ("both", "torch", "artifact")
DEFAULT_MAX_DROP = 0.01  # the artifact may trail torch by at most this much on any metric (0..1 scale)


def _embed_pairs(model: Embedder, examples, instruction: str):
    texts = sorted({t for e in examples for t in (e.sentence1, e.sentence2)})
    index = {t: i for i, t in enumerate(texts)}
    vectors = model.encode(texts, instruction=instruction, progress=True)  # symmetric task: instruction on both sides
    a = vectors[[index[e.sentence1] for e in examples]]
    b = vectors[[index[e.sentence2] for e in examples]]
    return vectors, np.sum(a * b, axis=-1)


def _embed_reranking(model: Embedder, examples, instruction: str):
    queries = model.encode_queries([e.query for e in examples], instruction=instruction, progress=True)
    passages = model.encode_documents([p for e in examples for p in e.passages], progress=True)
    scores, start = [], 0
    for q, e in zip(queries, examples):
        scores.append(passages[start:start + len(e.passages)] @ q)
        start += len(e.passages)
    return np.concatenate([queries, passages]), scores


def _rerank(model: Reranker, examples, instruction: str):
    flat = model.score([(e.query, p) for e in examples for p in e.passages], instruction, progress=True)
    scores, start = [], 0
    for e in examples:
        scores.append(flat[start:start + len(e.passages)])
        start += len(e.passages)
    return flat, scores


def run_engine(model, task: str, spec, examples) -> dict:
    """Outputs (`items`: embeddings or scores, one per text/pair) and metrics of one engine."""
    started = time.perf_counter()
    if spec.kind == "pairs":
        items, sims = _embed_pairs(model, examples, spec.instruction)
        metrics = sts_correlations(sims, np.array([e.score for e in examples]), spec.score_range)
        per_query = None
    else:
        items, per_query = (_embed_reranking if task == "embedding" else _rerank)(model, examples, spec.instruction)
        metrics = reranking_metrics(per_query, [e.labels for e in examples])
    return {"items": items, "per_query": per_query, "metrics": metrics,
            "seconds": time.perf_counter() - started, "nonfinite": int((~np.isfinite(items)).sum())}


def parity(task: str, spec, torch_run: dict, artifact_run: dict) -> dict:
    a, b = torch_run["items"], artifact_run["items"]
    out = {"nonfinite_torch": torch_run["nonfinite"], "nonfinite_artifact": artifact_run["nonfinite"]}
    if task == "embedding":
        cos = np.sum(a * b, axis=-1)
        out.update(cosine_min=float(cos.min()), cosine_p1=float(np.percentile(cos, 1)), cosine_mean=float(cos.mean()))
    else:
        diff = np.abs(a - b)
        out.update(score_abs_diff_max=float(diff.max()), score_abs_diff_mean=float(diff.mean()))
    if torch_run["per_query"] is not None:
        out.update(ranking_agreement(torch_run["per_query"], artifact_run["per_query"]))
    return out


def evaluate(task: str, dataset: str, artifact: str | Path | None = None, checkpoint: str | None = None,
             engine: str = "both", limit: int | None = None, data_dir: str | Path | None = None,
             max_drop: float = DEFAULT_MAX_DROP, instances: int = 1) -> dict:
    if engine not in ENGINES:
        raise ToolkitError(f"engine must be one of {ENGINES}")
    name, spec, examples = load_dataset(dataset, limit, data_dir)
    if task == "reranker" and spec.kind != "reranking":
        raise ToolkitError(f"{name} is a sentence-pair dataset; the reranker is evaluated on msmarco")
    if artifact is None and engine != "torch":
        raise ToolkitError("--artifact is required unless --engine torch")
    cls = Embedder if task == "embedding" else Reranker
    result = {"task": task, "dataset": name, "source": dataset, "examples": len(examples), "runs": {}}
    runs = {}
    compiled = cls.from_artifacts(artifact, instances=instances, truncation="truncate") if artifact else None
    try:
        if engine in ("both", "torch"):
            ckpt = checkpoint or (source_checkpoint(find_artifacts(artifact)[0]) if artifact else None)
            if not ckpt:
                raise ToolkitError("--checkpoint is required for the torch engine")
            with cls.from_checkpoint(ckpt, max_length=compiled.max_length if compiled else 8192,
                                     truncation="truncate") as ref:
                runs["torch"] = run_engine(ref, task, spec, examples)
        if engine in ("both", "artifact"):
            runs["artifact"] = run_engine(compiled, task, spec, examples)
            result["artifact"] = str(artifact)
    finally:
        if compiled:
            compiled.close()
    for k, r in runs.items():
        result["runs"][k] = {"metrics": r["metrics"], "seconds": r["seconds"], "nonfinite": r["nonfinite"]}
    if len(runs) == 2:
        t, a = runs["torch"]["metrics"], runs["artifact"]["metrics"]
        result["delta"] = {k: a[k] - t[k] for k in t if isinstance(t[k], float)}
        result["parity"] = parity(task, spec, runs["torch"], runs["artifact"])
        drops = {k: -d for k, d in result["delta"].items() if -d > max_drop}
        result["max_drop"] = max_drop
        result["passed"] = not drops and runs["artifact"]["nonfinite"] == 0
        result["failures"] = drops
    return result


def eval_tables(result: dict) -> str:
    runs = result["runs"]
    names = list(runs)
    metric_keys = [k for k, v in runs[names[0]]["metrics"].items() if isinstance(v, float)]
    rows = []
    for k in metric_keys:
        row = [k] + [runs[n]["metrics"][k] for n in names]
        if "delta" in result:
            row.append(result["delta"][k])
        rows.append(row)
    headers = ["metric"] + names + (["delta"] if "delta" in result else [])
    title = f"{result['task']} on {result['dataset']} ({result['examples']} examples from {result['source']})"
    out = format_table(headers, rows, title=title)
    out += "\nwall time: " + ", ".join(f"{n} {runs[n]['seconds']:.2f} s" for n in names)
    if "parity" in result:
        out += "\n\n" + format_table(["parity (torch vs artifact)", "value"],  # cosines near 1: show the digits
                                     [[k, (f"{v:.7f}" if abs(v) >= 1e-3 else f"{v:.2e}") if isinstance(v, float) else v]
                                      for k, v in result["parity"].items()])
        verdict = "OK" if result["passed"] else f"FAIL (drops over {result['max_drop']}: {result['failures']})"
        out += f"\n\nartifact vs torch: {verdict}"
    return out
