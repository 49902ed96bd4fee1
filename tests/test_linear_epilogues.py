"""The int8 and bf16 linear kernels' tiles (VNNI and AVX512-BF16 registers, or AMX tiles, where fp16 weights also run
as three bf16 products): the residual add and SiLU(gate) * up run inside them (each epilogue against the plain kernel
plus numpy, and the graph rewrite that puts them there), and they go row tile by row tile over blocks of panels."""
import ml_dtypes
import numpy as np
import pytest

from toolkit import tvm_amx
from toolkit.host import cpu_has, is_x86


def _amx(kind: str):
    return pytest.mark.skipif(not is_x86() or kind not in tvm_amx.kinds_to_build(),
                              reason=f"needs AMX {kind} kernels (amx_tile and {tvm_amx.KINDS[kind].flag})")


_VNNI = pytest.mark.skipif(not cpu_has("avx512_vnni"), reason="needs AVX512-VNNI")
_AVX512_BF16 = pytest.mark.skipif(not cpu_has("avx512_bf16"), reason="needs AVX512-BF16")
KERNELS = [pytest.param("int8", marks=_VNNI), pytest.param("bf16", marks=_AVX512_BF16)]
# (kind, on AMX tiles)
ALL_KERNELS = [pytest.param("int8", False, marks=_VNNI, id="int8"),
               pytest.param("bf16", False, marks=_AVX512_BF16, id="bf16")] + [
    pytest.param(kind, True, marks=_amx(kind), id=f"{kind}-amx") for kind in ("int8", "bf16", "bf16x3")]


def _bf16_pairs(x):
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
    return (bits[:, 0::2] | (bits[:, 1::2] << 16)).view(np.int32)


