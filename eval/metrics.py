"""Metrics: STS correlations (MTEB convention) and reranking MAP / MRR@10 / NDCG@10.

Ties are ranked pessimistically (a positive tied with negatives is placed after them), so a model that outputs
constant scores gets no credit from the order the passages happened to come in (MS MARCO files list the positive
first). Queries with no positive have no defined AP/RR/NDCG and are left out of the means (and counted).
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def sts_correlations(similarity: np.ndarray, gold: np.ndarray, score_range: tuple[float, float]) -> dict:
    """Spearman / Pearson of cosine similarity against gold normalised to 0..1 (correlations are scale-invariant;
    normalising keeps the record in MTEB's convention)."""
    lo, hi = score_range
    gold = (np.asarray(gold, dtype=np.float64) - lo) / (hi - lo)
    similarity = np.asarray(similarity, dtype=np.float64)
    if np.ptp(similarity) == 0 or np.ptp(gold) == 0:
        return {"spearman": float("nan"), "pearson": float("nan")}
    return {"spearman": float(stats.spearmanr(similarity, gold).statistic),
            "pearson": float(stats.pearsonr(similarity, gold).statistic)}


def ranking_order(scores, labels) -> np.ndarray:
    """Indices by descending score; among equal scores, negatives first (pessimistic)."""
    return np.lexsort((np.asarray(labels), -np.asarray(scores, dtype=np.float64)))


def average_precision(scores, labels) -> float:
    rel = np.asarray(labels)[ranking_order(scores, labels)]
    if rel.sum() == 0:
        return float("nan")
    hits = np.cumsum(rel)
    return float(np.sum(hits[rel == 1] / (np.flatnonzero(rel) + 1)) / rel.sum())


def reciprocal_rank(scores, labels, k: int = 10) -> float:
    rel = np.asarray(labels)[ranking_order(scores, labels)]
    if rel.sum() == 0:
        return float("nan")
    first = np.flatnonzero(rel[:k])
    return float(1.0 / (first[0] + 1)) if len(first) else 0.0


def ndcg(scores, labels, k: int = 10) -> float:
    labels = np.asarray(labels, dtype=np.float64)
    if labels.sum() == 0:
        return float("nan")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    gains = labels[ranking_order(scores, labels)][:k]
    ideal = np.sort(labels)[::-1][:k]
    return float(np.sum(gains * discounts[: len(gains)]) / np.sum(ideal * discounts[: len(ideal)]))


def reranking_metrics(per_query_scores: list, per_query_labels: list) -> dict:
    ap = [average_precision(s, l) for s, l in zip(per_query_scores, per_query_labels)]
    rr = [reciprocal_rank(s, l) for s, l in zip(per_query_scores, per_query_labels)]
    nd = [ndcg(s, l) for s, l in zip(per_query_scores, per_query_labels)]
    valid = ~np.isnan(ap)
    mean = lambda xs: float(np.mean(np.asarray(xs)[valid])) if valid.any() else float("nan")  # noqa: E731
    return {"map": mean(ap), "mrr@10": mean(rr), "ndcg@10": mean(nd),
            "queries": int(valid.sum()), "queries_without_positive": int((~valid).sum())}


def ranking_agreement(scores_a: list, scores_b: list) -> dict:
    """Kendall tau between two engines' rankings of each query's passages."""
    taus = []
    for a, b in zip(scores_a, scores_b):
        tau = stats.kendalltau(a, b).statistic
        taus.append(1.0 if np.isnan(tau) and np.array_equal(np.argsort(a), np.argsort(b)) else tau)
    taus = np.asarray(taus, dtype=np.float64)
    return {"kendall_tau_mean": float(np.nanmean(taus)), "kendall_tau_min": float(np.nanmin(taus))}
