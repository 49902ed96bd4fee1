"""`toolkit eval` end to end on the tiny synthetic artifacts, all three datasets (bundled samples)."""
import itertools
import json
import re
import shutil
import socket

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from toolkit import demo
from toolkit.api import Embedder
from toolkit.artifact import Manifest
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.eval.cli import eval_cmd
from toolkit.eval.datasets import SAMPLE_FILES, load_dataset
from toolkit.eval.run import EvalOptions, eval_tables, evaluate
from toolkit.synth import write_synthetic_checkpoint
from toolkit.tasks import EMBEDDING, SIMILARITY_INSTRUCTION, TASKS, WEB_SEARCH_INSTRUCTION

from conftest import build, copy_artifact

RANKING_METRICS = {"map", "mrr@10", "ndcg@10", "recall@1", "recall@5", "recall@10"}


@pytest.mark.parametrize("task, dataset", [("embedding", "sts12-sample"), ("embedding", "bq-sample"),
                                           ("embedding", "msmarco-sample"), ("reranker", "msmarco-sample")])
def test_eval_torch_vs_artifact_parity(onnx_artifacts, task, dataset):
    options = EvalOptions(task=task, dataset=dataset, artifact=onnx_artifacts[task][0].parent,
                          limit=20 if "msmarco" not in dataset else 3)
    result = evaluate(options)
    assert set(result["runs"]) == {"torch", "artifact"} and result["passed"], result["failures"]
    p = result["parity"]
    assert p["nonfinite_torch"] == 0 and p["nonfinite_artifact"] == 0
    assert TASKS[task].within_tolerance(p, "fp16")  # the task's own agreement keys and fp16 tolerance
    if task == "embedding":
        assert p["min_cosine"] >= 0.999 and {"p1_cosine", "mean_cosine", "max_abs_diff"} <= set(p)
    else:
        assert p["max_abs_diff"] <= 1e-2 and "mean_abs_diff" in p
    if "msmarco" in dataset:
        assert p["kendall_tau_min"] > 0.9
        for run in ("torch", "artifact"):
            assert set(result["runs"][run]["metrics"]) >= RANKING_METRICS
        assert set(result["delta"]) == RANKING_METRICS
        assert result["instruction"] == WEB_SEARCH_INSTRUCTION
    else:
        assert set(result["delta"]) == {"spearman", "pearson"}
        assert all(abs(d) < 1e-3 for d in result["delta"].values())
        assert result["instruction"] == SIMILARITY_INSTRUCTION


def test_eval_cli_prints_table_writes_json_and_rejects_bad_combinations(onnx_artifacts, tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--limit", "10",
                                  "--artifact", str(onnx_artifacts["embedding"][1]), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "spearman" in r.output and "min_cosine" in r.output and "wall time" in r.output
    assert "artifact vs torch: OK" in r.output
    written = json.loads(out.read_text())
    assert written["examples"] == 10 and written["instruction"] == SIMILARITY_INSTRUCTION and written["passed"]
    bad = CliRunner().invoke(main, ["eval", "--task", "reranker", "--dataset", "sts12-sample",
                                    "--artifact", str(onnx_artifacts["reranker"][1])])
    assert bad.exit_code == 2 and "reranker task cannot use sts12" in bad.output
    assert "msmarco" in bad.output and "Traceback" not in bad.output
    wrong = CliRunner().invoke(main, ["eval", "--task", "reranker", "--dataset", "msmarco-sample",
                                      "--artifact", str(onnx_artifacts["embedding"][1])])
    assert wrong.exit_code == 2 and "holds embedding artifacts, not reranker ones: pass --task embedding" in \
        wrong.output


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "limit must be a positive number"),
    (["--limit", "-3"], "limit must be a positive number"),
    (["--max-drop", "-1"], "max_drop must be a finite number >= 0"),
    (["--max-drop", "nan"], "max_drop must be a finite number >= 0"),
    (["--instance", "0"], "instances must be an integer >= 1"),
    (["--run", "artifact"], "--artifact DIR is required"),
    (["--engine", "torch"], "No such option '--engine'; see `toolkit eval --help`"),
    (["--json", "-"], "Invalid value for '--json': '-' is not standard output here"),  # click's refusal: one line too
    (["--limit", "x"], "Invalid value for '--limit': 'x' is not a valid integer; see `toolkit eval --help`"),
])
def test_eval_cli_rejects_bad_options_with_one_line(args, message):
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", *args],
                           prog_name="toolkit")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    [line] = r.output.splitlines()  # not click's block of usage, "Try ... --help" and "Error:"
    assert line.startswith("error: "), r.output


