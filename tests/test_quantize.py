"""int8 artifacts and what they stand on: a folded fp32 export stock tools can quantize, checkpoints with realistic
outliers, and an accuracy gate that fails a naive quantization of them."""
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from toolkit.api import Embedder
from toolkit.artifact import Manifest
from toolkit.checkpoint import load_hf_model
from toolkit.config import BuildConfig
from toolkit.errors import ToolkitError
from toolkit.quantize import DEFAULT_CALIBRATION, CalibrationSet, int8_scheme
from toolkit.synth import MASSIVE_CHANNELS, MASSIVE_TOKENS, MASSIVE_VALUE, OUTLIER_CHANNELS
from toolkit.tasks import TASKS, WEB_SEARCH_INSTRUCTION

from conftest import build, held_out_texts, model_path


def linear_count(checkpoint) -> int:
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    return 4 * layers  # qkv, o, gate_up, down


def test_stock_quantize_dynamic_quantizes_every_linear_layer_of_an_fp32_artifact(checkpoints, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    [artifact] = build(checkpoints, tmp_path, "embedding", seq_lens=(32,), dtype="fp32")
    graph = onnx.load(str(artifact / "model.onnx")).graph
    weights = {init.name for init in graph.initializer}
    linears = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(linears) == linear_count(checkpoints["embedding"])
    assert all(n.name.startswith("layers.") for n in linears)  # named by module, for tools that select layers

    quantize_dynamic(str(artifact / "model.onnx"), str(tmp_path / "int8.onnx"), per_channel=True)
    quantized = onnx.load(str(tmp_path / "int8.onnx")).graph
    float_weights = {i.name for i in quantized.initializer
                     if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    assert not [n.name for n in quantized.node if n.op_type == "MatMul" and n.input[1] in float_weights]
    assert sum(n.op_type == "MatMulInteger" for n in quantized.node) >= len(linears)


def test_synth_outliers_puts_massive_activations_and_outlier_channels_where_documented(outlier_checkpoints,
                                                                                       checkpoints):
    model = load_hf_model(outlier_checkpoints["embedding"], TASKS["embedding"])
    plain = load_hf_model(checkpoints["embedding"], TASKS["embedding"])
    ids = torch.tensor([[9707, MASSIVE_TOKENS[0], 1879, MASSIVE_TOKENS[1], 151643]])
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
        plain_out = plain(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    for h in states[:-1]:  # the residual stream before the final norm, every layer
        assert h[0, 1, list(MASSIVE_CHANNELS)].abs().min() >= 0.9 * MASSIVE_VALUE
        assert h[0, 0].abs().max() < 20  # ordinary tokens stay ordinary
    norm = model.base_model.layers[0].input_layernorm.weight.detach().float()
    others = np.delete(norm.abs().numpy(), OUTLIER_CHANNELS)
    assert norm.abs()[list(OUTLIER_CHANNELS)].min() > 20 * others.max()
    assert plain_out.abs().max() < 100  # the plain checkpoint has none of it


def test_int8_gate_fails_naive_quantization_of_an_outlier_checkpoint_and_passes_the_default(outlier_checkpoints,
                                                                                           tmp_path):
    with pytest.raises(ToolkitError, match=r"validation failed .* int8 tolerance \(min_cosine >= 0\.99\d+: the "
                                           r"int8 tolerance 0\.99 less \d+% of its error budget, a margin for a "
                                           r"sample of \d+ items\); nothing was installed \(.*\)\. Turn "
                                           r"quantization.preflight on .* or build --dtype bf16"):
        build(outlier_checkpoints, tmp_path, "embedding", seq_lens=(64,), dtype="int8", smooth_alpha=0.0,
              weight_rounding="nearest", max_linear_error=1.0, preflight=False)  # per-tensor onto 60x channels
    assert list(tmp_path.iterdir()) == []  # nothing installed, nor the set's directories the failed build made

    [artifact] = build(outlier_checkpoints, tmp_path, "embedding", seq_lens=(64,), dtype="int8")
    manifest = Manifest.load(artifact)
    assert manifest.dtype == "int8" and manifest.validation["passed"]
    assert manifest.validation["min_cosine"] >= 0.99
    assert manifest.validation["real_texts"] == held_out_texts("embedding")
    from toolkit.validation import revalidate  # `toolkit validate` checks what the build checked, held-out texts too

    again = revalidate(artifact)
    assert again["real_texts"] == manifest.validation["real_texts"] and again["passed"]
    assert again["min_cosine"] == pytest.approx(manifest.validation["min_cosine"], abs=1e-6)
    assert Manifest.load(artifact).validation == again
    recorded = Manifest.load(artifact)  # the calibration file changed since the build, then gone: each is said
    recorded.precision["quantization"]["calibration"]["sha256"] = "0" * 64
    recorded.save(artifact, hash_files=False)
    with pytest.warns(UserWarning, match="changed since the build"):
        revalidate(artifact)
    recorded.precision["quantization"]["calibration"]["file"] = str(tmp_path / "gone.jsonl")
    recorded.save(artifact, hash_files=False)
    with pytest.warns(UserWarning, match="gone.jsonl, is not here: the held-out texts checked are the bundled set's"):
        assert revalidate(artifact)["real_texts_file"] == str(CalibrationSet.load().path)
    quantization = manifest.precision["quantization"]
    assert quantization["smooth_alpha"] == 0.5 and quantization["calibration"]["holdout_records"] > 0
    assert quantization["weight_rounding"] == "gptq"
    assert not list(tmp_path.glob("replaced-weights-*"))  # GPTQ's weights waited there until the export had them
    graph = onnx.load(str(artifact / "model.onnx")).graph
    quantized = sum(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for n in graph.node)
    assert quantized + len(quantization["keep_fp32"]) >= linear_count(outlier_checkpoints["embedding"])
    # built from the fp16-weight model, no fp32 copy: what int8 leaves (layers kept, embedding, norms) is fp16
    weight_types = {i.data_type for i in graph.initializer if len(i.dims) == 2}
    stored = onnx.TensorProto.UINT8 if int8_scheme(["onnx"]).unsigned_weights else onnx.TensorProto.INT8
    assert weight_types == {stored, onnx.TensorProto.FLOAT16}


def test_onnx_int8_row_scales_give_a_row_the_same_vector_whatever_it_is_batched_with(outlier_checkpoints, tmp_path):
    """ONNX Runtime's per-tensor activation scale (the default) moves a row's vector with its batch neighbours;
    `activation_scales: row` gives each row its own scale, as TVM's int8 does, and passes the same gate."""
    first, quiet, loud = "What is the capital of China?", "a short one", "ALL CAPS 9999 !!!! ### %%%% ~~~~"
    vectors = {}
    for scales in ("tensor", "row"):
        [artifact] = build(outlier_checkpoints, tmp_path / scales, "embedding", seq_lens=(32,), dtype="int8",
                           activation_scales=scales)
        manifest = Manifest.load(artifact)
        assert manifest.validation["passed"] and manifest.validation["min_cosine"] >= 0.99
        ops = {n.op_type for n in onnx.load(str(model_path(artifact)), load_external_data=False).graph.node}
        assert ("DynamicQuantizeLinear" in ops) == (scales == "tensor") and "MatMulInteger" in ops
        assert f"per-{'token' if scales == 'row' else 'tensor'} scale" in manifest.precision["quantization"]["scheme"]
        with Embedder.from_artifacts(artifact) as model:  # batch 2: each pair runs as one batch
            vectors[scales] = [model.encode_documents([first, other])[0] for other in (quiet, loud)]
    assert np.abs(vectors["tensor"][0] - vectors["tensor"][1]).max() > 1e-4
    # within float rounding: each batch is padded to its own longest row (`dynamic_seq`), so the GEMMs' shapes differ
    assert np.abs(vectors["row"][0] - vectors["row"][1]).max() <= 1e-6


def test_int8_falls_back_to_fp32_layers_when_smoothing_is_off(outlier_checkpoints, tmp_path):
    [artifact] = build(outlier_checkpoints, tmp_path, "embedding", seq_lens=(64,), dtype="int8", smooth_alpha=0.0)
    manifest = Manifest.load(artifact)
    kept = manifest.precision["quantization"]["keep_fp32"]
    assert kept  # measured too lossy → kept fp32 (compute): a MatMul of its fp16 weight, as in an fp16 artifact
    assert manifest.validation["passed"]
    graph = onnx.load(str(artifact / "model.onnx")).graph
    fp16 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert {f"{name}.weight" for name in kept} <= fp16
    assert {n.name for n in graph.node if n.op_type == "MatMulInteger"}.isdisjoint(f"{name}_quant" for name in kept)


def test_int8_reranker_on_outliers_reports_kendall_tau(outlier_checkpoints, tmp_path):
    [artifact] = build(outlier_checkpoints, tmp_path, "reranker", seq_lens=(128,), dtype="int8")
    validation = Manifest.load(artifact).validation
    assert validation["passed"] and validation["max_abs_diff"] <= 0.02
    assert validation["kendall_tau"] is not None and validation["kendall_tau"] > 0.5
    # its shape arithmetic folded before quantizing: ONNX Runtime has no CPU kernel to fold CastLike (a warning on
    # every load)
    ops = {n.op_type for n in onnx.load(str(model_path(artifact)), load_external_data=False).graph.node}
    assert "CastLike" not in ops and "MatMulInteger" in ops


def test_gptq_rounds_onto_the_grid_the_backends_recompute_and_moves_the_output_less_than_rounding_to_nearest():
    from toolkit.quantize import TVM_INT8, gptq_round

    generator = torch.Generator().manual_seed(0)
    # correlated input channels, two of them 30x the rest (what smoothing leaves of outliers): where GPTQ gains
    mixing = torch.randn(256, 256, generator=generator) / 16 + torch.eye(256)
    inputs = torch.randn(2048, 256, generator=generator) @ mixing
    inputs[:, [5, 37]] *= 30
    weight = torch.randn(192, 256, generator=generator) * 0.02
    rounded = gptq_round(weight, inputs.T @ inputs)
    # every row keeps its largest weight at the grid's end, so rounding again (as every backend does, from the
    # stored fp16 values) gives these values back
    stored = rounded.half().float()
    assert torch.allclose(TVM_INT8.weight(stored), stored, rtol=1e-3, atol=0)
    exact = inputs @ weight.T
    gptq_error = (inputs @ rounded.T - exact).norm()
    nearest_error = (inputs @ TVM_INT8.weight(weight).T - exact).norm()
    assert gptq_error < 0.7 * nearest_error


def test_inputs_x_t_x_derived_through_smoothing_equals_the_one_measured_on_the_smoothed_layer(outlier_checkpoints):
    """Calibration takes GPTQ's X^T X in the same pass as the smoothing statistics, before smoothing: what `smooth`
    returns must turn it into the smoothed layer's own: exactly for q/k/v, whose input is the stored norm weight
    times what it was; the later linears' inputs also move with the fp16 rounding of the weights before them."""
    from toolkit.checkpoint import load_tokenizer
    from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
    from toolkit.quantize import TVM_INT8, _LinearProbe, _Rows, smooth

    checkpoint, task = outlier_checkpoints["reranker"], TASKS["reranker"]
    model = Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, torch.float16, stream=True)
    rows = _Rows(model, CalibrationSet.load().rows(task, load_tokenizer(checkpoint), "calibration", 256)[:16])
    states, layer, measured = [x for x, *_ in rows.inputs], model.layers[0], {}
    with model.resident("layers.0."):
        before, after = _LinearProbe(TVM_INT8), _LinearProbe(TVM_INT8)
        with before.watching("layers.0.", layer, measure_error=False, hessians=True):
            rows.through(layer, states)
        divisors = smooth("layers.0.", layer, before.absmax, 0.5, model.weights)
        with after.watching("layers.0.", layer, measure_error=False, hessians=True):
            rows.through(layer, states)
    for name, hessian in after.hessians.items():
        divisor = divisors.get(name, torch.ones(len(hessian)))
        derived = before.hessians[name] / divisor[:, None] / divisor[None, :]
        measured[name.split(".")[-1]] = float((derived - hessian).norm() / hessian.norm())
    assert measured["qkv_proj"] < 1e-5, measured  # the stored norm weights' ratio was returned, not s
    assert max(measured.values()) < 1e-2, measured


def test_gptq_says_when_the_calibration_rows_are_too_few_for_it(outlier_checkpoints, tmp_path):
    from toolkit.checkpoint import load_tokenizer
    from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
    from toolkit.quantize import TVM_INT8, plan_int8

    checkpoint, task = outlier_checkpoints["embedding"], TASKS["embedding"]
    records = [json.loads(line) for line in DEFAULT_CALIBRATION.read_text().splitlines()]
    few = tmp_path / "few.jsonl"  # 2 short rows: fewer tokens than the tiny model's 128 MLP channels
    few.write_text("".join(json.dumps(r) + "\n" for r in records if r["split"] == "holdout")
                   + json.dumps(dict(records[0], query="a cat", document="a dog", split="calibration")) + "\n")
    for calibration, warned in ((CalibrationSet.load(few), True), (CalibrationSet.load(), False)):
        lines = []
        model = Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, torch.float16, stream=True)
        plan_int8(model, task, load_tokenizer(checkpoint), calibration, 64, TVM_INT8, 0.5, 0.1, preflight=False,
                  scratch=tmp_path, log=lines.append)
        assert any("input channels of the widest linear layer" in line and "--calibration" in line
                   for line in lines) == warned, lines


def test_gptq_calibration_counts_the_weights_rounding_in_layer_errors_and_preflight(outlier_checkpoints, tmp_path):
    """GPTQ replaces the weights while calibrating: the per-layer errors and the preflight must still be measured
    against the weights as they came, so the weights' rounding counts (here the only error: activations stay exact)."""
    from dataclasses import dataclass

    from toolkit.checkpoint import load_tokenizer
    from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
    from toolkit.quantize import Int8Scheme, plan_int8

    @dataclass(frozen=True)
    class WeightsOnly(Int8Scheme):
        def activation(self, x):
            return x

    checkpoint, task = outlier_checkpoints["embedding"], TASKS["embedding"]
    model = Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, torch.float16, stream=True)
    plan = plan_int8(model, task, load_tokenizer(checkpoint), CalibrationSet.load(), 64, WeightsOnly(per_token=True),
                     0.5, 1.0, scratch=tmp_path, log=lambda line: None)
    assert min(plan.linear_errors.values()) > 1e-3, plan.linear_errors
    assert plan.preflight["agreement"]["min_cosine"] < 0.99999, plan.preflight