@pytest.mark.parametrize("kind, amx", ALL_KERNELS)
def test_residual_and_glu_epilogues_match_the_plain_kernel_and_numpy(kind, amx):
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from toolkit import tvm_bf16, tvm_int8
    from toolkit.tvm_compile import GLU, RESIDUAL, glu_interleaved, host_target
    from toolkit.tvm_schedules import cpu_rules, unscheduled

    rows, k, n = 12, 512, 256
    make = {"int8": tvm_int8.quad_matmul, "bf16": tvm_bf16.pair_matmul}.get(kind, tvm_bf16.split_matmul)
    options = {"amx": True} if amx and kind != "bf16x3" else {}
    batch = tirx.Var("batch", "int64")  # the rows of a batch of 12-token sequences, as a model's kernels have them
    mod = tvm.IRModule({name: make(batch * rows, k, n, epilogue=epilogue, **options).with_attr("global_symbol", name)
                        for name, epilogue in (("plain", None), ("residual", RESIDUAL), ("glu", GLU))})
    target = tvm.target.Target(host_target())
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    assert unscheduled(mod) == []
    for name in ("plain", "residual", "glu"):
        script = mod[name].script()
        if amx:  # one micro-kernel call per tile; the epilogue reads the tile it stored
            assert tvm_amx.kernel_name(kind) in script, name
        else:  # the epilogue reads the accumulator tile: the kernel allocates no buffer but the (register) accumulators
            allocations = [line for line in script.splitlines() if "alloc_buffer" in line]
            assert allocations and all('scope="local"' in line for line in allocations), name
    lib = tvm.compile(mod, target=target)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[5] *= 300.0  # a massive-activation token
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    padding = tvm_amx.activation_rows(rows, amx) - rows  # AMX reads whole 16-row tiles
    if kind == "int8":
        absmax = np.abs(x).max(axis=1).astype(np.float32)
        q = (np.clip(np.rint(x * 127 / absmax[:, None]), -127, 127) + 128).astype(np.uint8)
        q = np.pad(q, ((0, padding), (0, 0)), constant_values=tvm_int8.SHIFT)
        operands = lambda weight: [q, *tvm_int8.pack_quads(weight), absmax]  # noqa: E731
    elif kind == "bf16":
        pairs = np.pad(_bf16_pairs(x), ((0, padding), (0, 0)))
        operands = lambda weight: [pairs, tvm_bf16.pack_pairs(weight.astype(ml_dtypes.bfloat16))]  # noqa: E731
    else:  # x as its high and low bf16 planes, the weight as fp16's
        high = x.astype(ml_dtypes.bfloat16).astype(np.float32)
        planes = np.pad(np.stack([_bf16_pairs(high), _bf16_pairs(x - high)], axis=1), ((0, padding), (0, 0), (0, 0)))
        operands = lambda weight: [planes, tvm_bf16.pack_split_pairs(weight.astype(np.float16))]  # noqa: E731
    tensor = tvm.runtime.tensor

    def run(name, weight, extra, out_shape):
        out = tensor(np.zeros(out_shape, np.float32))
        lib[name](*[tensor(a) for a in operands(weight) + extra], 1, out)  # batch 1
        return out.numpy()

    product = run("plain", w, [], (rows, n))
    residual = rng.standard_normal((rows, n)).astype(np.float32)
    assert np.abs(run("residual", w, [residual], (rows, n)) - (product + residual)).max() <= 1e-5 * np.abs(
        product).max()
    gate, up = product[:, :n // 2], product[:, n // 2:]
    glu = run("glu", glu_interleaved(w), [], (rows, n // 64, 32)).reshape(rows, n // 2)
    expected = gate / (1 + np.exp(-gate)) * up
    assert np.abs(glu - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("kind, amx", ALL_KERNELS)
def test_the_graph_fuses_each_residual_add_and_silu_into_its_linear_kernel(tmp_path, kind, amx):
    """One layer: o_proj and down_proj end with the residual add, gate_up_proj with SiLU * up (its weight packed
    interleaved); no sigmoid or residual add is left as a kernel of its own, and qkv_proj stays plain. AMX builds
    too, fp16 weights as three bf16 products (bf16x3) among them."""
    import torch
    import tvm

    from toolkit.export import export_onnx
    from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment, Qwen3Shape
    from toolkit.tasks import TASKS
    from toolkit.tvm_compile import BF16_PAIRS, GLU_SUFFIX, INT8_QUADS, SPLIT_PANELS, host_target, import_onnx, lower

    task = TASKS["embedding"]
    shape = Qwen3Shape(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, intermediate_size=512, vocab_size=1000, rms_norm_eps=1e-6, rope_theta=1e6)
    model = Qwen3ForDeployment(shape, task.output_name)
    export_onnx(model.to(torch.bfloat16) if kind == "bf16" else model.half(), task, tmp_path / "m.onnx", 64, 1)
    graph = import_onnx(tmp_path / "m.onnx", 4, 16)
    int8 = frozenset(i for i, w in enumerate(graph.weights) if w.name.endswith("proj.weight")) if kind == "int8" \
        else frozenset()
    lowered, layouts = lower(graph.mod, tvm.target.Target(host_target()), schedule=False, int8=int8,
                             amx=frozenset({kind}) if amx else frozenset())
    names = [gv.name_hint for gv in lowered.get_global_vars()]
    matmuls = [n for n in names if n.startswith(f"{kind}_matmul")]
    # per layer: qkv plain, o_proj and down_proj with the residual, gate_up with GLU (the last layer's o_proj,
    # down_proj and gate_up run on the last position alone: kernels of their own)
    assert sum(n.endswith("_residual") for n in matmuls) == 4 and sum(n.endswith("_glu") for n in matmuls) == 2
    assert not any("lambda" in n or n.startswith("fused_reshape") and n.endswith("add") for n in names)
    packed = {"int8": INT8_QUADS, "bf16": BF16_PAIRS, "bf16x3": SPLIT_PANELS}[kind]
    assert all(("_amx_" in n) == (amx and kind != "bf16x3") for n in matmuls)  # bf16x3 runs on AMX only
    by_weight = dict(zip((w.name for w in graph.weights), layouts))
    assert [by_weight[f"layers.{i}.mlp.gate_up_proj.weight"] for i in (0, 1)] == [packed + GLU_SUFFIX] * 2
    assert by_weight["layers.0.self_attn.qkv_proj.weight"] == packed


@pytest.mark.parametrize("kind", KERNELS)
def test_linear_tiles_go_row_by_row_over_blocks_of_four_panels_with_the_same_outputs(kind):
    """8 panels of 64 columns, 12 rows: the parallel loop runs over 2 blocks x 3 row tiles (each tile then takes the
    block's 4 panels in turn), not 8 panels x 3 row tiles; every output is the same bit for bit (a tile's sums are
    taken in the same order either way)."""
    import re

    import tvm
    from tvm.s_tir import dlight as dl

    from toolkit import tvm_bf16, tvm_int8
    from toolkit.tvm_compile import host_target
    from toolkit.tvm_schedules import Matmul, cpu_rules

    rows, k, n = 12, 256, 512
    make = tvm_int8.quad_matmul if kind == "int8" else tvm_bf16.pair_matmul
    target = tvm.target.Target(host_target())
    libs, parallel = [], []
    for row_panels in (4, 1):
        rules = cpu_rules()
        rules[0] = Matmul(row_panels=row_panels)
        with target:
            mod = dl.ApplyDefaultSchedule(*rules)(tvm.IRModule({"main": make(rows, k, n).with_attr("global_symbol",
                                                                                                     "main")}))
        parallel.append([int(e) for e in re.findall(r"T\.parallel\(T\.int64\((\d+)\)", mod["main"].script())])
        libs.append(tvm.compile(mod, target=target))
    assert parallel == [[2 * 3], [8 * 3]]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    x = rng.standard_normal((rows, k)).astype(np.float32)
    if kind == "int8":
        absmax = np.abs(x).max(axis=1).astype(np.float32)
        operands = [(np.clip(np.rint(x * 127 / absmax[:, None]), -127, 127) + 128).astype(np.uint8),
                    *tvm_int8.pack_quads(w), absmax]
    else:
        operands = [_bf16_pairs(x), tvm_bf16.pack_pairs(w.astype(ml_dtypes.bfloat16))]
    outputs = []
    for lib in libs:
        out = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
        lib["main"](*[tvm.runtime.tensor(a) for a in operands], out)
        outputs.append(out.numpy())
    assert np.array_equal(outputs[0], outputs[1]) and np.abs(outputs[0]).max() > 0