@pytest.mark.parametrize("flag", ["--instances", "--instance"])  # --instances as every command; the old spelling too
def test_eval_cli_takes_instances(flag):
    args = ["--task", "embedding", "--dataset", "sts12-sample", "--run", "torch", flag, "2"]
    assert eval_cmd.make_context("eval", args).params["instances"] == 2


def test_data_that_cannot_define_a_metric_is_an_error_not_a_failed_artifact(onnx_artifacts):
    # one pair: Spearman and Pearson are undefined for any model; the data is at fault, not the artifact
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--limit", "1",
                                  "--artifact", str(onnx_artifacts["embedding"][1])])
    assert r.exit_code == 2 and "need at least 2 pairs, got 1" in r.output and "--limit" in r.output, r.output
    assert "artifact" not in r.output and "Traceback" not in r.output


def test_artifact_that_does_not_match_torch_fails_on_parity(onnx_artifacts, checkpoints, tmp_path):
    # other weights can score about as well on 20 pairs: only item-by-item agreement shows the mismatch
    other = write_synthetic_checkpoint(tmp_path / "other", "embedding", "tiny", seed=5)
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--limit", "20",
                                  "--artifact", str(onnx_artifacts["embedding"][1]), "--checkpoint", str(other)])
    assert r.exit_code == 1, r.output
    assert "artifact vs torch: FAIL (parity: min cosine" in r.output and "fp16 needs min_cosine >= 0.999" in r.output
    assert f"torch ran {other}, but the set was built from {checkpoints['embedding'].resolve()}" in r.output
    # the parity table's tolerance and verdict rows
    assert re.search(r"^tolerance +min_cosine >= 0\.999 *$", r.output, re.M), r.output
    assert re.search(r"^passed +False *$", r.output, re.M), r.output

    # the checkpoint the set was built from, re-saved with other weights (its path is the build's, its digest not)
    moved = copy_artifact(onnx_artifacts["embedding"][0], tmp_path / "moved")
    manifest = Manifest.load(moved)
    manifest.model = type(manifest.model)(**{**vars(manifest.model), "resolved": str(other)})
    manifest.save(moved, hash_files=False)
    result = evaluate(EvalOptions(task="embedding", dataset="sts12-sample", artifact=moved, limit=20))
    assert not result["passed"], result
    assert f"the weights at {other} changed since the set was built (their SHA-256" in result["failures"]["parity"]


def test_non_finite_torch_outputs_fail_and_json_holds_null(checkpoints, tmp_path):
    nan = shutil.copytree(checkpoints["embedding"], tmp_path / "nan")
    weights = next(nan.glob("*.safetensors"))
    tensors = safetensors.torch.load_file(weights)
    name = next(n for n in tensors if "layers.0" in n and n.endswith("weight") and tensors[n].ndim == 2)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    safetensors.torch.save_file(tensors, weights)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--limit", "5",
                                  "--run", "torch", "--checkpoint", str(nan), "--json", str(out)])
    assert r.exit_code == 1 and "torch: FAIL (torch outputs: " in r.output and "non-finite values" in r.output
    written = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert written["runs"]["torch"]["metrics"]["spearman"] is None and not written["passed"]


def test_eval_json_has_the_same_keys_whatever_runs(onnx_artifacts, checkpoints, tmp_path):
    artifact = str(onnx_artifacts["embedding"][1].parent)
    written = {}
    for run in ("both", "torch", "artifact"):
        out = tmp_path / f"{run}.json"
        r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--limit", "5",
                                      "--run", run, "--artifact", artifact, "--json", str(out)])
        assert r.exit_code == 0, r.output
        written[run] = json.loads(out.read_text())
    assert set(written["torch"]) == set(written["artifact"]) == set(written["both"]), written
    assert written["torch"]["artifact"] is None and written["torch"]["checkpoint"] == str(checkpoints["embedding"])
    assert written["artifact"]["checkpoint"] is None and written["artifact"]["artifact"] == artifact
    assert written["torch"]["delta"] is written["torch"]["parity"] is None and written["both"]["parity"]
    # each run's record too: both engines' keys, null for the one that did not run
    assert written["torch"]["runs"]["artifact"] is None and written["torch"]["runs"]["torch"]["metrics"]
    assert written["artifact"]["runs"]["torch"] is None and written["artifact"]["runs"]["artifact"]["metrics"]


