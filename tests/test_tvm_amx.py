"""The AMX tile kernels of TVM int8 and bf16 artifacts, and of fp16/fp32 ones (bf16x3): built on any x86 host (the
disassembly shows the tile instructions), run and checked against numpy at a symbolic batch on hosts with AMX."""
import subprocess

import ml_dtypes
import numpy as np
import pytest

from toolkit import tvm_amx
from toolkit.host import is_x86

pytestmark = pytest.mark.skipif(not is_x86(), reason="AMX is an x86 extension")

SEQ, K, N = 12, 256, 128  # 12 rows a sequence: whole tiles only from 4 sequences on (padded rows otherwise)


def compile_kernels(kind: str, tmp_path):
    """The kernel pair of `kind` (activation packing + AMX matmul) at rows = batch * SEQ, batch symbolic; built for
    this CPU where it has AMX, else for Sapphire Rapids (built, not run)."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from toolkit import tvm_bf16, tvm_int8
    from toolkit.tvm_compile import host_target
    from toolkit.tvm_schedules import cpu_rules, unscheduled

    rows = tirx.Var("batch", "int64") * SEQ
    if kind == "int8":
        funcs = {"absmax": tvm_int8.row_absmax(rows, K), "pack": tvm_int8.quantize_rows(rows, K, amx=True),
                 "matmul": tvm_int8.quad_matmul(rows, K, N, amx=True)}
    elif kind == "bf16x3":
        funcs = {"pack": tvm_bf16.to_split_pairs(rows, K), "matmul": tvm_bf16.split_matmul(rows, K, N)}
    else:
        funcs = {"pack": tvm_bf16.to_pairs(rows, K, amx=True), "matmul": tvm_bf16.pair_matmul(rows, K, N, amx=True)}
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    runs_here = kind in tvm_amx.kinds_to_build()
    target = tvm.target.Target(host_target() if runs_here else {"kind": "llvm", "mcpu": "sapphirerapids"})
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    assert unscheduled(mod) == []
    lib = tvm.compile(mod, target=target)
    lib.export_library(str(tmp_path / "k.so"))
    disassembly = subprocess.run(["objdump", "-d", str(tmp_path / "k.so")], capture_output=True, text=True).stdout
    instruction = {"int8": "tdpbusd", "bf16": "tdpbf16ps", "bf16x3": "tdpbf16ps"}[kind]
    count = disassembly.count(instruction)  # 4 accumulator tiles per K step, 1 or 3 products each (maybe unrolled)
    assert count >= 4 and count % 4 == 0 and "ldtilecfg" in disassembly
    return lib if runs_here else None


@pytest.mark.parametrize("kind", ["int8", "bf16", "bf16x3"])
def test_amx_kernels_match_numpy_at_any_batch(kind, tmp_path):
    import tvm

    from toolkit import tvm_bf16, tvm_int8

    lib = compile_kernels(kind, tmp_path)
    if lib is None:
        pytest.skip(f"built only: no AMX {kind} kernels here (this CPU lacks amx_tile or "
                    f"{tvm_amx.KINDS[kind].flag}, or {tvm_amx.SWITCH}=0)")
    tvm_amx.request_tiles()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((N, K)).astype(np.float32)
    tensor = tvm.runtime.tensor
    for batch in (1, 3, 4):  # 12, 36 and 48 rows: one partial tile, three with padding, three whole
        rows = batch * SEQ
        padded = tvm_amx.activation_rows(rows, amx=True)
        act = rng.standard_normal((rows, K)).astype(np.float32)
        act[rows // 2] *= 1000.0  # a massive-activation token
        out = tensor(np.full((rows, N), np.nan, np.float32))
        if kind == "int8":
            panels, side = tvm_int8.pack_quads(weight)
            absmax, q = tensor(np.zeros(rows, np.float32)), tensor(np.zeros((padded, K), np.uint8))
            lib["absmax"](tensor(act), batch, absmax)
            lib["pack"](tensor(act), absmax, batch, q)
            lib["matmul"](q, tensor(panels), tensor(side), absmax, batch, out)
            act_scale = np.abs(act).max(axis=1, keepdims=True) / 127
            weight_scale = np.abs(weight).max(axis=1) / 127
            expected = (np.clip(np.rint(act / act_scale), -127, 127)
                        @ np.clip(np.rint(weight / weight_scale[:, None]), -127, 127).T) * act_scale * weight_scale
            assert np.all(q.numpy()[rows:] == tvm_int8.SHIFT)  # padding rows are zeros
        elif kind == "bf16x3":  # fp16 weights as their two bf16 planes
            fp16_weight = weight.astype(np.float16)
            planes = tensor(np.zeros((padded, 2, K // 2), np.int32))
            lib["pack"](tensor(act), batch, planes)
            lib["matmul"](planes, tensor(tvm_bf16.pack_split_pairs(fp16_weight)), batch, out)
            exact64 = fp16_weight.astype(np.float64)
            expected = act.astype(np.float64) @ exact64.T
            assert np.all(planes.numpy()[rows:] == 0)
            # each product x·w within 2^-15 of its size: x's two planes hold it to 2^-16, lo·lo (dropped) is 2^-16
            bound = 2.0 ** -15 * (np.abs(act).astype(np.float64) @ np.abs(exact64).T)
            assert np.all(np.abs(out.numpy() - expected) <= bound), batch
            rounded = act.astype(ml_dtypes.bfloat16).astype(np.float64) @ exact64.T  # what one bf16 product gives
            assert np.abs(out.numpy() - expected).max() < np.abs(rounded - expected).max() / 50
            continue
        else:
            bf16_weight = weight.astype(ml_dtypes.bfloat16)
            pairs = tensor(np.zeros((padded, K // 2), np.int32))
            lib["pack"](tensor(act), batch, pairs)
            lib["matmul"](pairs, tensor(tvm_bf16.pack_pairs(bf16_weight)), batch, out)
            expected = act.astype(ml_dtypes.bfloat16).astype(np.float64) @ bf16_weight.astype(np.float64).T
        error = np.abs(out.numpy() - expected) / np.abs(expected).max(axis=1, keepdims=True)
        assert error.max() <= 1e-5, (batch, error.max())  # every row right, the massive one's scale its own


def test_where_linux_refuses_tiles_builds_use_avx512_and_amx_artifacts_name_the_fix(monkeypatch):
    from toolkit.errors import ToolkitError

    monkeypatch.setattr(tvm_amx, "tiles_refused", lambda: 22)  # EINVAL: a kernel before 5.16
    assert tvm_amx.kinds_to_build() == frozenset()
    with pytest.raises(ToolkitError, match=r"errno 22; .* run this artifact on a newer Linux kernel, or rebuild it"):
        tvm_amx.request_tiles()
