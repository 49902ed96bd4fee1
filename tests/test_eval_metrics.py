"""Metric functions against hand-computed cases, the pass/fail gate, the options' validation, and loaders against
malformed rows."""
import json
import math
import os

import datasets
import numpy as np
import pytest

from toolkit.errors import ToolkitError
from toolkit.eval import datasets as eval_datasets
from toolkit.eval import run as eval_run
from toolkit.eval.datasets import DATASETS, download, load_dataset, resolve_dataset
from toolkit.eval.metrics import (
    average_precision,
    ndcg,
    per_query_metrics,
    queries_lower,
    ranking_agreement,
    recall_at_k,
    reciprocal_rank,
    reranking_metrics,
    sts_correlations,
)
from toolkit.eval.run import DEFAULT_MAX_DROP, EvalOptions, gate, output_failures
from toolkit.report import display_width, format_columns, format_table, write_json
from toolkit.tasks import SIMILARITY_INSTRUCTION, WEB_SEARCH_INSTRUCTION


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


def test_recall_at_k_hand_computed():
    # ranking: pos, neg, pos, neg -> 1 of 2 positives in the top 1 and top 2, both in the top 3
    scores, labels = [0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]
    assert [recall_at_k(scores, labels, k) for k in (1, 2, 3, 10)] == [0.5, 0.5, 1.0, 1.0]
    # single positive at rank 3 of 3
    assert [recall_at_k([0.3, 0.9, 0.8], [1, 0, 0], k) for k in (1, 2, 3)] == [0.0, 0.0, 1.0]
    assert math.isnan(recall_at_k([0.3, 0.9], [0, 0], 1))


def test_recall_at_k_ties_are_pessimistic():
    # all-equal scores: the positive (listed first) is ranked after all 3 negatives
    assert [recall_at_k([0.5] * 4, [1, 0, 0, 0], k) for k in (1, 3, 4)] == [0.0, 0.0, 1.0]
    # the positive tied with one negative: rank 2
    assert [recall_at_k([0.9, 0.9, 0.1], [1, 0, 0], k) for k in (1, 2)] == [0.0, 1.0]
    # two positives tied with two negatives at the top: both after the negatives
    assert recall_at_k([0.7, 0.7, 0.7, 0.7, 0.1], [1, 1, 0, 0, 0], 2) == 0.0
    assert recall_at_k([0.7, 0.7, 0.7, 0.7, 0.1], [1, 1, 0, 0, 0], 3) == 0.5