def test_eval_cli_states_the_format_of_a_file(checkpoints, tmp_path):
    path = tmp_path / "bq_paraphrases.jsonl"  # STS12 rows, in a file whose name says BQ
    shutil.copy(SAMPLE_FILES["sts12-sample"][1], path)
    args = ["eval", "--task", "embedding", "--dataset", str(path), "--limit", "5", "--run", "torch",
            "--checkpoint", str(checkpoints["embedding"])]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "outside bq's gold range 0..1; pass --format sts12" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--format", "sts12"])
    assert r.exit_code == 0 and "embedding on sts12 (5 examples" in r.output, r.output


def test_a_metric_drop_says_on_how_many_queries_and_tied_rankings_have_no_kendall_tau(onnx_artifacts, monkeypatch):
    """A mean that drops on one query of eight says so; a query whose passages both engines tie is left out of the
    Kendall tau (was counted as 1.0)."""
    def rank_passages(self, model, queries, passages, instruction):
        # the passages in file order (positives first), but the artifact puts query 0's last; query 1's are all tied
        scores = [-np.arange(len(ps), dtype=np.float64) for ps in passages]
        scores[1][:] = 0.0
        if model.manifests:
            scores[0] = scores[0][::-1].copy()
        return np.eye(4)[[0] * len(queries)], scores

    monkeypatch.setattr(type(EMBEDDING), "rank_passages", rank_passages)
    result = evaluate(EvalOptions(task="embedding", dataset="msmarco-sample",
                                  artifact=onnx_artifacts["embedding"][1].parent))
    assert result["failures"]["mrr@10"].startswith(f"{-result['delta']['mrr@10']:.4f} below torch on 1 of 8 queries")
    assert result["parity"]["queries_without_kendall_tau"] == 1 and result["parity"]["kendall_tau_mean"] < 1.0
    assert "1 queries without a Kendall tau (one passage, or all of them tied in an engine) left out of its mean" \
        in eval_tables(result)


@pytest.fixture
def embedded_texts(monkeypatch):
    """Every text the Embedder embeds (after query formatting), in order."""
    seen = []
    format_texts = Embedder._format  # what format and every encode method run

    def formatted(self, method, texts, instruction):
        seen.extend(result := format_texts(self, method, texts, instruction))
        return result

    monkeypatch.setattr(Embedder, "_format", formatted)
    return seen


def test_sts_instruction_and_override(checkpoints, embedded_texts, tmp_path):
    ckpt = str(checkpoints["embedding"])
    result = evaluate(EvalOptions(task="embedding", dataset="sts12-sample", run="torch", checkpoint=ckpt, limit=3))
    assert result["instruction"] == SIMILARITY_INSTRUCTION and result["passed"]
    prefix = "Instruct: Retrieve semantically similar text\nQuery:"  # no period before the newline
    assert embedded_texts and all(t.startswith(prefix) for t in embedded_texts)

    embedded_texts.clear()
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--limit", "3",
                                  "--run", "torch", "--checkpoint", ckpt, "--instruction", "", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["instruction"] == "" and "instruction ''" in r.output
    _, _, rows = load_dataset("sts12-sample", 3)
    assert sorted(embedded_texts) == sorted({t for e in rows for t in (e.sentence1, e.sentence2)})  # bare texts

    embedded_texts.clear()
    result = evaluate(EvalOptions(task="embedding", dataset="sts12-sample", run="torch", checkpoint=ckpt, limit=3,
                                  instruction="Find paraphrases"))
    assert result["instruction"] == "Find paraphrases"
    assert all(t.startswith("Instruct: Find paraphrases\nQuery:") for t in embedded_texts)


def test_embedding_on_msmarco_queries_get_the_instruction_passages_stay_bare(checkpoints, embedded_texts):
    result = evaluate(EvalOptions(task="embedding", dataset="msmarco-sample", run="torch",
                                  checkpoint=str(checkpoints["embedding"]), limit=2))
    assert set(result["runs"]["torch"]["metrics"]) >= RANKING_METRICS
    _, _, rows = load_dataset("msmarco-sample", 2)
    queries = [f"Instruct: {WEB_SEARCH_INSTRUCTION}\nQuery:{e.query}" for e in rows]
    assert embedded_texts == queries + [p for e in rows for p in e.passages]


