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
# cosines closer together than this are one value told apart by float rounding alone (float32: ~1e-7 near 1); ranked,
# such noise gives a random "correlation"
CONSTANT_SPREAD = 1e-6


def sts_correlations(similarity: np.ndarray, gold: np.ndarray, score_range: tuple[float, float]) -> dict:
    """Spearman / Pearson of cosine similarity against gold normalised to 0..1 (correlations are scale-invariant;
    normalising keeps the record in MTEB's convention). NaN when either side is constant (the similarities: up to
    float rounding, CONSTANT_SPREAD)."""
    from scipy import stats

    lo, hi = score_range
    gold = (np.asarray(gold, dtype=np.float64) - lo) / (hi - lo)
    similarity = np.asarray(similarity, dtype=np.float64)
    if len(similarity) < 2 or np.ptp(similarity) < CONSTANT_SPREAD or np.ptp(gold) == 0:
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


def per_query_metrics(per_query_scores: list, per_query_labels: list) -> dict[str, np.ndarray]:
    """MAP's, MRR@10's, NDCG@10's and Recall@1/5/10's value for each query (NaN for a query without a positive)."""
    pairs = list(zip(per_query_scores, per_query_labels))
    columns = {"map": [average_precision(s, lab) for s, lab in pairs],
               "mrr@10": [reciprocal_rank(s, lab, 10) for s, lab in pairs],
               "ndcg@10": [ndcg(s, lab, 10) for s, lab in pairs]}
    for k in RECALL_CUTOFFS:
        columns[f"recall@{k}"] = [recall_at_k(s, lab, k) for s, lab in pairs]
    return {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}


def reranking_metrics(per_query_scores: list, per_query_labels: list,
                      columns: dict[str, np.ndarray] | None = None) -> dict:
    """MAP, MRR@10, NDCG@10 and Recall@1/5/10 averaged over the queries that have a positive, plus the counts of
    queries used and left out. All NaN when any score is not finite (NaN sorts as a number would not: a ranking of
    NaN scores is no ranking, and a real-looking MAP from it would hide that), as `sts_correlations` is. `columns`:
    their `per_query_metrics` where the caller has them already."""
    finite = all(np.isfinite(np.asarray(s, dtype=np.float64)).all() for s in per_query_scores)
    if columns is None:
        columns = per_query_metrics(per_query_scores, per_query_labels)
    valid = ~np.isnan(columns["map"])
    out = {name: float(np.mean(values[valid])) if valid.any() and finite else float("nan")
           for name, values in columns.items()}
    return {**out, "queries": int(valid.sum()), "queries_without_positive": int((~valid).sum())}


def queries_lower(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """For each metric of two runs' `per_query_metrics`: on how many queries `candidate` scores below `reference`, and
    of how many (those with a positive): what a drop of the mean stands for."""
    return {name: (int(np.sum(candidate[name] < values)), int(np.sum(~np.isnan(values))))
            for name, values in reference.items()}


def ranking_agreement(scores_a: list, scores_b: list) -> dict:
    """Kendall tau between two engines' rankings of each query's passages: mean and worst over the queries where it
    is defined, and how many it is not (`queries_without_kendall_tau`: one passage, all of a query's passages tied in
    either engine, or a NaN score). Those are left out, never counted as agreeing: tau is undefined there, as
    it is for the task's own measure over all items; NaN where no query has one."""
    from scipy import stats

    # one passage: no pair to order (scipy would warn of a small sample)
    taus = np.asarray([stats.kendalltau(a, b).statistic if len(a) > 1 else np.nan for a, b in zip(scores_a, scores_b)],
                      dtype=np.float64)
    defined = taus[np.isfinite(taus)]
    mean, worst = (float(np.mean(defined)), float(np.min(defined))) if len(defined) else (float("nan"),) * 2
    return {"kendall_tau_mean": mean, "kendall_tau_min": worst, "queries_without_kendall_tau": len(taus) - len(defined)}
