"""Metrics: STS correlations (MTEB convention) and ranking MAP / MRR@10 / NDCG@10 / Recall@k.

Ties are ranked pessimistically (a positive tied with negatives is placed after them), so a model that outputs
constant scores gets no credit from the order the passages happened to come in (MS MARCO files list the positive
first). Queries with no positive have no defined AP/RR/NDCG/recall and are left out of the means (and counted).

scipy is imported inside the functions that need it: the CLI imports this package to build its options, and
`scipy.stats` alone takes about two seconds to import.
"""
from __future__ import annotations

import numpy as np

RECALL_CUTOFFS = (1, 5, 10)


def sts_correlations(similarity: np.ndarray, gold: np.ndarray, score_range: tuple[float, float]) -> dict:
    """Spearman / Pearson of cosine similarity against gold normalised to 0..1 (correlations are scale-invariant;
    normalising keeps the record in MTEB's convention). NaN when either side is constant."""
    from scipy import stats

    lo, hi = score_range
    gold = (np.asarray(gold, dtype=np.float64) - lo) / (hi - lo)
    similarity = np.asarray(similarity, dtype=np.float64)
    if len(similarity) < 2 or np.ptp(similarity) == 0 or np.ptp(gold) == 0:
        return {"spearman": float("nan"), "pearson": float("nan")}
    return {"spearman": float(stats.spearmanr(similarity, gold).statistic),
            "pearson": float(stats.pearsonr(similarity, gold).statistic)}


def ranking_order(scores, labels) -> np.ndarray:
    """Indices by descending score; among equal scores, negatives first (pessimistic)."""
    return np.lexsort((np.asarray(labels), -np.asarray(scores, dtype=np.float64)))


def _ranked_labels(scores, labels) -> np.ndarray:
    """The 0/1 labels in ranked order (pessimistic ties)."""
    return np.asarray(labels)[ranking_order(scores, labels)]


def average_precision(scores, labels) -> float:
    """Mean of precision@rank over the positives' ranks; NaN without a positive."""
    rel = _ranked_labels(scores, labels)
    if rel.sum() == 0:
        return float("nan")
    hits = np.cumsum(rel)
    return float(np.sum(hits[rel == 1] / (np.flatnonzero(rel) + 1)) / rel.sum())


def reciprocal_rank(scores, labels, k: int = 10) -> float:
    """1 / rank of the first positive if it is in the top `k`, else 0; NaN without a positive."""
    rel = _ranked_labels(scores, labels)
    if rel.sum() == 0:
        return float("nan")
    first = np.flatnonzero(rel[:k])
    return float(1.0 / (first[0] + 1)) if len(first) else 0.0


def ndcg(scores, labels, k: int = 10) -> float:
    """Normalised discounted cumulative gain of the top `k` (binary gains, log2 discount); NaN without a positive."""
    labels = np.asarray(labels, dtype=np.float64)
    if labels.sum() == 0:
        return float("nan")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    gains = labels[ranking_order(scores, labels)][:k]
    ideal = np.sort(labels)[::-1][:k]
    return float(np.sum(gains * discounts[: len(gains)]) / np.sum(ideal * discounts[: len(ideal)]))


def recall_at_k(scores, labels, k: int = 10) -> float:
    """Fraction of the query's positives ranked in the top `k` (pessimistic ties); NaN without a positive."""
    rel = _ranked_labels(scores, labels)
    if rel.sum() == 0:
        return float("nan")
    return float(rel[:k].sum() / rel.sum())


def reranking_metrics(per_query_scores: list, per_query_labels: list) -> dict:
    """MAP, MRR@10, NDCG@10 and Recall@1/5/10 averaged over the queries that have a positive, plus the counts of
    queries used and left out. All NaN when any score is not finite (NaN sorts as a number would not: a ranking of
    NaN scores is no ranking, and a real-looking MAP from it would hide that), as `sts_correlations` is."""
    pairs = list(zip(per_query_scores, per_query_labels))
    finite = all(np.isfinite(np.asarray(s, dtype=np.float64)).all() for s, _ in pairs)
    columns = {"map": [average_precision(s, lab) for s, lab in pairs],
               "mrr@10": [reciprocal_rank(s, lab, 10) for s, lab in pairs],
               "ndcg@10": [ndcg(s, lab, 10) for s, lab in pairs]}
    for k in RECALL_CUTOFFS:
        columns[f"recall@{k}"] = [recall_at_k(s, lab, k) for s, lab in pairs]
    valid = ~np.isnan(np.asarray(columns["map"], dtype=np.float64))
    out = {name: float(np.mean(np.asarray(values)[valid])) if valid.any() and finite else float("nan")
           for name, values in columns.items()}
    return {**out, "queries": int(valid.sum()), "queries_without_positive": int((~valid).sum())}


def ranking_agreement(scores_a: list, scores_b: list) -> dict:
    """Kendall tau between two engines' rankings of each query's passages (mean and worst query)."""
    from scipy import stats

    taus = []
    for a, b in zip(scores_a, scores_b):
        tau = stats.kendalltau(a, b).statistic
        taus.append(1.0 if np.isnan(tau) and np.array_equal(np.argsort(a), np.argsort(b)) else tau)
    taus = np.asarray(taus, dtype=np.float64)
    if not len(taus) or np.isnan(taus).all():
        return {"kendall_tau_mean": float("nan"), "kendall_tau_min": float("nan")}
    return {"kendall_tau_mean": float(np.nanmean(taus)), "kendall_tau_min": float(np.nanmin(taus))}