def test_unreachable_hub_fails_fast_naming_the_local_options(tmp_path, monkeypatch):
    """datasets' own retries took ~24 s to give up on a hub that does not answer: one probe finds it unreachable, and
    datasets is then asked only for its cache (offline mode), which holds no copy."""
    import datasets
    import huggingface_hub.constants

    real_load, offline_at_load = datasets.load_dataset, []

    def load_dataset(*args, **kwargs):
        offline_at_load.append(datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE)
        if not offline_at_load[-1]:
            pytest.fail("datasets was asked to reach the hub, where its retries take ~24 s to give up")
        return real_load(*args, cache_dir=str(tmp_path / "cache"), **kwargs)  # an empty cache

    # a port bound but never listening refuses connections: the hub unreachable, without touching the network
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # conftest's HF_HUB_OFFLINE, undone here
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12", "--run", "torch",
                                      "--checkpoint", "unused"])
    assert offline_at_load == [True]
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert f"{endpoint} is unreachable" in r.output and "sts12_test.jsonl" in r.output
    assert "holds no copy of it" in r.output and "toolkit data download" in r.output


def test_eval_cli_data_dir_without_the_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "sts12.jsonl").write_text("{}\n")
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12", "--run", "torch",
                                  "--checkpoint", "unused", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert f"{tmp_path} has no sts12_test.jsonl" in r.output and "it holds sts12.jsonl" in r.output


@pytest.fixture
def no_eval_run(monkeypatch):
    """`evaluate` fails the test if called: the options must be refused before any model runs."""
    monkeypatch.setattr("toolkit.eval.run.evaluate", lambda *a, **k: pytest.fail("the eval ran"))


@pytest.mark.parametrize("path, message", [
    ("/proc/x.json", "cannot write /proc/x.json: No such file or directory; name a file in a writable directory"),
    ("", "the file name is empty; name a file to write to, or leave the option out"),
])
def test_eval_cli_json_path_that_cannot_be_written_is_refused_before_the_run(no_eval_run, path, message):
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--run", "torch",
                                  "--json", path])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_eval_cli_json_probe_leaves_no_file_and_keeps_an_existing_one(no_eval_run, tmp_path):
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    for path in (tmp_path / "new.json", kept):
        params = eval_cmd.make_context("eval", ["--task", "embedding", "--dataset", "x", "--json", str(path)]).params
        assert params["json_out"] == str(path)
    assert not (tmp_path / "new.json").exists() and kept.read_text() == "old"


def test_eval_cli_json_write_that_fails_late_names_the_path(monkeypatch):
    monkeypatch.setattr("toolkit.eval.run.evaluate", lambda options: {"passed": True})
    monkeypatch.setattr("toolkit.eval.run.eval_tables", lambda result: "table")
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--run", "torch",
                                  "--checkpoint", "unused", "--json", "/dev/full"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "cannot write the result to /dev/full: No space left on device" in r.output, r.output


def test_evaluate_takes_options_only():
    with pytest.raises(ToolkitError, match="evaluate takes an EvalOptions"):
        evaluate("embedding")


def test_eval_cli_refuses_a_whitespace_instruction_before_the_run(no_eval_run):
    r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "sts12-sample", "--run", "torch",
                                  "--checkpoint", "unused", "--instruction", "  "])
    assert r.exit_code == 2 and "the instruction '  ' is only whitespace: give one with words" in r.output, r.output


def test_demo_off_tolerance_names_the_checkpoint_as_eval_does(onnx_artifacts, checkpoints, tmp_path):
    other = write_synthetic_checkpoint(tmp_path / "other", "embedding", "tiny", seed=5)
    hint = f"torch ran {other}, but the set was built from {checkpoints['embedding'].resolve()}: pass --checkpoint"
    args = ["--task", "embedding", "--artifact", str(onnx_artifacts["embedding"][1]), "--checkpoint", str(other)]
    r = CliRunner().invoke(main, ["demo", *args])
    assert r.exit_code == 1 and "FAIL" in r.output and hint in r.output, r.output
    r = CliRunner().invoke(main, ["eval", "--dataset", "sts12-sample", "--limit", "5", *args])
    assert r.exit_code == 1 and hint in r.output, r.output