def test_reranking_metrics_include_recall_averaged_over_queries_with_a_positive():
    # q1: pos at rank 1 (of 2 positives: other at rank 3); q2: pos at rank 2; q3: no positive (left out)
    m = reranking_metrics([[0.9, 0.8, 0.7], [0.1, 0.9], [0.5, 0.4]], [[1, 0, 1], [1, 0], [0, 0]])
    assert m["recall@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["recall@5"] == 1.0 and m["recall@10"] == 1.0
    assert m["queries"] == 2 and m["queries_without_positive"] == 1


def test_query_without_positive_is_left_out_and_counted():
    m = reranking_metrics([[0.9, 0.1], [0.2, 0.8]], [[1, 0], [0, 0]])
    assert m["map"] == 1.0 and m["mrr@10"] == 1.0 and m["queries"] == 1 and m["queries_without_positive"] == 1
    assert all(math.isnan(v) for k, v in reranking_metrics([[0.2, 0.8]], [[0, 0]]).items() if isinstance(v, float))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_ranking_metrics_of_non_finite_scores_are_nan(bad):
    # one query's NaN scores rank as if real (MAP 0.05 from a model that output NaN): no metric is defined
    m = reranking_metrics([[0.9, 0.1], [bad, 0.3, 0.2]], [[1, 0], [0, 1, 0]])
    assert all(math.isnan(m[k]) for k in ("map", "mrr@10", "ndcg@10", "recall@1", "recall@5", "recall@10")), m
    assert m["queries"] == 2 and m["queries_without_positive"] == 0


def test_sts_correlations():
    # ranks: similarity 1,2,3,4 vs gold 1,3,2,4 -> sum d^2 = 2 -> rho = 1 - 6*2 / (4*15) = 0.8
    r = sts_correlations(np.array([0.1, 0.35, 0.4, 0.8]), np.array([0, 2, 1, 5]), (0, 5))
    assert r["spearman"] == pytest.approx(0.8) and r["pearson"] == pytest.approx(np.corrcoef(
        [0.1, 0.35, 0.4, 0.8], [0, 0.4, 0.2, 1.0])[0, 1])
    assert math.isnan(sts_correlations(np.ones(3), np.array([0, 1, 2]), (0, 5))["spearman"])
    # constant up to float32 rounding (identical texts): no ranking to correlate, not a "correlation" of noise
    rounded = np.array([1.0, 1.0 - 6e-8, 1.0 + 1.2e-7, 1.0 - 1.2e-7])
    assert math.isnan(sts_correlations(rounded, np.array([0, 2, 1, 5]), (0, 5))["spearman"])


def test_ranking_agreement():
    assert ranking_agreement([[0.1, 0.5, 0.9]], [[0.2, 0.6, 0.7]])["kendall_tau_min"] == 1.0
    assert ranking_agreement([[0.1, 0.5, 0.9]], [[0.9, 0.5, 0.1]])["kendall_tau_min"] == -1.0


def test_kendall_tau_leaves_out_queries_where_it_is_undefined_and_counts_them():
    # all tied in both engines (was counted as 1.0 in the mean), all tied in one, one passage: no tau, as the task's
    # own measure over all items has none for tied outputs
    tied, disagree = [0.5, 0.5, 0.5], ([0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    stats = ranking_agreement([tied, tied, [0.4], disagree[0]], [tied, [0.1, 0.2, 0.3], [0.4], disagree[1]])
    assert stats == {"kendall_tau_mean": -1.0, "kendall_tau_min": -1.0, "queries_without_kendall_tau": 3}
    stats = ranking_agreement([tied], [tied])
    assert math.isnan(stats["kendall_tau_mean"]) and stats["queries_without_kendall_tau"] == 1


def test_gate_passes_small_drops_and_names_each_failure():
    artifact = {"spearman": 0.80, "pearson": 0.70}
    assert gate(artifact, {"spearman": -0.005, "pearson": 0.01}, DEFAULT_MAX_DROP) == {}
    failures = gate(artifact, {"spearman": -0.02, "pearson": 0.0}, DEFAULT_MAX_DROP)
    assert list(failures) == ["spearman"] and "0.0200 below torch" in failures["spearman"]
    # counts are not metrics
    assert gate({**artifact, "queries": 3}, {"spearman": 0.0, "pearson": 0.0}, 0.01) == {}


@pytest.mark.parametrize("artifact, delta, failed", [
    ({"spearman": 0.8, "pearson": 0.7}, {"spearman": float("nan"), "pearson": 0.0}, "spearman"),  # torch NaN
    ({"spearman": float("nan"), "pearson": 0.7}, {"spearman": float("nan"), "pearson": 0.0}, "spearman"),
    ({"spearman": 0.8, "pearson": float("inf")}, {"spearman": 0.0, "pearson": float("inf")}, "pearson"),
    ({"spearman": 0.8, "pearson": 0.7}, {"spearman": 0.0}, "pearson"),  # the delta cannot be computed
    ({"spearman": float("nan"), "pearson": 0.7}, None, "spearman"),  # artifact alone: its metrics still count
])
def test_gate_fails_on_non_finite_metrics_and_deltas(artifact, delta, failed):
    failures = gate(artifact, delta, DEFAULT_MAX_DROP)
    assert list(failures) == [failed]


def test_non_finite_outputs_fail_either_run():
    runs = {"torch": {"nonfinite": 3}, "artifact": {"nonfinite": 0}}
    assert output_failures(runs) == {"torch outputs": "3 non-finite values"}
    assert output_failures({"artifact": {"nonfinite": 4}}) == {"artifact outputs": "4 non-finite values"}


def test_a_ranking_drop_says_on_how_many_queries():
    torch_scores = [[0.9, 0.1, 0.2]] * 30  # the positive first on every query
    artifact_scores = [[0.1, 0.9, 0.2]] + torch_scores[1:]  # one query's positive falls to third
    labels = [[1, 0, 0]] * 30
    lower = queries_lower(per_query_metrics(torch_scores, labels), per_query_metrics(artifact_scores, labels))
    assert lower["mrr@10"] == (1, 30) and lower["recall@5"] == (0, 30)
    delta = {"mrr@10": -1 / 45, "recall@5": 0.0}
    failures = gate({"mrr@10": 1 - 1 / 45, "recall@5": 1.0}, delta, DEFAULT_MAX_DROP, lower=lower)
    assert failures == {"mrr@10": "0.0222 below torch on 1 of 30 queries (max drop 0.01); with 30 queries the "
                                  "metrics move in steps of up to 1/30 = 0.0333, over max drop 0.01: one query ranked "
                                  "otherwise fails it; use more queries (a larger --limit) or a larger --max-drop"}
    # a query without a positive is not one the mean covers
    lower = queries_lower(per_query_metrics(torch_scores[:2], [[1, 0, 0], [0, 0, 0]]),
                          per_query_metrics(artifact_scores[:2], [[1, 0, 0], [0, 0, 0]]))
    assert lower["map"] == (1, 1)


def test_gate_names_the_run_it_judges():
    assert gate({"spearman": float("nan")}, None, 0.01, "torch") == {"spearman": "torch value is nan"}


def test_json_holds_null_for_non_finite_numbers(tmp_path):
    out = tmp_path / "r.json"
    write_json(out, {"a": float("nan"), "b": [1.5, float("-inf")], "c": {"d": (float("inf"), 2)}, "e": "nan"})
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": {"d": [None, 2]}, "e": "nan"}


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows, limit, message, fix", [
    ([{"sentence1": "a", "sentence2": "b", "score": 1.0}], None, "need at least 2 pairs, got 1", "--limit"),
    ([{"sentence1": "a", "sentence2": "b", "score": 1.0}, {"sentence1": "c", "sentence2": "d", "score": 4.0}], 1,
     "need at least 2 pairs, got 1", "--limit"),
    ([{"sentence1": "a", "sentence2": "b", "score": 3.0}, {"sentence1": "c", "sentence2": "d", "score": 3.0}], None,
     "all 2 pairs have the gold score 3", "--limit"),
    ([{"query_id": "1", "query": "q", "negative_passages": [{"text": "n"}]}], None,
     "none of the 1 queries has a positive passage", "--limit"),
    # every cosine is 1 up to float rounding: ranked, the rounding gave "correlations" of 0.35 and 0.05
    ([{"sentence1": "a", "sentence2": "a", "score": 1.0}, {"sentence1": "c", "sentence2": "c", "score": 4.0}], None,
     "in all 2 pairs sentence2 is sentence1, so every similarity is 1", "put each pair's second text in sentence2"),
])
def test_data_that_cannot_define_the_metrics_is_refused_before_any_model_runs(tmp_path, monkeypatch, rows, limit,
                                                                              message, fix):
    monkeypatch.setattr(eval_run, "model_class", lambda task: pytest.fail("a model was loaded"))
    options = EvalOptions(task="embedding", dataset=_rows(tmp_path / "data.jsonl", rows), run="torch",
                          checkpoint="unused", limit=limit)
    with pytest.raises(ToolkitError, match=message) as e:
        eval_run.evaluate(options)
    assert fix in str(e.value)


def test_queries_without_a_negative_passage_are_warned_about(tmp_path, monkeypatch):
    """Every ranking metric is 1 on a query with no negative passage, whatever the model scores."""
    class Loading(Exception):
        """Where the first model would load: the data's checks are done."""

    def model_class(task):
        raise Loading

    monkeypatch.setattr(eval_run, "model_class", model_class)
    positive = [{"text": "p"}]
    rows = [{"query_id": "1", "query": "q", "positive_passages": positive},
            {"query_id": "2", "query": "r", "positive_passages": positive, "negative_passages": [{"text": "n"}]},
            {"query_id": "3", "query": "s", "positive_passages": positive, "negative_passages": []}]
    options = EvalOptions(task="reranker", dataset=_rows(tmp_path / "ms.jsonl", rows), run="torch", checkpoint="c")
    with pytest.warns(UserWarning, match=r"^msmarco: 2 of the 3 queries have no negative passage: every ranking "
                                         "metric is 1 on them"), pytest.raises(Loading):
        eval_run.evaluate(options)


def test_a_query_in_two_rows_is_refused_naming_both_lines(tmp_path):
    row = {"query_id": 7, "query": "q", "positive_passages": [{"text": "p"}], "negative_passages": [{"text": "n"}]}
    path = _rows(tmp_path / "ms.jsonl", [row, {**row, "query_id": 8}, {**row, "query_id": "7"}])
    with pytest.raises(ToolkitError, match=r"ms.jsonl:3: query_id '7' repeats line 1; give each query one row"):
        load_dataset(path)


def test_a_gzip_compressed_file_says_to_gunzip_it(tmp_path):
    import gzip

    path = tmp_path / "sts12_test.jsonl"
    path.write_bytes(gzip.compress(json.dumps({"sentence1": "a", "sentence2": "b", "score": 3.0}).encode()))
    with pytest.raises(ToolkitError, match=r"sts12_test.jsonl is gzip-compressed: gunzip it first"):
        load_dataset(str(path))


@pytest.mark.parametrize("bad, message", [
    ({"limit": 0}, "limit must be a positive"), ({"limit": -3}, "limit must be a positive"),
    ({"limit": True}, "limit must be a positive"), ({"limit": 2.5}, "limit must be a positive"),
    ({"max_drop": -0.1}, "max_drop must be a finite number >= 0"), ({"max_drop": float("nan")}, "max_drop"),
    ({"max_drop": float("inf")}, "max_drop"), ({"instances": 0}, "instances must be an integer >= 1"),
    ({"run": "engine"}, "run must be one of both, torch, artifact"), ({"task": "nope"}, "task must be one of"),
    ({"artifact": None}, "--artifact DIR is required"), ({"instruction": 3}, "instruction must be a text"),
    ({"instruction": " \t"}, "is only whitespace: give one with words"), ({"data_format": "sts"}, "format must be"),
    ({"artifact": None, "run": "torch"}, "needs --checkpoint"),
])
def test_options_are_checked_up_front(bad, message):
    options = {"task": "embedding", "dataset": "sts12-sample", "artifact": "somewhere", **bad}
    with pytest.raises(ToolkitError, match=message):
        EvalOptions(**options).check()
    assert EvalOptions(task="embedding", dataset="x", run="torch", checkpoint="c", limit=1).check().sides == (
        "torch",)


STS_ROWS = [{"sentence1": "a", "sentence2": "b", "score": 0.5}, {"sentence1": "c", "sentence2": "d", "score": 3.2}]


def test_format_stated_instead_of_told_by_the_file_name(tmp_path):
    path = _rows(tmp_path / "bq_paraphrases.jsonl", STS_ROWS)  # STS scores in a file whose name says BQ
    with pytest.raises(ToolkitError, match=r"bq_paraphrases.jsonl:2: score 3.2 is outside bq's gold range 0..1; "
                                           r"pass --format sts12 for a file of such scores$"):
        load_dataset(path)
    name, spec, rows = load_dataset(path, data_format="sts12")
    assert name == "sts12" and spec.score_range == (0.0, 5.0) and [r.score for r in rows] == [0.5, 3.2]
    assert resolve_dataset(path, data_format="bq")[0] == "bq"  # stated: nothing read to tell it


@pytest.mark.parametrize("rows, data_format, message", [
    (STS_ROWS, "msmarco", r"data.jsonl:1: the row has sts12 / bq fields \(sentence1, sentence2, score\), none of "
                          r"msmarco's .*, and the file is read as msmarco: pass --format sts12 or bq if it is"),
    ([{"query_id": "1", "query": "q", "positive_passages": [{"text": "t"}]}], "sts12",
     r"data.jsonl:1: the row has msmarco fields \(query_id, query, positive_passages\), none of sts12's "
     r"\(sentence1, sentence2, score\), and the file is read as sts12: pass --format msmarco"),
    (STS_ROWS[:1] + [{"query_id": "1", "query": "q", "positive_passages": [{"text": "t"}]}], None,
     r"data.jsonl:2: the row has msmarco fields"),  # told by the first row: a later one of another format
])
def test_rows_of_another_format_name_the_row_and_the_fix(tmp_path, rows, data_format, message):
    with pytest.raises(ToolkitError, match=message):
        load_dataset(_rows(tmp_path / "data.jsonl", rows), data_format=data_format)


def test_format_of_a_dataset_name_must_be_its_own():
    with pytest.raises(ToolkitError, match="sts12-sample is sts12 data, not bq: --format states the format of a JSONL"):
        resolve_dataset("sts12-sample", data_format="bq")
    assert resolve_dataset("sts12-sample", data_format="sts12")[0] == "sts12"
    with pytest.raises(ToolkitError, match="format must be one of sts12, bq, msmarco, got 'sts'"):
        resolve_dataset("sts12-sample", data_format="sts")


def test_limit_is_checked_by_the_loader_too():
    for limit in (0, -3):
        with pytest.raises(ToolkitError, match="limit must be a positive"):
            load_dataset("sts12-sample", limit)
    assert len(load_dataset("sts12-sample", 2)[2]) == 2


def test_instructions_follow_qwens_harness():
    # Qwen3-Embedding's evaluation/task_prompts.json: no trailing period for STS / pair tasks
    assert SIMILARITY_INSTRUCTION == "Retrieve semantically similar text"
    assert DATASETS["sts12"].instruction == DATASETS["bq"].instruction == SIMILARITY_INSTRUCTION
    assert DATASETS["msmarco"].instruction == WEB_SEARCH_INSTRUCTION


def test_msmarco_passages_are_title_plus_text_stripped(tmp_path):
    path = tmp_path / "ms.jsonl"
    row = {"query_id": 1, "query": "q",
           "positive_passages": [{"docid": "1", "title": "", "text": "  padded text \n"}],
           "negative_passages": [{"docid": "2", "title": "Title", "text": " body "}, {"docid": "3", "text": "\tx"}]}
    path.write_text(json.dumps(row) + "\n")
    (example,) = load_dataset(str(path))[2]
    # exactly MTEB's (title + " " + text).strip(): only the ends are stripped
    assert example.passages == ["padded text", "Title  body", "x"] and example.labels == [1, 0, 0]
    assert example.query_id == "1"
    _, _, sample = load_dataset("msmarco-sample")
    assert all(p == p.strip() for e in sample for p in e.passages)
    assert sample[0].passages[0].endswith("Weegy: TRUE. [")  # the file has a trailing space


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "sts12_latin1.jsonl"
    good = json.dumps({"sentence1": "a", "sentence2": "b", "score": 3.0}).encode()
    latin1 = '{"sentence1": "caf\u00e9", "sentence2": "b", "score": 1}'.encode("latin-1")
    path.write_bytes(good + b"\n" + latin1 + b"\n")
    with pytest.raises(ToolkitError, match=r"sts12_latin1.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_dataset(str(path))
    path.write_bytes(b"\xff\xfe" + good + b"\n")  # e.g. UTF-16 byte order mark
    with pytest.raises(ToolkitError, match=r"sts12_latin1.jsonl:1: not UTF-8"):
        load_dataset(str(path))
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # a UTF-8 byte order mark is fine
    assert load_dataset(str(path))[2][0].sentence1 == "a"


def test_bundled_samples_load():
    for name, kind in (("sts12-sample", "pairs"), ("bq-sample", "pairs"), ("msmarco-sample", "reranking")):
        got_name, spec, rows = load_dataset(name)
        assert spec.kind == kind and len(rows) >= 8 and got_name == name.removesuffix("-sample")
    _, _, ms = load_dataset("msmarco-sample")
    assert ms[0].labels[0] == 1 and len(ms[0].passages) == 20


@pytest.mark.parametrize("row, message", [
    ({"sentence1": "a", "sentence2": "b"}, ":2: field 'score' is missing"),
    ({"sentence1": "", "sentence2": "b", "score": 1}, ":2: field 'sentence1' must be a non-empty text, got an empty"),
    ({"sentence1": "a", "sentence2": "b", "score": 7}, ":2: score 7 is outside sts12's gold range 0..5$"),
    ({"sentence1": "a", "sentence2": "b", "score": "3"}, ":2: field 'score' must be a number, got the text '3'"),
    ({"sentence1": "a", "sentence2": "b", "score": None}, ":2: field 'score' must be a number, got null"),
    ({"sentence1": 5, "sentence2": "b", "score": 1}, ":2: field 'sentence1' must be a non-empty text, got the number"),
    (None, ":2: expected a JSON object .*, got null"),
    ([1, 2], ":2: expected a JSON object .*, got a list"),
])
def test_malformed_pair_rows_name_the_line_in_words(tmp_path, row, message):
    path = tmp_path / "sts12_bad.jsonl"
    path.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": 3.0}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ToolkitError, match=message) as e:
        load_dataset(str(path))
    assert not any(word in str(e.value) for word in ("<class", "NoneType", "'int'", " str,", " list,")), str(e.value)


def test_malformed_msmarco_and_json_rows_name_the_line(tmp_path):
    path = tmp_path / "ms.jsonl"
    good = {"query_id": "1", "query": "q", "positive_passages": [{"docid": "1", "title": "", "text": "t"}],
            "negative_passages": []}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "positive_passages": [{"docid": "2"}]}) + "\n")
    with pytest.raises(ToolkitError, match=r"ms.jsonl:2 positive_passages\[0\]: field 'text' is missing"):
        load_dataset(str(path))
    for bad, message in [({"query_id": 1.5}, "field 'query_id' must be a text or an integer, got the number 1.5"),
                         ({"query_id": None}, "field 'query_id' must be a text or an integer, got null"),
                         ({"positive_passages": {"text": "t"}}, "field 'positive_passages' must be a list, got an "
                                                                "object"),
                         ({"positive_passages": [{"text": "t", "title": 3}]}, "field 'title' must be a text, got the "
                                                                             "number 3")]:
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
        with pytest.raises(ToolkitError, match=message):
            load_dataset(str(path))
    path.write_text(json.dumps(good) + "\n{broken\n")
    with pytest.raises(ToolkitError, match=r"ms.jsonl:2: not valid JSON"):
        load_dataset(str(path))