def test_int8_config_errors_name_the_fix(checkpoints, tmp_path):
    cfg = BuildConfig(name="x", task="embedding", checkpoint=str(checkpoints["embedding"]), seq_lens=(64,),
                      dtype="int8", backends=("tvm",), target="cuda", workspace=tmp_path)
    with pytest.raises(ToolkitError, match="use --target cpu, or --backend onnx for CUDA"):
        cfg.check()
    with pytest.raises(ToolkitError, match=r"quantization.activation_scales must be one of \('tensor', 'row'\), got "
                                           "'column'"):
        cfg.with_overrides(target="cpu", activation_scales="column")
    with pytest.raises(ToolkitError, match=r"quantization.weight_rounding must be one of \('gptq', 'nearest'\), got "
                                           "'stochastic'"):
        cfg.with_overrides(target="cpu", weight_rounding="stochastic")
    bad = tmp_path / "calibration.jsonl"
    bad.write_text('{"query": "q", "document": "d", "split": "calibration"}\n{"text": "no query"}\n')
    with pytest.raises(ToolkitError, match=r"calibration.jsonl:2: expected a JSON object with `query`"):
        CalibrationSet.load(bad)
    with pytest.raises(ToolkitError, match="needs both `calibration` and `holdout`"):
        bad.write_text('{"query": "q", "document": "d", "split": "calibration"}\n')
        CalibrationSet.load(bad)
    with pytest.raises(ToolkitError, match="not found"):
        CalibrationSet.load(tmp_path / "missing.jsonl")
    assert DEFAULT_CALIBRATION.is_file()


