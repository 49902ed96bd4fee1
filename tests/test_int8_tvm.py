"""TVM int8 artifacts (W8A8 on AVX512-VNNI, per-token activation scales): the kernel against numpy, the gate on
checkpoints with realistic outliers, and answers that do not depend on batch-mates."""
import subprocess

import numpy as np
import pytest

from toolkit import tvm_amx
from toolkit.artifact import Manifest
from toolkit.errors import ToolkitError
from toolkit.host import cpu_has

from conftest import build, held_out_texts
from test_onnx_artifact import open_artifact

pytestmark = pytest.mark.skipif(not cpu_has("avx512_vnni"),
                                reason="needs a CPU with AVX512-VNNI (TVM int8 kernels run on it only)")


def test_int8_kernels_match_per_token_fake_quantization_and_run_on_vpdpbusd(tmp_path):
    import tvm
    from tvm.s_tir import dlight as dl

    from toolkit import tvm_int8
    from toolkit.tvm_compile import host_target
    from toolkit.tvm_schedules import cpu_rules, unscheduled

    rows, k, n = 12, 1024, 192  # rows not a multiple of the 4-row tile; K spans several reduction blocks
    mod = tvm.IRModule({name: make(*shape).with_attr("global_symbol", name) for name, make, shape in (
        ("absmax", tvm_int8.row_absmax, (rows, k)), ("quantize", tvm_int8.quantize_rows, (rows, k)),
        ("matmul", tvm_int8.quad_matmul, (rows, k, n)))})
    target = tvm.target.Target(host_target())
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    assert unscheduled(mod) == []
    lib = tvm.compile(mod, target=target)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[3] *= 1000.0  # a massive-activation token: its scale must not touch the other rows
    w = rng.standard_normal((n, k)).astype(np.float32)
    panels, side = tvm_int8.pack_quads(w)
    tensor = tvm.runtime.tensor
    absmax, q, out = tensor(np.zeros(rows, np.float32)), tensor(np.zeros((rows, k), np.uint8)), \
        tensor(np.zeros((rows, n), np.float32))
    lib["absmax"](tensor(x), absmax)
    lib["quantize"](tensor(x), absmax, q)
    lib["matmul"](q, tensor(panels), tensor(side), absmax, out)
    x_scale = np.abs(x).max(axis=1, keepdims=True) / 127
    w_scale = np.abs(w).max(axis=1) / 127
    expected = (np.clip(np.rint(x / x_scale), -127, 127) @ np.clip(np.rint(w / w_scale[:, None]), -127, 127).T) \
        * x_scale * w_scale
    assert np.abs(out.numpy() - expected).max() <= 1e-6 * np.abs(expected).max()
    exact = x @ w.T
    for row in (0, 3, 11):
        assert np.linalg.norm(out.numpy()[row] - exact[row]) <= 0.02 * np.linalg.norm(exact[row])
    lib.export_library(str(tmp_path / "k.so"))
    disassembly = subprocess.run(["objdump", "-d", str(tmp_path / "k.so")], capture_output=True, text=True).stdout
    assert disassembly.count("vpdpbusd") >= 16  # a 4 x 64 tile: 16 per reduction step


def test_tvm_int8_gate_fails_naive_quantization_and_passes_the_default(outlier_checkpoints, tmp_path):
    naive = {"smooth_alpha": 0.0, "weight_rounding": "nearest", "max_linear_error": 1.0}  # every layer int8, plain
    with pytest.raises(ToolkitError, match=r"validation failed .* int8 tolerance \(min_cosine >= 0\.99\d+: the "
                                           r"int8 tolerance 0\.99 less \d+% of its error budget, a margin for a "
                                           r"sample of \d+ items\); nothing was installed"):
        build(outlier_checkpoints, tmp_path, "embedding", backends=("tvm",), seq_lens=(64,), dtype="int8",
              preflight=False, **naive)
    # unsmoothed, with the default max_linear_error: the layers reading the 60x outlier channels err over it and
    # stay fp32, the preflight finds the rest well inside the budget, and the gate passes
    [rescued] = build(outlier_checkpoints, tmp_path, "embedding", backends=("tvm",), seq_lens=(64,), dtype="int8",
                      **dict(naive, max_linear_error=0.1))
    quantization = Manifest.load(rescued).precision["quantization"]
    assert Manifest.load(rescued).validation["passed"]
    assert sorted(quantization["keep_fp32"]) == [f"layers.{i}.{m}" for i in (0, 1)
                                                 for m in ("mlp.gate_up_proj", "self_attn.qkv_proj")]
    assert quantization["preflight"]["rounds"] == 1 and quantization["preflight"]["budget_used"] <= 0.5
    [artifact] = build(outlier_checkpoints, tmp_path, "embedding", backends=("tvm",), seq_lens=(64,), dtype="int8")
    manifest = Manifest.load(artifact)
    validation = manifest.validation
    assert validation["passed"] and 0.99 <= validation["min_cosine"] < 1.0
    assert validation["real_texts"] == held_out_texts("embedding")
    assert "per-token" in manifest.precision["quantization"]["scheme"]
    assert manifest.backend_details["amx_kernels"] == sorted(tvm_amx.kinds_to_build() & {"int8"})
    with np.load(artifact / manifest.backend_details["params_file"]) as params:
        dtypes = [params[name].dtype.str for name in params.files]
    assert dtypes.count("|i1") == 4 * 2  # every linear layer of the 2-layer model as int8 quad panels

    # per-token scales: a text's vector is the same whatever shares its batch (the artifact's batch is 2)
    backend = open_artifact(artifact)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 151643, (2, 64))
    mask = np.ones_like(ids)
    together = backend.run(ids, mask)
    other = ids.copy()
    other[1] = rng.integers(0, 151643, 64)
    assert np.array_equal(backend.run(other, mask)[0], together[0])


def test_tvm_int8_reranker_passes_the_gate(outlier_checkpoints, tmp_path):
    [artifact] = build(outlier_checkpoints, tmp_path, "reranker", backends=("tvm",), seq_lens=(128,), dtype="int8")
    validation = Manifest.load(artifact).validation
    assert validation["passed"] and validation["max_abs_diff"] <= 0.02 and validation["kendall_tau"] > 0.5