def test_unknown_and_offline_datasets_say_what_to_do():
    with pytest.raises(ToolkitError, match="unknown dataset"):
        load_dataset("nope")
    with pytest.raises(ToolkitError, match="HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set.*sts12_test.jsonl"):
        load_dataset("sts12")  # HF_HUB_OFFLINE=1 in conftest


def test_dataset_meant_as_a_path_that_is_no_file_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "folder").mkdir()
    cases = {"bad/nonexist.jsonl": "no such file: bad/nonexist.jsonl;",
             "nonexist.jsonl": "no such file: nonexist.jsonl;",
             str(tmp_path / "missing"): f"no such file: {tmp_path / 'missing'};",
             "dangling.jsonl": f"no such file: dangling.jsonl (a symlink to {tmp_path / 'gone.jsonl'}, which does not",
             "dangling": f"no such file: dangling (a symlink to {tmp_path / 'gone'}, which does not",
             "folder": "not a regular file: folder;", str(tmp_path): f"not a regular file: {tmp_path};"}
    if os.path.exists(os.devnull):
        cases[os.devnull] = f"not a regular file: {os.devnull};"
    for name, message in cases.items():
        with pytest.raises(ToolkitError) as e:
            resolve_dataset(name)
        assert message in str(e.value) and "give the path of a JSONL file" in str(e.value), str(e.value)
        assert "unknown dataset" not in str(e.value) and "'msmarco-sample'" in str(e.value)