def test_calibration_runs_the_rows_layer_by_layer_to_the_outputs_the_whole_model_gives(checkpoints, tokenizers):
    # calibration takes every batch through one decoder layer before the next (each weight rounded once per pass),
    # reading only that layer of a streamed model
    from contextlib import nullcontext

    from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
    from toolkit.quantize import CALIBRATION_BATCH, _Rows
    from toolkit.text import left_pad
    from toolkit.tokenizer import ENDOFTEXT_ID

    task = TASKS["reranker"]
    streamed = Qwen3ForDeployment.from_pretrained(checkpoints["reranker"], task.output_name, torch.float16, stream=True)
    model = Qwen3ForDeployment.from_pretrained(checkpoints["reranker"], task.output_name, torch.float16)
    rows = CalibrationSet.load().rows(task, tokenizers["reranker"], "calibration", 128)
    visited = []

    def visit(prefix, layer, states):  # the layer run is resident; the others hold no weights
        resident = [name for name, p in streamed.named_parameters() if not isinstance(p, FakeTensor)]
        visited.append(prefix)
        assert resident and all(name.startswith(prefix) for name in resident)
        return nullcontext()
    layered = _Rows(streamed, rows).run("test", visit)
    assert visited == [f"layers.{i}." for i in range(len(model.layers))]
    assert all(isinstance(p, FakeTensor) for p in streamed.parameters())
    ordered, whole = sorted(rows, key=len), []
    with torch.no_grad():
        for start in range(0, len(ordered), CALIBRATION_BATCH):
            chunk = ordered[start:start + CALIBRATION_BATCH]
            ids, mask = left_pad(chunk, max(map(len, chunk)), ENDOFTEXT_ID)
            whole.append(model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
    np.testing.assert_array_equal(layered, np.concatenate(whole))


def test_a_streamed_model_calibrates_and_exports_what_the_whole_model_does(outlier_checkpoints, tmp_path):
    # compile streams the model (one layer read at a time, weights written as the export saves them): the smoothing it
    # folds in and the files it writes must be those of the whole model in memory
    from toolkit.checkpoint import load_tokenizer
    from toolkit.export import export_onnx
    from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
    from toolkit.quantize import TVM_INT8, plan_int8

    task, checkpoint = TASKS["embedding"], outlier_checkpoints["embedding"]
    plans, files = [], []
    for stream in (False, True):
        model = Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, torch.float16, stream=stream)
        plans.append(plan_int8(model, task, load_tokenizer(checkpoint), CalibrationSet.load(), 64, TVM_INT8,
                               smooth_alpha=0.5, max_linear_error=0.02, log=lambda line: None))
        export_onnx(model, task, tmp_path / f"{stream}.onnx", 64, 2)
        files.append((tmp_path / f"{stream}.onnx.data").read_bytes())
    assert plans[0] == plans[1]
    assert files[0] == files[1]
    export_onnx(Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, torch.float16, stream=True), task,
                tmp_path / "unsmoothed.onnx", 64, 2)
    assert (tmp_path / "unsmoothed.onnx.data").read_bytes() != files[0]  # the smoothing is in what was written


