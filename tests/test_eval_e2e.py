"""`toolkit eval` end to end on the tiny synthetic artifacts, all three datasets (bundled samples)."""
import json

import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.eval.run import evaluate


@pytest.mark.parametrize("task, dataset", [("embedding", "sts12-sample"), ("embedding", "bq-sample"),
                                           ("embedding", "msmarco-sample"), ("reranker", "msmarco-sample")])
def test_eval_torch_vs_artifact_parity(onnx_artifacts, task, dataset):
    result = evaluate(task, dataset, onnx_artifacts[task][0].parent, limit=20 if "msmarco" not in dataset else 3)
    assert set(result["runs"]) == {"torch", "artifact"} and result["passed"]
    p = result["parity"]
    assert p["nonfinite_torch"] == 0 and p["nonfinite_artifact"] == 0
    if task == "embedding":
        assert p["cosine_min"] >= 0.999
    else:
        assert p["score_abs_diff_max"] <= 1e-2
    if "msmarco" in dataset:
        assert p["kendall_tau_min"] > 0.9
        assert set(result["runs"]["torch"]["metrics"]) >= {"map", "mrr@10", "ndcg@10"}
    else:
        assert set(result["delta"]) == {"spearman", "pearson"}
        assert all(abs(d) < 1e-3 for d in result["delta"].values())


def test_eval_cli_prints_table_writes_json_and_rejects_bad_combinations(onnx_artifacts, tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--limit", "10",
                                  "--artifact", str(onnx_artifacts["embedding"][1]), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "spearman" in r.output and "cosine_min" in r.output and "artifact vs torch: OK" in r.output
    assert json.loads(out.read_text())["examples"] == 10
    bad = CliRunner().invoke(main, ["eval", "--task", "reranker", "--dataset", "sts12-sample",
                                    "--artifact", str(onnx_artifacts["reranker"][1])])
    assert bad.exit_code == 2 and "sentence-pair dataset" in bad.output


def test_demo_and_perf_cli(onnx_artifacts, tmp_path):
    r = CliRunner().invoke(main, ["demo", "--task", "reranker", "--artifact", str(onnx_artifacts["reranker"][1])])
    assert r.exit_code == 0, r.output
    assert "torch P(yes)" in r.output and "OK" in r.output
    r = CliRunner().invoke(main, ["demo", "--task", "embedding", "--artifact", str(onnx_artifacts["embedding"][1])])
    assert r.exit_code == 0 and "cos(torch, artifact)" in r.output
    out = tmp_path / "perf.json"
    for queue in ("0", "8"):
        r = CliRunner().invoke(main, ["perf", "run", "--artifact", str(onnx_artifacts["embedding"][0]),
                                      "--percentiles", "50,90,99", "--iterations", "20", "--instance", "2",
                                      "--queue-size", queue, "--json", str(out)])
        assert r.exit_code == 0, r.output
        assert "latency p99 (ms)" in r.output and "sequences/s" in r.output
        result = json.loads(out.read_text())
        assert result["mode"] == ("latency" if queue == "0" else "throughput") and result["latency_ms"]["p50"] > 0
    r = CliRunner().invoke(main, ["perf", "run", "--artifact", str(onnx_artifacts["embedding"][0]), "--batch-size", "4"])
    assert r.exit_code == 2 and "compiled for batch 2" in r.output