@pytest.mark.parametrize("holds, expected", [
    (["sts12.jsonl", "notes.txt", "sub/"], "it holds notes.txt, sts12.jsonl, sub/"),
    ([], "it is empty"),
    (None, "it does not exist"),
    ([f"f{i:02}.jsonl" for i in range(12)], "f09.jsonl and 2 more"),
])
def test_data_dir_without_the_file_says_what_it_holds_and_never_goes_to_the_hub(tmp_path, monkeypatch, holds,
                                                                                  expected):
    monkeypatch.setattr(eval_datasets, "hub_rows", lambda name: pytest.fail("went to the hub"))
    data_dir = tmp_path / "data"
    if holds is not None:
        data_dir.mkdir()
        for name in holds:
            if name.endswith("/"):
                (data_dir / name).mkdir()
            else:
                (data_dir / name).write_text("{}\n")
    with pytest.raises(ToolkitError, match=f"data directory {data_dir} has no sts12_test.jsonl.*{expected}.*"
                                           r"toolkit data download --out"):
        load_dataset("sts12", data_dir=data_dir)


HUB_ROWS = {  # one row per dataset, as the hub has them (with a field `download` leaves out)
    "sts12": [{"sentence1": "a", "sentence2": "b", "score": 4.0, "lang": "en"}],
    "bq": [{"sentence1": "c", "sentence2": "d", "score": 1}],
    "msmarco": [{"query_id": "7", "query": "q", "positive_passages": [{"docid": "1", "title": "", "text": "t"}],
                 "negative_passages": [{"docid": "2", "title": "T", "text": "u"}]}],
}


