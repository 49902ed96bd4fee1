"""bf16 TVM artifacts: the AVX512-BF16 kernel against numpy, the rounding of activations, and the accuracy gate on
checkpoints with realistic outliers."""
import ml_dtypes
import numpy as np
import pytest

from toolkit import tvm_amx
from toolkit.artifact import Manifest
from toolkit.config import BuildConfig
from toolkit.errors import ToolkitError
from toolkit.host import cpu_has
from toolkit.quantize import CalibrationSet

from conftest import build

pytestmark = pytest.mark.skipif(not cpu_has("avx512_bf16"),
                                reason="needs a CPU with AVX512-BF16 (TVM bf16 kernels run on it only)")


def compile_kernels(rows, k, n):
    """The activation-pairing and matmul kernels as the compile pipeline schedules them, in one library."""
    import tvm
    from tvm.s_tir import dlight as dl

    from toolkit import tvm_bf16
    from toolkit.tvm_compile import host_target
    from toolkit.tvm_schedules import cpu_rules

    mod = tvm.IRModule({"pairs": tvm_bf16.to_pairs(rows, k).with_attr("global_symbol", "pairs"),
                        "matmul": tvm_bf16.pair_matmul(rows, k, n).with_attr("global_symbol", "matmul")})
    target = tvm.target.Target(host_target())
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    return tvm.compile(mod, target=target)


def test_activations_round_to_nearest_even_bf16_and_nan_stays_nan():
    import tvm

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(4000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 4000),
                             np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-40, 1.00390625, 1.01171875],
                                      np.float32)])
    values = np.resize(values, (1, 4096)).astype(np.float32)
    lib = compile_kernels(1, 4096, 64)
    pairs = tvm.runtime.tensor(np.zeros((1, 2048), np.int32))
    lib["pairs"](tvm.runtime.tensor(values), pairs)
    got = pairs.numpy().view(ml_dtypes.bfloat16).astype(np.float32)
    expected = values.astype(ml_dtypes.bfloat16).astype(np.float32)  # ml_dtypes rounds to nearest even
    assert np.array_equal(np.isnan(got), np.isnan(expected)) and np.isnan(got).sum() >= 1
    finite = ~np.isnan(expected)
    assert np.array_equal(got[finite], expected[finite])


def test_bf16_matmul_kernel_matches_numpy_and_runs_on_vdpbf16ps(tmp_path):
    import tvm

    from toolkit.tvm_bf16 import pack_pairs

    rows, k, n = 12, 1024, 192  # rows not a multiple of the 4-row tile; K spans several reduction blocks
    rng = np.random.default_rng(0)
    act = rng.standard_normal((rows, k)).astype(np.float32)
    weight = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16)
    lib = compile_kernels(rows, k, n)
    pairs = tvm.runtime.tensor(np.zeros((rows, k // 2), np.int32))
    out = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
    lib["pairs"](tvm.runtime.tensor(act), pairs)
    lib["matmul"](pairs, tvm.runtime.tensor(pack_pairs(weight)), out)
    expected = act.astype(ml_dtypes.bfloat16).astype(np.float64) @ weight.astype(np.float64).T
    assert np.abs(out.numpy() - expected).max() <= 1e-5 * np.abs(expected).max()
    lib.export_library(str(tmp_path / "k.so"))
    assert b"qwen3_deploy_dpbf16" not in (tmp_path / "k.so").read_bytes()  # inlined, not called
    import subprocess

    disassembly = subprocess.run(["objdump", "-d", str(tmp_path / "k.so")], capture_output=True, text=True).stdout
    assert disassembly.count("vdpbf16ps") >= 16  # a 4 x 64 tile: 16 per reduction step


@pytest.mark.parametrize("task", ["embedding", "reranker"])
def test_bf16_artifacts_pass_the_gate_on_outlier_checkpoints(outlier_checkpoints, tmp_path, task):
    seq = 64 if task == "embedding" else 128
    [artifact] = build(outlier_checkpoints, tmp_path, task, backends=("tvm",), seq_lens=(seq,), dtype="bf16")
    manifest = Manifest.load(artifact)
    validation = manifest.validation
    assert manifest.dtype == "bf16" and validation["passed"] and validation["nonfinite"] == 0
    assert validation["real_texts"] == len(CalibrationSet.load().holdout) * (2 if task == "embedding" else 1)
    if task == "embedding":
        assert 0.999 <= validation["min_cosine"] < 1.0  # bf16 rounding shows, within the gate
    else:
        assert validation["max_abs_diff"] <= 5e-3 and validation["kendall_tau"] is not None
    assert manifest.precision["weights"] == "bfloat16" and "vdpbf16ps" in manifest.precision["compute"]
    assert manifest.backend_details["amx_kernels"] == sorted(tvm_amx.kinds_to_build() & {"bf16"})
    with np.load(artifact / manifest.backend_details["params_file"]) as params:
        dtypes = {params[name].dtype.str for name in params.files}
    assert {"<i4", "|V2"} <= dtypes and "<f2" not in dtypes  # linear layers as bf16 pairs, the rest bf16


def test_bf16_config_errors_name_the_fix(checkpoints, tmp_path):
    for backends, target, fix in ((("onnx",), "cpu", "use --backend tvm"), (("tvm",), "cuda", "use --target cpu")):
        cfg = BuildConfig(name="x", task="embedding", checkpoint=str(checkpoints["embedding"]), seq_lens=(64,),
                          dtype="bf16", backends=backends, target=target, workspace=tmp_path)
        with pytest.raises(ToolkitError, match=fix):
            cfg.check()