@pytest.mark.parametrize("budget_used, rounds", [([0.9, 0.85], 1), ([0.9, 0.6], 2)])
def test_preflight_keeps_the_last_plan_that_cut_the_error_and_stops_at_the_first_that_did_not(
        outlier_checkpoints, monkeypatch, budget_used, rounds):
    # the end-to-end error each round reports is scripted, so the rounds' decisions are known; the model, the
    # calibration rows and the decoder layers ranked by the error they add are real
    from toolkit.checkpoint import load_tokenizer
    from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
    from toolkit.quantize import TVM_INT8, plan_int8
    from toolkit.validation import validation_rows

    task, checkpoint = TASKS["embedding"], outlier_checkpoints["embedding"]
    model = Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, torch.float32)
    reported = iter(budget_used)
    monkeypatch.setattr(task, "tolerance_used", lambda agreement, dtype: next(reported))
    log = []
    tokenizer = load_tokenizer(checkpoint)
    plan = plan_int8(model, task, tokenizer, CalibrationSet.load(), 64, TVM_INT8, smooth_alpha=0.5,
                     max_linear_error=1.0, log=log.append)
    assert plan.preflight["rounds"] == rounds and plan.preflight["budget_used"] == budget_used[rounds - 1]
    # max_linear_error 1.0 keeps nothing on its own: the second round kept every linear layer of the decoder layer
    # adding the most error to the residual stream; a third would have left nothing in int8, so it never ran
    worst_layer = next(iter(plan.preflight["worst_layer_errors"]))
    assert len(plan.preflight["worst_layer_errors"]) == 2  # the tiny model's decoder layers, both measured
    assert plan.keep_fp32 == ([] if rounds == 1 else
                              sorted((n for n in plan.linear_errors if n.startswith(worst_layer + ".")),
                                     key=lambda n: -plan.linear_errors[n]))
    assert next(reported, None) is None  # every scripted round was run: none after the stop
    stopped = any("did not help" in line for line in log)
    assert stopped == (budget_used[-1] > 0.9 * budget_used[-2])
    # the rounds checked the calibration rows and the gate's edge cases (a row of the largest SEQ among them)
    calibration_rows = CalibrationSet.load().rows(task, tokenizer, "calibration", 64)
    assert plan.preflight["agreement"]["items"] == len(calibration_rows) + len(validation_rows(task, tokenizer, 64))