def test_download_writes_files_the_loader_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_datasets, "hub_rows", lambda name, fix=None: HUB_ROWS[name])
    written = download(tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(p.name for p in written)  # no .part left
    assert json.loads((tmp_path / "data" / "sts12_test.jsonl").read_text()) == {"sentence1": "a", "sentence2": "b",
                                                                                 "score": 4.0}
    (example,) = load_dataset("msmarco", data_dir=tmp_path / "data")[2]
    assert example.passages == ["t", "T u"] and example.labels == [1, 0]


def test_an_unreachable_hub_reads_the_cached_copy_at_once(monkeypatch):
    """datasets falls back to its cache only after its retries (~24 s); offline mode goes there directly."""
    from huggingface_hub import constants

    def cached_only(hub_id, split):  # what datasets does: the cache in offline mode, else a network error
        if not (datasets.config.HF_HUB_OFFLINE and constants.HF_HUB_OFFLINE):
            raise ConnectionError("no network")
        return HUB_ROWS["sts12"]

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # conftest's HF_HUB_OFFLINE=1 aside
    monkeypatch.setattr(eval_datasets, "_hub_unreachable", lambda endpoint: f"{endpoint} is unreachable: refused")
    monkeypatch.setattr(datasets, "load_dataset", cached_only)
    assert eval_datasets.hub_rows("sts12") == HUB_ROWS["sts12"]
    assert not datasets.config.HF_HUB_OFFLINE  # the offline mode was for that load alone


def test_an_unloadable_dataset_name_says_where_it_was_looked_for_and_what_to_pass(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ToolkitError) as e:
        load_dataset("sts12")
    message = str(e.value)
    assert f"datasets' cache {datasets.config.HF_DATASETS_CACHE} holds no copy" in message
    assert "`toolkit eval --data-dir DIR`, from DIR/sts12_test.jsonl" in message
    assert "path/to/sts12_test.jsonl, which `toolkit data download --out DIR` writes" in message
    assert "docs/data-sources.md" in message and "'sts12-sample'" in message
    assert "shared data folder" not in message  # a folder only the developers' machines have


def test_failed_download_leaves_no_file(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ToolkitError, match="cannot load mteb/sts12-sts from the hub") as e:
        download(tmp_path)
    assert list(tmp_path.iterdir()) == []
    # what to do from within `data download` (not the loader's advice to run it)
    assert f"run it where the hub is reachable (HF_HUB_OFFLINE unset) and copy sts12_test.jsonl from its --out " \
           f"folder to {tmp_path}" in str(e.value), str(e.value)
    assert "run `toolkit data download" not in str(e.value) and "'sts12-sample'" in str(e.value)
    with pytest.raises(ToolkitError, match="has no sts12_test.jsonl"):  # not "no rows": no partial file is left
        resolve_dataset("sts12", tmp_path)

    old = tmp_path / "sts12_test.jsonl"  # an earlier download survives a failed one
    old.write_text(json.dumps(HUB_ROWS["bq"][0]) + "\n")
    with pytest.raises(ToolkitError, match="cannot load"):
        download(tmp_path)
    assert list(tmp_path.iterdir()) == [old] and json.loads(old.read_text())["sentence1"] == "c"


def test_hub_row_missing_a_field_names_it_and_leaves_no_file(tmp_path, monkeypatch):
    rows = {**HUB_ROWS, "sts12": [HUB_ROWS["sts12"][0], {"sentence1": "a", "sentence2": "b", "gold": 3}]}
    monkeypatch.setattr(eval_datasets, "hub_rows", lambda name, fix=None: rows[name])
    with pytest.raises(ToolkitError, match="mteb/sts12-sts row 2 has no field 'score'"):
        download(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tables_align_wide_characters_by_the_cells_they_take():
    """The demo's Chinese sentences take two terminal cells a character: columns padded by len() went out of line."""
    rows = [["今天天气很好", 0.5, 0.25], ["the weather is nice today", 1.0, 0.5]]
    for table in (format_table(["text", "cosine", "p"], rows),
                  format_columns(["text", "cosine", "p"], [None, ".6f", ".4f"], rows)):
        widths = {display_width(line) for line in table.splitlines()}
        assert len(widths) == 1, table
    assert display_width("今天a") == 5 and display_width("é") == 1
