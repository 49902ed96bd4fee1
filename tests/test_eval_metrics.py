"""Metric functions against hand-computed cases, and loaders against malformed rows."""
import json
import math

import numpy as np
import pytest

from toolkit.errors import ToolkitError
from toolkit.eval.datasets import load_dataset
from toolkit.eval.metrics import (average_precision, ndcg, ranking_agreement, reciprocal_rank, reranking_metrics,
                                  sts_correlations)


def test_average_precision_hand_computed():
    # ranking: pos, neg, pos, neg  -> AP = (1/1 + 2/3) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # single positive at rank 3 -> AP = RR = 1/3
    assert average_precision([0.3, 0.9, 0.8], [1, 0, 0]) == pytest.approx(1 / 3)
    assert reciprocal_rank([0.3, 0.9, 0.8], [1, 0, 0]) == pytest.approx(1 / 3)


def test_ties_are_ranked_pessimistically():
    # all-equal scores: the positive (listed first) goes after the 3 negatives
    assert average_precision([0.5] * 4, [1, 0, 0, 0]) == pytest.approx(1 / 4)
    assert reciprocal_rank([0.5] * 4, [1, 0, 0, 0]) == pytest.approx(1 / 4)
    assert ndcg([0.5] * 4, [1, 0, 0, 0]) == pytest.approx(1 / math.log2(5))
    # tie between the positive and one negative only
    assert average_precision([0.9, 0.9, 0.1], [1, 0, 0]) == pytest.approx(1 / 2)


def test_ndcg_and_mrr_cutoff():
    scores = np.arange(12, 0, -1)  # positive at rank 11: outside @10
    labels = [0] * 10 + [1, 0]
    assert reciprocal_rank(scores, labels, k=10) == 0.0 and ndcg(scores, labels, k=10) == 0.0
    # two positives at ranks 1 and 3: DCG = 1 + 1/log2(4); IDCG = 1 + 1/log2(3)
    assert ndcg([3, 2, 1], [1, 0, 1]) == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3)))


def test_query_without_positive_is_left_out_and_counted():
    m = reranking_metrics([[0.9, 0.1], [0.2, 0.8]], [[1, 0], [0, 0]])
    assert m["map"] == 1.0 and m["mrr@10"] == 1.0 and m["queries"] == 1 and m["queries_without_positive"] == 1


def test_sts_correlations():
    # ranks: similarity 1,2,3,4 vs gold 1,3,2,4 -> sum d^2 = 2 -> rho = 1 - 6*2 / (4*15) = 0.8
    r = sts_correlations(np.array([0.1, 0.35, 0.4, 0.8]), np.array([0, 2, 1, 5]), (0, 5))
    assert r["spearman"] == pytest.approx(0.8) and r["pearson"] == pytest.approx(np.corrcoef(
        [0.1, 0.35, 0.4, 0.8], [0, 0.4, 0.2, 1.0])[0, 1])
    assert math.isnan(sts_correlations(np.ones(3), np.array([0, 1, 2]), (0, 5))["spearman"])


def test_ranking_agreement():
    assert ranking_agreement([[0.1, 0.5, 0.9]], [[0.2, 0.6, 0.7]])["kendall_tau_min"] == 1.0
    assert ranking_agreement([[0.1, 0.5, 0.9]], [[0.9, 0.5, 0.1]])["kendall_tau_min"] == -1.0


def test_bundled_samples_load():
    for name, kind in (("sts12-sample", "pairs"), ("bq-sample", "pairs"), ("msmarco-sample", "reranking")):
        got_name, spec, rows = load_dataset(name)
        assert spec.kind == kind and len(rows) >= 8 and got_name == name.removesuffix("-sample")
    _, _, ms = load_dataset("msmarco-sample")
    assert ms[0].labels[0] == 1 and len(ms[0].passages) == 20


@pytest.mark.parametrize("row, message", [
    ({"sentence1": "a", "sentence2": "b"}, "line 2.*'score'|:2: field 'score'"),
    ({"sentence1": "", "sentence2": "b", "score": 1}, ":2: field 'sentence1'"),
    ({"sentence1": "a", "sentence2": "b", "score": 7}, ":2: score 7.0 is outside"),
])
def test_malformed_pair_rows_name_the_line(tmp_path, row, message):
    path = tmp_path / "sts12_bad.jsonl"
    path.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": 3.0}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ToolkitError, match=message):
        load_dataset(str(path))


def test_malformed_msmarco_and_json_rows_name_the_line(tmp_path):
    path = tmp_path / "ms.jsonl"
    good = {"query_id": "1", "query": "q", "positive_passages": [{"docid": "1", "title": "", "text": "t"}],
            "negative_passages": []}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "positive_passages": [{"docid": "2"}]}) + "\n")
    with pytest.raises(ToolkitError, match=r"ms.jsonl:2 positive_passages\[0\]: field 'text'"):
        load_dataset(str(path))
    path.write_text(json.dumps(good) + "\n{broken\n")
    with pytest.raises(ToolkitError, match=r"ms.jsonl:2: not valid JSON"):
        load_dataset(str(path))


def test_unknown_and_offline_datasets_say_what_to_do():
    with pytest.raises(ToolkitError, match="unknown dataset"):
        load_dataset("nope")
    with pytest.raises(ToolkitError, match="sts12_test.jsonl"):
        load_dataset("sts12")  # HF_HUB_OFFLINE=1 in conftest