@pytest.mark.parametrize("budget_used, rounding", [([0.4], "gptq"), ([1.2, 1.25, 0.4], "nearest"),
                                                  ([1.2, 1.25, 1.3, 1.35], "gptq")])
def test_an_int8_plan_over_the_gates_budget_is_calibrated_again_with_the_other_rounding(
        outlier_checkpoints, monkeypatch, budget_used, rounding):
    # scripted end-to-end errors, as above: GPTQ's two rounds first (the second not helping), then round-to-nearest's;
    # the better plan is kept with the model it was calibrated on (the other one's smoothing and rounding differ)
    from toolkit.checkpoint import load_tokenizer
    from toolkit.compile import calibrate_int8
    from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment

    task, checkpoint = TASKS["reranker"], outlier_checkpoints["reranker"]
    cfg = BuildConfig(name="t", task="reranker", checkpoint=str(checkpoint), seq_lens=(64,), backends=("tvm",),
                      dtype="int8")
    first = Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, torch.float16, stream=True)
    reported = iter(budget_used)
    monkeypatch.setattr(task, "tolerance_used", lambda agreement, dtype: next(reported))
    log = []
    model, plan = calibrate_int8(cfg, task, load_tokenizer(checkpoint), CalibrationSet.load(), WEB_SEARCH_INSTRUCTION,
                                 checkpoint, first, log.append)
    assert next(reported, None) is None  # both calibrations ran their rounds, or only the first when it fit
    assert plan.weight_rounding == rounding and (model is first) == (rounding == "gptq")
    assert plan.preflight["budget_used"] == (min(budget_used[0], budget_used[2]) if len(budget_used) > 1 else 0.4)
    assert any("calibrating again with nearest" in line for line in log) == (budget_used[0] > 1)


