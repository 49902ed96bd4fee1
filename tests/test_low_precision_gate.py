"""The low-precision gate and what feeds it: its real-text sample, margin and rank floor, the calibration file's checks,
GPTQ's scratch weights of a killed build, and the messages around them."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from toolkit.config import BuildConfig, load_build_config
from toolkit.errors import ToolkitError
from toolkit.quantize import DEFAULT_CALIBRATION, CalibrationSet
from toolkit.tasks import TASKS

RERANKER = TASKS["reranker"]


def agreement(max_abs_diff: float, tau: float | None, items: int = 75) -> dict:
    return {"items": items, "nonfinite": 0, "max_abs_diff": max_abs_diff, "mean_abs_diff": max_abs_diff / 4,
            "kendall_tau": tau}


def test_the_reranker_gate_fails_a_ranking_below_its_floor_within_the_error_tolerance():
    # the naive int8 build (no smoothing, rounded to nearest) measured tau 0.68 within |dP| 0.019; its junk-calibrated
    # twin -0.26: both were installed
    for tau in (0.68, -0.26):
        judged = RERANKER.judge(agreement(0.019, tau), "int8")
        assert not judged["passed"] and "kendall_tau >= 0.8" in judged["tolerance"]
    assert RERANKER.judge(agreement(0.019, 0.87), "int8")["passed"]  # the good builds' lowest
    assert not RERANKER.judge(agreement(0.001, 0.85), "bf16")["passed"]  # bf16's floor is 0.9 (measured 0.995-1.0)
    # too few items for tau to mean anything (3 edge cases: one swap moves it by 0.67): not gated on it
    assert RERANKER.judge(agreement(0.001, -1 / 3, items=3), "fp16")["passed"]
    assert RERANKER.judge(agreement(0.001, None), "int8")["passed"]
    assert TASKS["embedding"].judge({"items": 75, "nonfinite": 0, "min_cosine": 0.995}, "int8")["passed"]


def test_eval_parity_applies_the_same_rank_floor():
    import numpy as np

    from toolkit.eval.run import parity

    def run(items):
        return {"items": items, "per_query": None, "nonfinite": 0}

    reference = np.linspace(0.5, 0.51, 40)
    backwards = parity(RERANKER, run(reference), run(reference[::-1].copy()), "int8")  # within 0.02 everywhere
    assert backwards["max_abs_diff"] <= 0.02 and backwards["kendall_tau"] < 0 and not backwards["passed"]
    assert parity(RERANKER, run(reference), run(reference + 0.001), "int8")["passed"]


def test_the_gate_on_real_texts_keeps_a_margin_for_its_sample():
    from toolkit.validation import sample_budget

    # the naive build's 0.0190 on the gate passed the bare 0.02, and 200 MS MARCO pairs then gave 0.0221
    budget = sample_budget(75)
    assert budget == pytest.approx(1 - 75 ** -0.5)
    judged = RERANKER.judge(agreement(0.019, 0.95), "int8", budget)
    assert not judged["passed"]
    assert judged["tolerance"].startswith("max_abs_diff <= 0.01769: the int8 tolerance 0.02 less 12%")
    assert RERANKER.judge(agreement(0.015, 0.95), "int8", budget)["passed"]
    cosine = TASKS["embedding"].judge({"items": 100, "nonfinite": 0, "min_cosine": 0.9905}, "int8", sample_budget(100))
    assert not cosine["passed"] and cosine["tolerance"].startswith("min_cosine >= 0.991")


def test_the_bundled_held_out_texts_are_a_sample_of_real_reranking():
    bundled = CalibrationSet.load()
    # MS MARCO queries with their positive and negative passages, beside the sentence pairs: what a reranker ranks
    assert len(bundled.holdout) >= 72 and not set(bundled.holdout) & set(bundled.calibration)
    queries = {q for q, _ in bundled.holdout}
    assert any(sum(q == other for other, _ in bundled.holdout) >= 6 for q in queries)


def write_jsonl(path: Path, rows: list, encoding: str = "utf-8") -> Path:
    path.write_bytes("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode(encoding))
    return path


def test_a_calibration_file_refuses_fields_that_are_not_text_and_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "nulls.jsonl", [
        {"query": "a", "document": "b", "split": "calibration"},
        {"query": None, "document": 123, "split": "holdout"}])
    with pytest.raises(ToolkitError, match=r"nulls.jsonl:2: `query` must be a string, got null"):
        CalibrationSet.load(path)


def test_a_calibration_file_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    path = write_jsonl(tmp_path / "latin1.jsonl", ['{"query": "café", "document": "b", "split": "calibration"}'],
                       encoding="latin-1")
    with pytest.raises(ToolkitError, match=r"latin1.jsonl is not UTF-8 \(byte 14: b'\\xe9'\); save it as UTF-8"):
        CalibrationSet.load(path)


def test_held_out_records_calibration_saw_are_refused(tmp_path):
    same = {"query": "what is a dog", "document": "A dog is a domesticated canine."}
    path = write_jsonl(tmp_path / "leak.jsonl", [{**same, "split": "calibration"},
                                                  {"query": "x", "document": "y", "split": "holdout"},
                                                  {**same, "split": "holdout"}])
    with pytest.raises(ToolkitError, match=r"leak.jsonl:3: this holdout record is also the calibration record of "
                                           r"line 1 \(1 such in all\): the gate checks texts calibration never saw"):
        CalibrationSet.load(path)


def test_a_users_calibration_file_is_gated_on_the_bundled_held_out_texts_too(tmp_path):
    bundled = CalibrationSet.load()
    seen = bundled.holdout[0]  # calibrating on a bundled held-out record: it is not held out for that build
    path = write_jsonl(tmp_path / "tiny.jsonl", [
        {"query": seen[0], "document": seen[1], "split": "calibration"},
        {"query": "how tall is the eiffel tower", "document": "It is 330 metres tall.", "split": "holdout"}])
    mine = CalibrationSet.load(path)
    assert mine.calibration == [seen] and mine.holdout[0] == ("how tall is the eiffel tower", "It is 330 metres tall.")
    assert mine.holdout[1:] == bundled.holdout[1:]  # a gate of 2 texts was built before
    assert mine.describe()["holdout_includes_bundled"] and not bundled.describe()["holdout_includes_bundled"]


def test_gptqs_weights_of_a_killed_build_are_removed_by_the_next_build(outlier_checkpoints, tmp_path, monkeypatch):
    """A SIGKILLed int8 build left `WORKSPACE/replaced-weights-*/` (GPTQ's rounded weights, no process in its name)
    for good: they now wait in a build directory of the set, named after the process."""
    import toolkit.quantize
    from toolkit.artifact_set import BUILD_DIR, remove_stale_staging
    from toolkit.compile import compile_config

    set_dir = tmp_path / "ws" / "t" / "onnx"
    seen = []
    real = toolkit.quantize.round_weights

    def round_weights(prefix, layer, hessians, divisors, weights, scratch):
        before = real(prefix, layer, hessians, divisors, weights, scratch)
        where = Path(weights.replacements.name)
        if not seen:  # what SIGKILL would leave now: the same directory under a process that is gone
            seen.append(where)
            dead = where.parent.with_name(where.parent.name.replace(f"-{os.getpid()}-", "-999999999-"))
            shutil.copytree(where.parent, dead)
        return before

    monkeypatch.setattr(toolkit.quantize, "round_weights", round_weights)
    cfg = BuildConfig(name="t", task="embedding", checkpoint=str(outlier_checkpoints["embedding"]), seq_lens=(32,),
                      batch=2, backends=("onnx",), dtype="int8", workspace=tmp_path / "ws", preflight=False)
    compile_config(cfg, log=lambda m: None)
    [where] = seen
    assert where.parent.parent == set_dir and BUILD_DIR.fullmatch(where.parent.name)
    assert where.name.startswith("replaced-weights-") and f"-{os.getpid()}-" in where.parent.name
    [left] = [p for p in set_dir.iterdir() if p.name.startswith(".")]  # the build's own went with it
    assert "-999999999-" in left.name and not list((tmp_path / "ws").glob("replaced-weights-*"))
    removed = []
    remove_stale_staging(set_dir, removed.append)  # the next build of the set
    assert not left.exists() and removed


def test_a_checkpoint_replaced_while_it_is_read_is_a_one_line_error(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from toolkit.checkpoint import CheckpointTensors

    checkpoint = shutil.copytree(checkpoints["embedding"], tmp_path / "ck")
    weights = CheckpointTensors(checkpoint, tie_word_embeddings=True)
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["embed_tokens.weight"]
    save_file(tensors, checkpoint / "model.safetensors")  # another checkpoint moved in mid-build
    with pytest.raises(ToolkitError, match=r"no longer holds tensor 'embed_tokens.weight' as it did when the build "
                                           r"started .*: the checkpoint changed while it was read"):
        weights.load(["embed_tokens.weight"])


def test_eval_says_when_a_metric_cannot_resolve_the_max_drop():
    from toolkit.eval.run import coarse_resolution, gate

    failures = gate({"recall@5": 0.5}, {"recall@5": -0.05}, 0.01, lower={"recall@5": (1, 20)})
    assert failures["recall@5"] == (
        "0.0500 below torch on 1 of 20 queries (max drop 0.01); with 20 queries the metrics move in steps of up to "
        "1/20 = 0.0500, over max drop 0.01: one query ranked otherwise fails it; use more queries (a larger --limit) "
        "or a larger --max-drop")
    assert coarse_resolution(200, 0.01) is None


def test_evals_parity_hint_points_at_the_bucket_nearest_its_limit():
    from toolkit.eval.run import nearest_limit

    def manifest(seq, diff):
        return SimpleNamespace(path=f"set/seq{seq}", dtype="int8",
                               validation={"max_abs_diff": diff} if diff is not None else {"passed": None})

    assert nearest_limit(RERANKER, [manifest(64, 0.005), manifest(128, 0.019)]).path == "set/seq128"
    assert nearest_limit(RERANKER, [manifest(64, None), manifest(128, None)]).path == "set/seq64"


def test_the_quantization_block_of_a_config(tmp_path):
    config = tmp_path / "c.yaml"
    base = ("task: reranker\nfrontend: {checkpoint: ck, seq: [64]}\nbackend:\n  kind: tvm\n  dtype: int8\n"
            "  quantization:")
    config.write_text(base + "\n")  # empty: null in YAML, as `quantization: {}`
    assert load_build_config(config).smooth_alpha == 0.5
    config.write_text(base + " {activation_scales: row}\n")
    assert "quantization.activation_scales in " in load_build_config(config).unused_quantization()
    assert "unused by a tvm build (it applies to onnx artifacts)" in load_build_config(config).unused_quantization()
    cfg = load_build_config(config).with_overrides(backends=("onnx", "tvm"))
    assert cfg.unused_quantization() is None


def test_a_missing_calibration_file_of_a_config_names_its_key(tmp_path):
    with pytest.raises(ToolkitError, match=r"nope.jsonl not found; fix quantization.calibration in c.yaml"):
        CalibrationSet.load(tmp_path / "nope.jsonl", "quantization.calibration in c.yaml")
    with pytest.raises(ToolkitError, match=r"not found; pass --calibration FILE"):
        CalibrationSet.load(tmp_path / "nope.jsonl")
    assert CalibrationSet.load(DEFAULT_CALIBRATION).path == DEFAULT_CALIBRATION


def test_a_reranker_seq_too_short_for_the_instruction_names_no_cache_instruction(checkpoints):
    from toolkit.checkpoint import load_tokenizer
    from toolkit.compile import instruction_to_cache

    cfg = BuildConfig(name="t", task="reranker", checkpoint=str(checkpoints["reranker"]), seq_lens=(64,))
    tokenizer = load_tokenizer(checkpoints["reranker"])
    with pytest.raises(ToolkitError, match=r"or --no-cache-instruction"):
        instruction_to_cache(cfg, RERANKER, tokenizer, RERANKER.fixed_instruction(None), print)


def test_a_failed_int8_gate_with_smoothing_off_names_it():
    from toolkit.compile import precision_fix
    from toolkit.quantize import QuantizationPlan

    errors = {f"layers.{i}.mlp.down_proj": 0.2 for i in range(8)}
    preflight = {"budget_used": 6.37, "rounds": 1}
    for plan in (QuantizationPlan(0.0, "nearest", 0.1, errors, [], {}, preflight),
                 QuantizationPlan(0.0, "nearest", 1.0, errors, [], {}, None)):
        assert "quantization.smooth_alpha is 0 in the build config" in precision_fix("int8", plan)
    assert "smooth_alpha" not in precision_fix("int8", QuantizationPlan(0.5, "gptq", 0.1, errors, [], {}, preflight))
