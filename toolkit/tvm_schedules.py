"""CPU schedules for the lowered Qwen3 PrimFuncs, as dlight-style rules.

apache-tvm's default CPU pipeline leaves loops unscheduled (hundreds of times slower than ONNX Runtime), so every
PrimFunc gets one of these, tried in order:

- `Matmul`: any block with one reduction axis reading two buffers (projections, MLP, attention QK^T and PV):
  register-blocked micro-kernel (MR rows x NR columns of accumulators in a local buffer that LLVM keeps in vector
  registers), the reduction axis outside the micro-tile, NR vectorised with AVX-512, parallel over output tiles;
  elementwise epilogues (residual add, SiLU*up, scaling) are fused into the tile's write-back.
- dlight's `cpu.Reduction`: softmax / RMSNorm shaped functions (parallel rows, vectorised inner loops).
- `Elementwise`: everything else (casts, RoPE, masks, gathers): fuse all loops, parallel outer, vectorise inner.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

VECTOR_LANES = 16  # fp32 lanes of an AVX-512 register


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _vectorizable(sch: s_tir.Schedule, block) -> bool:
    """LLVM codegen cannot store bool vectors (i1 vs int8 lanes)."""
    return all(w.source.dtype != "bool" for w in sch.get(block).writes)


def _largest_divisor(n: int | None, candidates) -> int:
    for c in candidates:
        if n is not None and n % c == 0:
            return c
    return 1


class Matmul(dl.ScheduleRule):
    def __init__(self, mr: int = 4, nr: int = 64, kc: int = 256):
        self.mr, self.nr, self.kc = mr, nr, kc

    def apply(self, func, target: Target, _):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [b for b in infos if not b.is_injective()]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        kinds = main.dom_kind()
        if not (kinds.endswith("R") and kinds.count("R") == 1 and kinds.count("S") >= 2):
            return None
        block = main.block_rv
        if len(sch.get(block).reads) != 2:
            return None
        index = [b.block_rv for b in infos].index(block)
        # Prologue (casts, transposes of activations) is inlined into the matmul's loads.
        for b in reversed(infos[:index]):
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001  (not inlinable: it stays a separate loop nest, scheduled below)
                self._parallel_vectorize(sch, b.block_rv)
        epilogue = [b.block_rv for b in infos[index + 1:]]

        *spatial, k = sch.get_loops(block)
        i, j = spatial[-2], spatial[-1]
        mr = _largest_divisor(_extent(sch, i), (self.mr, 2))
        nr = _largest_divisor(_extent(sch, j), (self.nr, 32, VECTOR_LANES, 8, 4))
        kc = _largest_divisor(_extent(sch, k), (self.kc, 128, 64))
        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        ko, ki = sch.split(k, [None, kc])
        sch.reorder(*spatial[:-2], jo, io, ko, ki, ii, ji)
        outer = sch.fuse(*spatial[:-2], jo, io)
        sch.parallel(outer)
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, outer)
        sch.unroll(ii)
        if nr % VECTOR_LANES == 0:
            jv, jl = sch.split(ji, [None, VECTOR_LANES])
            sch.unroll(jv)
            sch.vectorize(jl)
        else:
            sch.vectorize(ji)
        sch.decompose_reduction(block, ko)  # zero-init the accumulator tile once, outside the reduction loop
        # Write-back of the accumulator tile, then the epilogue on that tile while it is still in cache.
        # (reverse_compute_inline would save a store, but breaks when an epilogue input has two readers, SiLU*gate.)
        self._vectorize_innermost(sch, accumulator)
        for e in epilogue:
            sch.reverse_compute_at(e, outer)
            self._vectorize_innermost(sch, e)
        return sch

    @staticmethod
    def _vectorize_innermost(sch, block):
        if not _vectorizable(sch, block):
            return
        inner = sch.get_loops(block)[-1]
        ext = _extent(sch, inner)
        lanes = _largest_divisor(ext, (VECTOR_LANES, 8, 4))
        if lanes > 1:
            _, v = sch.split(inner, [None, lanes])
            sch.vectorize(v)

    @staticmethod
    def _parallel_vectorize(sch, block):
        Elementwise.schedule_block(sch, block)


class Elementwise(dl.ScheduleRule):
    """Fallback for injective functions: each block's loops fused, split, parallel outer, vectorised inner."""

    def apply(self, func, target: Target, _):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        for b in infos:
            self.schedule_block(sch, b.block_rv)
        return sch

    @staticmethod
    def schedule_block(sch, block):
        loops = sch.get_loops(block)
        if not loops:
            return
        iter_types = [iv.iter_type for iv in sch.get(block).iter_vars]
        if any(t != tirx.IterVar.DataPar for t in iter_types):
            # a reduction nobody else scheduled: parallelise its spatial loops only
            spatial = [lp for lp, t in zip(loops, iter_types) if t == tirx.IterVar.DataPar]
            if spatial and len(spatial) == len(loops) - sum(t != tirx.IterVar.DataPar for t in iter_types):
                try:
                    sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
                except Exception:  # noqa: BLE001
                    pass
            return
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        ext = _extent(sch, fused)
        if ext is not None and ext <= VECTOR_LANES:
            return
        outer, inner = sch.split(fused, [None, VECTOR_LANES * 4])
        sch.parallel(outer)
        if _vectorizable(sch, block):
            _, v_inner = sch.split(inner, [None, VECTOR_LANES])
            sch.vectorize(v_inner)


def cpu_rules():
    return [Matmul(), dl.cpu.Reduction(), Elementwise()]


def unscheduled(mod) -> list[str]:
    """Names of PrimFuncs that no rule scheduled."""
    return sorted(gv.name_hint for gv, f in mod.functions.items()
                  if isinstance(f, tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled", False)))