def test_a_set_for_query_instructions_is_refused_by_the_demo_and_on_passages_naming_the_commands(
        checkpoints, tmp_path, monkeypatch):
    [artifact] = build(checkpoints, tmp_path, "embedding", seq_lens=(32,), instruction="Find paraphrases")
    monkeypatch.setattr(demo, "model_class", lambda task: pytest.fail("a model was loaded"))
    monkeypatch.setattr("toolkit.eval.run.model_class", lambda task: pytest.fail("a model was loaded"))
    fix = (", use a set compiled without --instruction (`toolkit compile CONFIG` without it); this set runs "
           "`toolkit eval --dataset sts12|bq|sts12-sample|bq-sample --instruction 'Find paraphrases'`")
    r = CliRunner().invoke(main, ["demo", "--task", "embedding", "--artifact", str(artifact.parent)])
    assert r.exit_code == 2 and f"{artifact.parent} was compiled with --instruction 'Find paraphrases'" in r.output
    assert f"the demo also has texts without it: for the demo{fix}" in r.output, r.output
    assert "encode_queries" not in r.output
    for instruction in ([], ["--instruction", "Find paraphrases"]):  # the data's fault, whatever the instruction
        r = CliRunner().invoke(main, ["eval", "--task", "embedding", "--dataset", "msmarco-sample",
                                      "--artifact", str(artifact.parent), *instruction])
        assert r.exit_code == 2 and f"msmarco also has texts without it: for msmarco{fix}" in r.output, r.output
    # with --run torch the set only names its checkpoint: nothing to refuse
    monkeypatch.setattr("toolkit.eval.run.model_class", lambda task: type(task.name, (), {"from_checkpoint": stop}))
    with pytest.raises(TorchLoaded):
        evaluate(EvalOptions(task="embedding", dataset="msmarco-sample", artifact=str(artifact.parent), run="torch"))


class TorchLoaded(Exception):
    """What a test's stand-in for the torch model raises once evaluation has gone past its checks."""


def stop(*args, **kwargs):
    raise TorchLoaded


def demo_table_cells(output: str, *columns: str) -> dict[str, list[str]]:
    """The numbers in the last cells of the first table's rows, by column (the demo's number columns are its last)."""
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.rstrip().endswith(columns[-1]))
    rows = list(itertools.takewhile(lambda line: line.strip(), lines[header + 2:]))
    return {c: [row.split()[-len(columns) + k] for row in rows] for k, c in enumerate(columns)}


def test_demo_cli(onnx_artifacts):
    r = CliRunner().invoke(main, ["demo", "--task", "reranker", "--artifact", str(onnx_artifacts["reranker"][1])])
    assert r.exit_code == 0, r.output
    assert "torch P(yes)" in r.output and "OK" in r.output
    scores = demo_table_cells(r.output, "torch P(yes)", "artifact P(yes)", "|diff|")
    assert all(re.fullmatch(r"[01]\.\d{4}", c) for c in scores["artifact P(yes)"]), scores  # one format down a column
    assert all(re.fullmatch(r"\d\.\d\de[+-]\d\d", c) for c in scores["|diff|"]), scores
    r = CliRunner().invoke(main, ["demo", "--task", "embedding", "--artifact", str(onnx_artifacts["embedding"][1])])
    assert r.exit_code == 0 and "cos(torch, artifact)" in r.output
    [cosines] = demo_table_cells(r.output, "cos(torch, artifact)").values()
    assert all(re.fullmatch(r"[01]\.\d{6}", c) for c in cosines), cosines  # was `1.000` beside `1.0000`
    # the other task's set: named as such (its cached instruction was named instead, with eval commands for it)
    r = CliRunner().invoke(main, ["demo", "--task", "embedding", "--artifact", str(onnx_artifacts["reranker"][1])])
    assert r.exit_code == 2 and r.output.strip().endswith(
        "holds reranker artifacts, not embedding ones: pass --task reranker, or a set of embedding artifacts"), r.output


def test_demo_exits_1_when_parity_is_off_tolerance(onnx_artifacts, tmp_path):
    """The artifact against torch on other weights (a checkpoint of another seed): FAIL, exit 1."""
    other = write_synthetic_checkpoint(tmp_path / "other", "embedding", "tiny", seed=5)
    r = CliRunner().invoke(main, ["demo", "--task", "embedding", "--artifact", str(onnx_artifacts["embedding"][1]),
                                  "--checkpoint", str(other)])
    assert r.exit_code == 1, r.output
    assert re.search(r"^min cosine .*\(tolerance min_cosine >= 0\.999\): FAIL$", r.output, re.M), r.output


def test_demo_finds_the_quickstart_of_either_backend(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "QUICKSTART_ARTIFACTS", tmp_path)
    with pytest.raises(ToolkitError, match=r"quickstart-embedding/\{onnx,tvm\}: run `make quickstart`"):
        demo.default_artifact(TASKS["embedding"])
    (tmp_path / "quickstart-embedding" / "tvm").mkdir(parents=True)  # `make quickstart BACKEND=tvm`
    assert demo.default_artifact(TASKS["embedding"]) == tmp_path / "quickstart-embedding" / "tvm"
    (tmp_path / "quickstart-embedding" / "onnx").mkdir()
    assert demo.default_artifact(TASKS["embedding"]) == tmp_path / "quickstart-embedding" / "onnx"