def test_a_layers_token_error_is_relative_per_real_token_and_ignores_padding(outlier_checkpoints):
    from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
    from toolkit.quantize import _Rows

    task, checkpoint = TASKS["embedding"], outlier_checkpoints["embedding"]
    model = Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, torch.float32)
    # one batch, shortest first, left-padded to 7 (11 and 13 are delimiters: a massive residual in the outlier model)
    rows = _Rows(model, [[11] * 7, [11, 12, 13], [13, 11, 12, 13, 14]])
    exact = rows.through(model.layers[0], [x for x, *_ in rows.inputs])
    garbage = [e.clone() for e in exact]
    garbage[0][0, :4] += 1e3  # the 3-token row's padding
    garbage[0][1, :2] -= 1e3  # the 5-token row's padding
    assert rows.token_error(garbage, exact) == 0.0
    # one real token of 15 off by 10% of its own norm; the others exact: 0.1 / 15 whatever their norms
    nudged = [e.clone() for e in exact]
    nudged[0][2, 3] += 0.1 * exact[0][2, 3].norm() / exact[0][2, 3].numel() ** 0.5
    assert rows.token_error(nudged, exact) == pytest.approx(0.1 / 15, rel=1e-5)


def test_onnx_int8_stores_uint8_weights_where_onnx_runtime_would_saturate_and_warns_on_a_full_range_int8_one(
        outlier_checkpoints, tmp_path, monkeypatch):
    # x86 without VNNI sums u8*s8 pairs in int16 (vpmaddubsw): the build picks the weight storage for its own host
    from toolkit.backends import load_backend

    monkeypatch.setattr("toolkit.host.int8_full_range_exact", lambda: False)
    [artifact] = build(outlier_checkpoints, tmp_path / "uint8", "embedding", seq_lens=(64,), dtype="int8")
    manifest = Manifest.load(artifact)
    quantization = manifest.precision["quantization"]
    assert (quantization["weight_type"], quantization["weight_max"]) == ("uint8", 127)
    assert manifest.validation["passed"]
    graph = onnx.load(str(artifact / "model.onnx")).graph
    values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert matmuls and all(values[n.input[1]].dtype == np.uint8 and (values[n.input[3]] == 128).all() for n in matmuls)
    assert max(int(np.abs(values[n.input[1]].astype(np.int32) - 128).max()) for n in matmuls) == 127  # full range
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_backend(manifest).close()  # uint8 weights are exact here

    built_with_vnni = Manifest.load(artifact)  # what a build on a VNNI host records (its gate passed there)
    built_with_vnni.precision["quantization"]["weight_type"] = "int8"
    with pytest.warns(UserWarning, match=r"full-range weights and this CPU has no VNNI.*rebuild it on this machine"):
        load_backend(built_with_vnni).close()
    monkeypatch.setattr("toolkit.host.int8_full_range_exact", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_backend(built_with_vnni).close()
    assert not int8_scheme(["onnx"]).unsigned_weights and not int8_scheme(["tvm"]).unsigned_weights


def test_uint8_weights_compute_exactly_what_the_integer_arithmetic_gives_on_this_cpu(tmp_path):
    """One linear layer whose int8 product would saturate in int16 (full-range activations and weights, an outlier
    channel): with uint8 weights ONNX Runtime gives the exact integer result on any CPU, the same values as int8."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.onnx_quantize import _quantize_weight, _weight_scale, quantize_onnx
    from toolkit.quantize import Int8Scheme, QuantizationPlan

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:, 3] *= 40.0
    w = (rng.standard_normal((256, 96)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="layers.0.mlp.down_proj"),
             helper.make_node("Identity", ["xw"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 96])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
              str(tmp_path / "linear.onnx"))
    plan = QuantizationPlan(0.0, "nearest", 1.0, {}, [], {}, None)
    quantize_onnx(tmp_path / "linear.onnx", tmp_path / "uint8.onnx", plan, Int8Scheme(per_token=False,
                                                                                       unsigned_weights=True))
    y = ort.InferenceSession(str(tmp_path / "uint8.onnx")).run(None, {"x": x})[0]

    x_scale = np.float32((max(x.max(), 0) - min(x.min(), 0)) / np.float32(255))  # DynamicQuantizeLinear's arithmetic
    x_zero = np.clip(np.round(-min(x.min(), 0) / x_scale), 0, 255)
    x_q = np.clip(np.round(x / x_scale) + x_zero, 0, 255)
    w_scale = _weight_scale(w)
    w_q = _quantize_weight(w, w_scale)
    exact = ((x_q - x_zero) @ w_q.astype(np.float64)) * (x_scale * w_scale)
    assert np.abs(x_q - x_zero).max() > 127 and np.abs(w_q).max() == 127  # products that overflow int16 in pairs
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


def test_our_int8_graph_is_the_one_quantize_dynamic_writes_with_the_same_weights(checkpoints, onnx_artifacts,
                                                                                tmp_path):
    # quantize_onnx writes one weight at a time (quantize_dynamic holds the fp32 model three times): same graph, same
    # int8 weights and scales, same outputs; a layer kept fp32 stays a MatMul. It does the same from the unfolded fp16
    # export compile gives it (weights through Cast and Transpose): the synthetic weights are bf16 values, which fp16
    # and fp32 hold exactly. Stored as uint8 (hosts without VNNI), the weights are the same values plus 128
    from collections import Counter

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from toolkit.onnx_quantize import quantize_onnx
    from toolkit.quantize import Int8Scheme, QuantizationPlan

    [artifact] = build(checkpoints, tmp_path, "embedding", seq_lens=(32,), dtype="fp32")
    fp32 = artifact / "model.onnx"
    matmuls = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node if n.op_type == "MatMul"]
    kept = "layers.1.mlp.down_proj"
    plan = QuantizationPlan(0.0, "nearest", 1.0, {}, [kept], {}, None)
    ids = np.random.default_rng(0).integers(0, 150000, size=(2, 32)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    fp16 = model_path(onnx_artifacts["embedding"][0])
    assert Manifest.load(onnx_artifacts["embedding"][0]).seq_len == 32
    stock = tmp_path / "stock.onnx"
    quantize_dynamic(str(fp32), str(stock), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=[n for n in matmuls if not n.startswith("layers.") or n == kept],
                     extra_options={"MatMulConstBOnly": True})
    for unsigned in (False, True):
        ours, ours_fp16 = tmp_path / f"ours{unsigned}.onnx", tmp_path / f"ours_fp16_{unsigned}.onnx"
        quantize_onnx(fp32, ours, plan, Int8Scheme(per_token=False, unsigned_weights=unsigned))
        quantize_onnx(fp16, ours_fp16, plan, Int8Scheme(per_token=False, unsigned_weights=unsigned))
        graphs = {path: onnx.load(str(path)).graph for path in (stock, ours, ours_fp16)}
        assert Counter(n.op_type for n in graphs[ours].node) == Counter(n.op_type for n in graphs[stock].node)
        assert kept in {n.name for n in graphs[ours].node if n.op_type == "MatMul"}
        assert not [i.name for i in graphs[ours_fp16].initializer if i.data_type == onnx.TensorProto.FLOAT
                    and len(i.dims) == 2]  # no fp32 weight: the ones quantized are gone, the rest stay fp16

        def weights(graph):  # per MatMulInteger: its int8 weight, zero point and the scale multiplied in after it
            values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
            consumers = {i: n for n in graph.node for i in n.input}
            producers = {o: n for n in graph.node for o in n.output}
            found = {}
            for node in (n for n in graph.node if n.op_type == "MatMulInteger"):
                cast = consumers[node.output[0]]
                output = consumers[cast.output[0]]
                scales = producers[next(i for i in output.input if i != cast.output[0])]
                [scale] = [values[i] for i in scales.input if i in values]
                found[node.name] = (values[node.input[1]], values[node.input[3]], scale)
            return found
        stock_weights, our_weights = weights(graphs[stock]), weights(graphs[ours])
        fp16_weights = weights(graphs[ours_fp16])
        linears = [n for n in matmuls if n.startswith("layers.") and n != kept]
        assert len(linears) == linear_count(checkpoints["embedding"]) - 1
        assert sorted(our_weights) == sorted(fp16_weights) == sorted(stock_weights)
        assert sorted(stock_weights) == sorted(f"{n}_quant" for n in linears)
        for name, (weight, zero, scale) in stock_weights.items():
            if unsigned:  # the same values around zero point 128
                weight, zero = ((a.astype(np.int16) + 128).astype(np.uint8) for a in (weight, zero))
            for found in (our_weights[name], fp16_weights[name]):
                for ours_array, stock_array in zip(found, (weight, zero, scale), strict=True):
                    assert ours_array.dtype == stock_array.dtype and np.array_equal(ours_array, stock_array), name
        assert max(int(np.abs(w.astype(int) - 128 * unsigned).max()) for w, _, _ in our_weights.values()) == 127
        outputs = [ort.InferenceSession(str(path)).run(None, feeds)[0] for path in (stock, ours, ours_fp16)]
        if not unsigned:  # the stock graph's own arithmetic (saturating or not, the same on both)
            np.testing.assert_allclose(outputs[1], outputs[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(outputs[2], outputs[1], rtol=0, atol=1e-5)


def test_a_failed_low_precision_gate_names_what_to_do():
    from toolkit.compile import precision_fix
    from toolkit.quantize import QuantizationPlan

    errors = {f"layers.{i}.mlp.down_proj": 0.02 for i in range(112)}
    plan = QuantizationPlan(0.5, "gptq", 0.1, errors, list(errors)[:4], {}, {"budget_used": 0.99, "rounds": 2})
    # what the 0.6B reranker's int8 build at SEQ 204 said: the preflight could not bring it under the gate
    assert precision_fix("int8", plan) == (
        ". Its preflight kept 4 of 112 linear layers out of int8 and left 99% of the gate's error budget used on the "
        "calibration rows and the gate's edge cases: int8 is at its limit on this model. Build --dtype bf16, or keep "
        "more layers out of int8 (a lower quantization.max_linear_error in the build config)")
    assert "preflight on" in precision_fix("int8", QuantizationPlan(0.0, "nearest", 1.0, errors, [], {}, None))
    assert precision_fix("bf16", None) == ". Build --dtype fp16 (fp32 compute) for this model"
    assert precision_fix("fp16", None) == ""


def test_every_backend_quantizes_a_weight_on_the_int8_grid_to_the_integers_gptq_chose():
    """GPTQ moves each weight onto its int8 grid (`_on_weight_grid`, in torch) and compensates the rounding errors;
    the backends then quantize those weights again, each with its own arithmetic: ONNX Runtime's (`_weight_scale`,
    `_quantize_weight`) and TVM's (`tvm_int8.pack_quads`). Both must give back GPTQ's integers, or its compensation
    is lost (also with an outlier input channel, and a row that is all zeros)."""
    from toolkit import tvm_int8
    from toolkit.onnx_quantize import _quantize_weight, _weight_scale
    from toolkit.quantize import _on_weight_grid, _weight_row_scales

    rng = np.random.default_rng(0)
    w = torch.from_numpy((rng.standard_normal((128, 256)) * 0.02).astype(np.float32))
    w[:, 5] *= 60.0
    w[7] = 0.0
    scale = _weight_row_scales(w)
    grid = _on_weight_grid(w, scale[:, None])
    gptq_integers = torch.round(grid / scale[:, None]).numpy()
    onnx_integers = _quantize_weight(grid.numpy().T, _weight_scale(grid.numpy().T)).T  # ONNX's weights are [K, N]
    panels, _ = tvm_int8.pack_quads(grid.numpy())
    tvm_integers = panels.transpose(0, 2, 1, 3).reshape(128, 256)  # [N/64, K/4, 64, 4] → [N, K]
    assert np.array_equal(onnx_integers, gptq_integers) and np.array_equal(tvm_integers, gptq_integers)
