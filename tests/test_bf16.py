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

from conftest import build, held_out_texts

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


@pytest.mark.parametrize("seq,rows,mask_rows", [(28, 56, 56), (44, 2, 1), (260, 10, 10)],
                         ids=["seq28", "last-position-44", "seq260"])
def test_bf16_attention_kernels_match_numpy_on_bf16_rounded_operands(seq, rows, mask_rows):
    """bf16 attention as the compile pipeline schedules it (`tvm_compile.bf16_attention_kernels`): q·kᵀ * scale +
    mask from q's and k's bf16 pairs (k transposed, its columns padded: 32, 64, 320), the softmax written as bf16
    pairs, and P·V, against numpy in float64 on the same bf16-rounded q, k, v and probabilities. Left padding masked
    at -1e9 as the export's mask; rows not a multiple of the 4-row tile; one mask row for all (the last position)."""
    import tvm
    from tvm.s_tir import dlight as dl

    from toolkit import tvm_bf16
    from toolkit.tvm_compile import attention_columns, host_target, softmax_pairs
    from toolkit.tvm_schedules import cpu_rules, unscheduled

    batch, groups, dim, scale = 2, 3, 128, 128 ** -0.5
    columns = attention_columns(seq)
    funcs = {"q_pairs": tvm_bf16.to_pairs(batch * groups * rows, dim),
             "k_pairs": tvm_bf16.key_pairs(batch, groups, seq, dim, columns),
             "scores": tvm_bf16.pair_scores(batch, groups, rows, seq, columns, dim, scale, mask_rows),
             "softmax": softmax_pairs(batch, groups, rows, seq),
             "v_pairs": tvm_bf16.value_pairs(batch, groups, seq, dim),
             "values": tvm_bf16.pair_values(batch, groups, rows, seq, dim)}
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    target = tvm.target.Target(host_target())
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    assert unscheduled(mod) == [] and columns % 16 == 0 and columns >= seq
    assert all("qwen3_deploy_dpbf16" in mod[n].script() for n in ("scores", "values"))  # tensorized: vdpbf16ps
    lib = tvm.compile(mod, target=target)
    rng = np.random.default_rng(seq)
    q = rng.standard_normal((batch, groups, rows, dim)).astype(np.float32) * 2
    k, v = (rng.standard_normal((batch, groups, seq, dim)).astype(np.float32) for _ in range(2))
    mask = np.zeros((batch, 1, mask_rows, seq), np.float32)
    mask[1, ..., : seq // 3] = -1e9  # the second sequence's left padding
    tensor = tvm.runtime.tensor

    def run(name, *inputs, shape, dtype="int32"):
        out = tensor(np.zeros(shape, dtype))
        lib[name](*inputs, out)
        return out

    q_pairs = run("q_pairs", tensor(q.reshape(-1, dim)), shape=(batch * groups * rows, dim // 2))
    k_pairs = run("k_pairs", tensor(k), shape=(batch, groups, dim // 2, columns))
    logits = run("scores", tensor(q_pairs.numpy().reshape(batch, groups, rows, dim // 2)), k_pairs, tensor(mask),
                 shape=(batch, groups, rows, seq), dtype="float32")
    p_pairs = run("softmax", logits, shape=(batch, groups, rows, seq // 2))
    out = run("values", p_pairs, run("v_pairs", tensor(v), shape=(batch, groups, seq // 2, dim)),
              shape=(batch, groups, rows, dim), dtype="float32").numpy()

    def bf16(x):
        return x.astype(ml_dtypes.bfloat16).astype(np.float64)

    def unpaired(pairs):  # int32 bf16 pairs → the float64 values, low half first
        return pairs.view(ml_dtypes.bfloat16).astype(np.float64)

    expected_logits = bf16(q) @ bf16(k).transpose(0, 1, 3, 2) * scale + mask
    unmasked = expected_logits > -1e8
    error = np.abs(logits.numpy() - expected_logits)[unmasked].max()
    assert error <= 1e-5 * np.abs(expected_logits[unmasked]).max() and (logits.numpy()[~unmasked] < -1e8).all()
    shifted = np.exp(expected_logits - expected_logits.max(-1, keepdims=True))
    probs = unpaired(p_pairs.numpy())
    assert np.abs(probs - shifted / shifted.sum(-1, keepdims=True)).max() <= 2 ** -8  # rounded to bf16
    assert (probs[1, ..., : seq // 3] == 0).all()  # masked keys weigh nothing
    expected = probs @ bf16(v)
    assert np.isfinite(out).all() and np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("task", ["embedding", "reranker"])
def test_bf16_artifacts_pass_the_gate_on_outlier_checkpoints(outlier_checkpoints, tmp_path, task):
    seq = 64 if task == "embedding" else 128
    # the reranker's with an instruction its graph does not cache: `toolkit validate` must check the texts with it too
    uncached = {} if task == "embedding" else {"instruction": "Judge the passage", "cache_instruction": False}
    [artifact] = build(outlier_checkpoints, tmp_path, task, backends=("tvm",), seq_lens=(seq,), dtype="bf16",
                       **uncached)
    manifest = Manifest.load(artifact)
    validation = manifest.validation
    assert manifest.dtype == "bf16" and validation["passed"] and validation["nonfinite"] == 0
    assert validation["real_texts"] == held_out_texts(task)
    if task == "embedding":
        assert 0.999 <= validation["min_cosine"] < 1.0  # bf16 rounding shows, within the gate
    else:
        assert validation["max_abs_diff"] <= 5e-3 and validation["kendall_tau"] is not None
        assert manifest.instruction is None and validation["real_texts_instruction"] == "Judge the passage"
        from toolkit.validation import revalidate

        again = revalidate(artifact)
        assert again["real_texts_instruction"] == "Judge the passage"
        assert again["max_abs_diff"] == pytest.approx(validation["max_abs_diff"], abs=1e-7)
    assert manifest.precision["weights"] == "bfloat16" and "vdpbf16ps" in manifest.precision["compute"]
    library = (artifact / manifest.model_file).read_bytes()
    assert b"bf16_attention_scores" in library and b"bf16_attention_values" in library  # attention's matmuls too
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
