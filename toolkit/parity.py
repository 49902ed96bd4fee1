"""How closely two backends agree, in the task's own terms (used by compile validation, demo and eval)."""
from __future__ import annotations

import numpy as np

# Tolerances an fp16 artifact must meet against the fp32 Hugging Face model (fp32 artifacts: much tighter).
TOLERANCES = {
    "fp16": {"embedding_min_cosine": 0.999, "reranker_max_prob_diff": 1e-2},
    "fp32": {"embedding_min_cosine": 0.99999, "reranker_max_prob_diff": 1e-4},
}


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def yes_probability(logits: np.ndarray) -> np.ndarray:
    """softmax over ("no", "yes") logits → P(yes)."""
    logits = np.asarray(logits, dtype=np.float64)
    return (1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))).astype(np.float32)


def compare(task: str, reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Per-item agreement between raw task outputs (embedding hidden states or yes/no logits)."""
    nonfinite = int((~np.isfinite(candidate)).sum())
    if task == "embedding":
        a, b = l2_normalize(reference), l2_normalize(candidate)
        cos = np.sum(a * b, axis=-1)
        return {"items": int(len(cos)), "min_cosine": float(np.min(cos)),
                "mean_cosine": float(np.mean(cos)), "max_abs_diff_normalized": float(np.max(np.abs(a - b))),
                "nonfinite": nonfinite}
    diff = np.abs(yes_probability(reference) - yes_probability(candidate))
    return {"items": int(len(diff)), "max_prob_diff": float(np.max(diff)), "mean_prob_diff": float(np.mean(diff)),
            "nonfinite": nonfinite}


def within_tolerance(task: str, dtype: str, stats: dict) -> bool:
    tol = TOLERANCES[dtype]
    if stats["nonfinite"]:
        return False
    if task == "embedding":
        return stats["min_cosine"] >= tol["embedding_min_cosine"]
    return stats["max_prob_diff"] <= tol["reranker_max_prob_diff"]
