"""CPU schedules for the lowered Qwen3 PrimFuncs, as dlight-style rules.

apache-tvm's default CPU pipeline leaves loops unscheduled (hundreds of times slower than ONNX Runtime), so every
PrimFunc gets one of these, tried in order:

- `Matmul`: any block with one reduction axis reading two buffers (projections, MLP, attention QK^T and PV):
  register-blocked micro-kernel (MR rows x NR columns of accumulators in a local buffer that LLVM keeps in vector
  registers), the reduction axis outside the micro-tile, NR vectorised with AVX-512, parallel over output tiles;
  elementwise epilogues (residual add, SiLU*up, scaling) are fused into the tile's write-back; a linear kernel's
  (`tvm_compile.linear_output`) is one expression reading the accumulator registers, with no [rows, N] buffer
  between (its int32 copy cost the int8 kernels 5-10% at N 6144). The bf16 linear
  layers' kernel (`tvm_bf16.pair_matmul`) gets the same tiles with one `vdpbf16ps` per 16 columns, the int8 one
  (`tvm_int8.quad_matmul`) one `vpdpbusd` per 16 columns and 4 K values, their tiles row tile by row tile over
  blocks of 4 weight panels (1.07-1.10x for int8 at K 1024); on CPUs with AMX, both instead call an
  AMX tile micro-kernel per 16 rows x 64-256 columns over the whole K (`tvm_amx`). Batched matmuls (attention, per
  sequence and head) run in parallel over the batch, their tiles in turn; QK^T's columns (SEQ: 60, 44, 28...) are
  padded to whole register tiles (32 or 64 columns), else its tiles were 4 columns wide at SEQ 60 (40 GFLOP/s, a
  tenth of the time) and 16 at SEQ 260 (4 accumulators: 1.24x slower). bf16 attention's two matmuls
  (`tvm_bf16.pair_scores`, `pair_values`) are batched dot kernels: one `vdpbf16ps` per 16 columns, their columns
  padded by the kernel that packs k (`tvm_bf16.key_pairs`).
- `Softmax`: attention's softmax (`tvm_compile.softmax_rows`): both row reductions as 16 vector lanes, all blocks
  per row under one parallel loop, rows that are not whole vectors (SEQ 260) with a shorter vector for their tail.
- `RowReduction`: RMSNorm-shaped functions and int8's per-token max |x|: row reductions split into 16 vector lanes
  (rfactor), all blocks per row under one parallel loop; dlight's `cpu.Reduction` takes rows whose length is not a
  multiple of 16 (and softmax rows shorter than a vector).
  A head's vectors are unrolled, so that RoPE in q's and k's norm kernels (`tvm_compile.rms_norm`) is decided per
  vector and vectorises.
- `Elementwise`: everything else (casts, SiLU*up, masks, gathers, transposes): the function's ops inlined into one
  loop nest (one pass over memory), 16 vector lanes along the innermost axis, parallel over rows, a row of up to 8
  vectors unrolled (a condition on the innermost index is then decided per vector: RoPE's rotate-half, when it was
  a kernel of its own, had stayed scalar: 0.15 → 0.08 ms per q RoPE at `[9, 28]`).
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.sym.analyzer import Analyzer
from tvm.target import Target
from tvm.tirx.analysis import undefined_vars
from typing_extensions import override

from toolkit import tvm_amx, tvm_bf16, tvm_int8
from toolkit.tvm_compile import PANEL, ROW_TILE_COLUMNS, VECTOR_LANES, column_multiple

UNROLLED_CHUNKS = 8  # a row of at most this many vectors (a head of 128) is unrolled
# Matmul blocks whose 16-column inner loop is one x86 dot-product instruction, by block name:
# (tensor intrinsic, the LLVM wrapper it calls, K values per lane that the block itself iterates over)
DOT_KERNELS = {tvm_bf16.MATMUL_NAME: (tvm_bf16.DOT_16, tvm_bf16.DPBF16_LLVM, 1),  # K pairs are already packed
               tvm_bf16.SCORES_NAME: (tvm_bf16.DOT_16, tvm_bf16.DPBF16_LLVM, 1),
               tvm_bf16.VALUES_NAME: (tvm_bf16.DOT_16, tvm_bf16.DPBF16_LLVM, 1),
               tvm_int8.MATMUL_NAME: (tvm_int8.DOT_16x4, tvm_int8.VPDPBUSD_LLVM, 4)}
# Matmul blocks that run on AMX tiles, by block name: (kernel kind, K values per element of the block's reduction)
AMX_KERNELS = {tvm_int8.AMX_MATMUL_NAME: ("int8", 1), tvm_bf16.AMX_MATMUL_NAME: ("bf16", 2),
               tvm_bf16.SPLIT_MATMUL_NAME: ("bf16x3", 2)}


def _by_block_name(kernels: dict, name: str):
    """The entry of `kernels` (DOT_KERNELS, AMX_KERNELS) for a block, by the prefix of its name (FuseTIR may add a
    suffix); None if it has none."""
    return next((spec for prefix, spec in kernels.items() if name.startswith(prefix)), None)


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    """The loop's extent; None where it is symbolic (rows of `batch * SEQ` tokens)."""
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _vectorizable(sch: s_tir.Schedule, block) -> bool:
    """LLVM codegen cannot store bool vectors (i1 vs int8 lanes)."""
    return all(w.source.dtype != "bool" for w in sch.get(block).writes)


def _reads_bf16(sch: s_tir.Schedule, block) -> bool:
    """Whether the block loads bf16 values: unrolled, their vector casts abort LLVM's instruction selection ("Do not
    know how to split this operator's operand", a 64-wide embedding row of bf16 weights)."""
    return any(r.source.dtype == "bfloat16" for r in sch.get(block).reads)


def _unroll_short_row(sch: s_tir.Schedule, block, chunks) -> None:
    """Unroll the loop over a row's vectors where there are at most UNROLLED_CHUNKS of them (a head of 128) and the
    block loads no bf16 (`_reads_bf16`): a condition on the innermost index at a multiple of 16 (rotate-half's sign
    and `(d + 64) mod 128`) is then one constant per vector; rolled, it varied by lane and TVM's vectorizer left the
    whole loop scalar (RoPE's LLVM IR: 16 scalar float loads, against 32 `<16 x float>` unrolled)."""
    extent = _extent(sch, chunks)
    if extent is not None and extent <= UNROLLED_CHUNKS and not _reads_bf16(sch, block):
        sch.unroll(chunks)


def _one_output_stage(sch, epilogue: list) -> list:
    """A linear kernel's output stage (`linear_output`) as one expression: its helper blocks (GLU's exp) inlined into
    the last, no pass of their own; returns `[the last]`."""
    for e in epilogue[:-1]:
        sch.compute_inline(e)
    return epilogue[-1:]


def _largest_divisor(n, candidates) -> int:
    """The first candidate that divides `n`: an int, or a symbolic extent whose divisors are known (`batch * 28`
    rows: 4, 2); 1 if none does (None: unknown)."""
    for c in candidates:
        if n is not None and (n % c == 0 if isinstance(n, int) else Analyzer().can_prove(tirx.floormod(n, c) == 0)):
            return c
    return 1


def _read_along_innermost_axis(sch: s_tir.Schedule, block) -> bool:
    """Whether every consumer of the block reads its output's last axis with an index that moves with the consumer's
    own innermost axis (false for a transpose of the two innermost axes)."""
    outputs = [w.source for w in sch.get(block).writes]
    for consumer in sch.get_consumers(block):
        stmt = sch.get(consumer)
        innermost = stmt.iter_vars[-1].var
        for read in stmt.reads:
            if any(read.source.same_as(o) for o in outputs) and read.region and not any(
                    v.same_as(innermost) for v in undefined_vars(read.region[-1].min)):
                return False
    return True


def _lane_partials(sch: s_tir.Schedule, block):
    """Split the block's reduction over its innermost loop into VECTOR_LANES partial results (rfactor: a new block
    writing `partial[..., lane]`, lanes contiguous, which the block then combines); None, before any change, unless
    that loop is whole vectors and at least two of them."""
    k = sch.get_loops(block)[-1]
    extent = _extent(sch, k) or 0
    if extent % VECTOR_LANES or extent < 2 * VECTOR_LANES:
        return None
    _, lane = sch.split(k, [None, VECTOR_LANES])
    # the lane axis goes last in the partials' buffer (block iterators drop unit axes: counting those put it
    # before the rows at batch 1, and the vector stores scattered)
    return sch.rfactor(lane, factor_axis=len(sch.get(block).writes[0].source.shape))


def _analyze(func):
    """(schedule, block infos) for a PrimFunc dlight can normalise, else None."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return None if infos is None else (sch, infos)


class Matmul(dl.ScheduleRule):
    """Register-blocked matmul micro-kernel with fused epilogues (see the module docstring)."""

    def __init__(self, mr: int = 4, nr: int = 64, kc: int = 256, row_panels: int = 4):
        self.mr, self.nr, self.kc, self.row_panels = mr, nr, kc, row_panels

    @override
    def apply(self, func, target: Target, _):
        analyzed = _analyze(func)
        if analyzed is None:
            return None
        sch, infos = analyzed
        reductions = [b for b in infos if not b.is_injective()]
        linear = [b for b in reductions if _by_block_name(DOT_KERNELS | AMX_KERNELS, sch.get(b.block_rv).name_hint)]
        if linear:  # a linear kernel's product (its GLU output stage is a reduction too: `linear_output`)
            reductions = linear[:1]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        kinds = main.dom_kind()
        if not (kinds.endswith("R") and kinds.count("R") == 1 and kinds.count("S") >= 2):
            return None
        block = main.block_rv
        if len(sch.get(block).reads) != 2:
            return None
        name = sch.get(block).name_hint
        dot, amx = _by_block_name(DOT_KERNELS, name), _by_block_name(AMX_KERNELS, name)
        index = [b.block_rv for b in infos].index(block)
        epilogue = [b.block_rv for b in infos[index + 1:]]
        # Epilogues are computed per output tile, so each must consume the tile (directly or through an earlier
        # epilogue). A block that does not (a fused mask build) would be computed whole inside every tile, and what
        # follows it would read rows of other tiles before they exist: decline such functions.
        produced = {w.source.name for w in sch.get(block).writes}
        for e in epilogue:
            if not {r.source.name for r in sch.get(e).reads} & produced:
                return None
            produced |= {w.source.name for w in sch.get(e).writes}
        if amx:  # its operands come straight from the function's inputs: no prologue
            return None if index else self._amx_tiles(func, name, [sch.get(e).name_hint for e in epilogue], *amx)
        if dot:
            epilogue = _one_output_stage(sch, epilogue)
        # Prologue (casts, transposes of activations) is inlined into the matmul's loads. One that cannot be (a
        # fused mask construction in a 1-layer graph) made the tiled kernel wrong: leave such functions to others.
        for b in reversed(infos[:index]):
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001
                return None

        batched = len(sch.get_loops(block)) > 3 and self._batched(sch, block)
        padding = []  # blocks copying an operand into its padded buffer
        padded = self._pad_columns(sch, block) if batched and not dot else None  # bf16 attention comes padded
        if padded:  # the epilogue now starts with the crop of the padded output
            block = sch.get_sblock(name)  # pad_einsum keeps the block's name
            padding, epilogue = padded
        *spatial, k = sch.get_loops(block)
        halves = []
        # a GLU kernel's [rows, panels, 2, 32] product (`panel_product`)
        whole_panels = dot and not batched and len(spatial) == 4
        if whole_panels:  # its tiles are whole panels: jo is the panel, ji a half's columns, each half in turn
            i, jo, half, ji = spatial
            spatial, halves = [i, ji], [half]
        i, j = spatial[-2], spatial[-1]
        columns = _extent(sch, j)
        mr = _largest_divisor(sch.get(i).extent, (self.mr, 2))
        if batched and columns <= ROW_TILE_COLUMNS and columns % 8 == 0:  # one tile spans the row
            nr = columns
        else:
            nr = _largest_divisor(columns, (self.nr, 32, VECTOR_LANES, 8, 4))
        kc = _largest_divisor(_extent(sch, k), (self.kc, 128, 64))
        if dot and nr % VECTOR_LANES:  # a dot instruction fills whole vectors (our panels are 64 columns wide)
            return None
        io, ii = sch.split(i, [None, mr])
        if not whole_panels:
            jo, ji = sch.split(j, [None, nr])
        ko, ki = sch.split(k, [None, kc])
        inner = []
        if dot and dot[2] > 1:  # the K values of one lane of the instruction, innermost
            ki, kk = sch.split(ki, [None, dot[2]])
            inner = [kk]
        # A linear kernel's tiles go row tile by row tile over a few panels at a time (`row_panels`), not panel by
        # panel down every row: a row tile's 4 output rows are then written 1 KB at a time instead of 256 bytes,
        # and its activations are read from L1 for the panels after the first. int8 at K 1024 (qkv_proj, gate_up),
        # `[252, K] x [K, N]`, 2 threads on the Zen4 host, alternating: 1.07-1.10x at N 4096 and 6144 (1.08x with
        # SiLU * up), 1.00-1.02x at K 2048 and 3072; bf16 1.03-1.04x at K 1024; the same at 28 to 1024 rows.
        blocks = _largest_divisor(_extent(sch, jo), (self.row_panels, 2)) if dot and not batched else 1
        jb, jo = sch.split(jo, [None, blocks]) if blocks > 1 else (None, jo)
        sch.reorder(*spatial[:-2], *([jb, io, jo] if jb else [jo, io]), ko, ki, ii, *halves, ji, *inner)
        for half in halves:
            sch.unroll(half)
        if batched:  # parallel over (sequence, head); a padded operand is copied once per head, not per tile
            outer = sch.fuse(*spatial[:-2])
            tile = io
            for pad in padding:
                sch.compute_at(pad, outer)
                self._vectorize_innermost(sch, pad)
        elif jb:  # parallel over (panel block, row tile), each tile one panel of the block in turn
            outer, tile = sch.fuse(*spatial[:-2], jb, io), jo
        else:
            outer = tile = sch.fuse(*spatial[:-2], jo, io)
        sch.parallel(outer)
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, tile)
        sch.unroll(ii)
        lanes = _largest_divisor(nr, (VECTOR_LANES, 8))
        if lanes > 1:
            jv, jl = sch.split(ji, [None, lanes])
            sch.unroll(jv)
            if not dot:
                sch.vectorize(jl)
        else:
            sch.vectorize(ji)
        init = sch.decompose_reduction(block, ko)  # zero-init the accumulator tile once, outside the reduction loop
        if dot:
            intrinsic, llvm, _ = dot
            sch.vectorize(sch.get_loops(init)[-1])
            sch.tensorize(jl, intrinsic)
            sch.annotate(outer, "pragma_import_llvm", llvm)
        # Write-back of the accumulator tile, then the epilogue on that tile while it is still in cache; a linear
        # kernel's epilogue reads the accumulators themselves (below).
        self._vectorize_innermost(sch, accumulator)
        for e in epilogue:
            self._epilogue_at(sch, e, tile)
        if dot and epilogue:  # the epilogue reads the accumulators where they are: no [rows, N] int32/fp32 copy
            sch.compute_inline(accumulator)
        return sch

    @staticmethod
    def _epilogue_at(sch, epilogue, tile, stored: bool = False) -> None:
        """Compute `epilogue` on each `tile` of the product, vectorized: GLU's two halves unrolled inside its columns,
        or, from a `stored` product (AMX's tiles), around them: TVM cannot reorder loops whose block it placed
        under a predicate it cannot analyse (rows of a symbolic batch: `_amx_tiles`), and vectorizes the columns
        with the halves' loop inside them as well (int8 `[252, 1024] x [1024, 6144]`: 0.86-0.91 ms with SiLU * up,
        0.87-0.90 without)."""
        sch.reverse_compute_at(epilogue, tile)
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(epilogue).iter_vars):  # GLU's halves
            *_, columns_loop, halves_loop = sch.get_loops(epilogue)
            sch.unroll(halves_loop)
            if stored:
                sch.vectorize(columns_loop)
                return
            sch.reorder(halves_loop, columns_loop)
        Matmul._vectorize_innermost(sch, epilogue)

    @staticmethod
    def _amx_tiles(func, name: str, epilogue: list[str], kind: str, k_per_element: int):
        """One AMX micro-kernel call per tile of 16 rows x a few weight panels (`tvm_amx.panels_per_call`) over the
        whole K, parallel over tiles (a panel group's row tiles in turn, its panels in cache), each tile's epilogue
        right after it (the rows asked for out of whole tiles, dequantized, plus a residual or SiLU * up). A GLU
        kernel's product is `[rows, panels, 2, 32]` (`tvm_compile.panel_product`): the same memory as `[rows, 64 *
        panels]`, so the same micro-kernel.

        The schedule runs without TVM's checks: they require the whole tiles of rows the matmul computes to cover
        the rows its epilogue reads, which they do, but which TVM cannot prove for a symbolic batch (its region
        analysis gives up on `(batch * SEQ + 15) // 16 * 16`)."""
        sch = s_tir.Schedule(func, enable_check=False)
        _one_output_stage(sch, [sch.get_sblock(e) for e in epilogue])
        block = sch.get_sblock(name)
        *spatial, k = sch.get_loops(block)
        glu = len(spatial) == 4
        if len(spatial) not in (2, 4) or _largest_divisor(sch.get(spatial[0]).extent, (tvm_amx.TILE_ROWS,)) == 1:
            return None
        columns = _extent(sch, spatial[1]) or 0
        if not glu and columns % PANEL:
            return None
        k_values = _extent(sch, k) * k_per_element
        panels = tvm_amx.panels_per_call(columns if glu else columns // PANEL, k_values, kind)
        rows = sch.split(spatial[0], [None, tvm_amx.TILE_ROWS])
        groups = sch.split(spatial[1], [None, panels if glu else PANEL * panels])
        sch.reorder(groups[0], rows[0], rows[1], groups[1], *spatial[2:], k)
        tile = sch.fuse(groups[0], rows[0])
        sch.parallel(tile)
        if epilogue:
            Matmul._epilogue_at(sch, sch.get_sblock(epilogue[-1]), tile, stored=True)
        sch.tensorize(rows[1], tvm_amx.register(kind, k_values, panels, glu))
        sch.annotate(tile, "pragma_import_llvm", tvm_amx.micro_kernel_llvm(kind))
        return sch

    @staticmethod
    def _batched(sch, block) -> bool:
        """Whether the matmul is one per batch index (attention: both operands have the output's leading axes), not
        one weight panel per leading index applied to shared rows (an fp16 linear layer)."""
        out = sch.get(block).writes[0].source.shape
        lead = len(out) - 2
        return lead > 0 and all(len(r.source.shape) == len(out) and
                                all(Analyzer().can_prove_equal(a, b) for a, b in zip(r.source.shape[:lead], out[:lead]))
                                for r in sch.get(block).reads)

    @staticmethod
    def _pad_columns(sch, block) -> tuple[list, list] | None:
        """Pad a batched matmul's columns with `pad_einsum`: to 8-lane vectors up to ROW_TILE_COLUMNS (where a 16-lane
        vector would be mostly padding), else to whole register tiles: 64 columns where that adds at most a quarter,
        else 32. A tile of 16 columns holds 4 accumulators, too few to hide the FMA latency: QK^T at `[48 heads, 260,
        128] x [128, N]` ran 9.8 ms at N 272 (16-column tiles), 9.4 at 288 (32), 7.9 at 320 (64); at 144 rows, 2.50
        ms at 144, 2.08 at 160, 2.33 at 192. Returns (the new blocks copying its operands into padded buffers, every
        block after the matmul: its epilogue, starting with the crop of the padded output); None if the columns
        already fit, or if TVM cannot pad this block."""
        *spatial, _ = sch.get_loops(block)
        columns = _extent(sch, spatial[-1]) or 0
        multiple = column_multiple(columns, 8)
        if not columns or columns % multiple == 0:
            return None
        name = sch.get(block).name_hint
        before = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
        try:
            sch.pad_einsum(block, [1] * (len(spatial) - 1) + [multiple, 1])
        except Exception:  # noqa: BLE001  (TVM's own checks: e.g. an operand read through an inlined prologue)
            return None
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        names = [sch.get(b).name_hint for b in blocks]
        position = names.index(name)  # pad_einsum keeps the block's name
        copies = [b for b, n in zip(blocks[:position], names[:position]) if n not in before]
        return copies, blocks[position + 1:]

    @staticmethod
    def _vectorize_innermost(sch, block, unroll: bool = False):
        """Vectorise the block's innermost loop in whole vectors; with `unroll`, unroll a short row's vectors
        (`_unroll_short_row`)."""
        if not _vectorizable(sch, block):
            return
        inner = sch.get_loops(block)[-1]
        ext = _extent(sch, inner)
        lanes = _largest_divisor(ext, (VECTOR_LANES, 8, 4))
        if lanes > 1:
            chunks, v = sch.split(inner, [None, lanes])
            sch.vectorize(v)
            if unroll:
                _unroll_short_row(sch, block, chunks)


class RowReduction(dl.ScheduleRule):
    """RMSNorm: reductions along the last axis of each row, then elementwise work on the row; or a row reduction
    alone (int8's per-token max |x|).

    dlight's cpu.Reduction leaves each row reduction a serial scalar chain (one add's latency per element: the
    slowest part of attention at SEQ 512; int8's max |x| ran at 11 GB/s). Here every reduction is first split into
    16 vector lanes with rfactor (`partial[row, lane]`, vectorised), the 16 partials are combined per row, and all
    blocks are computed per row under one parallel loop."""

    @override
    def apply(self, func, target: Target, _):
        analyzed = _analyze(func)
        if analyzed is None:
            return None
        sch, infos = analyzed
        if len(infos) == 1 and not infos[0].is_injective():
            return self._reduction_alone(sch, infos[0])
        if len(infos) < 2 or not infos[-1].is_injective() or all(b.is_injective() for b in infos):
            return None
        # Only the plain shape: every block has the rank of the output, reductions over its last axis alone.
        # (Mixed ranks, e.g. a keep-dims reduction next to a 1-D weight cast, broke the row mapping: dlight takes
        # those.)
        rank = len(infos[-1].dom_kind())
        row_value = "S" * (rank - 1)  # one value per row (RMSNorm's 1/sqrt), computed once under the row loop
        if any(b.dom_kind() not in ("S" * rank, row_value + "R", row_value) for b in infos):
            return None
        lead = rank - 1
        partials = []
        for b in infos:
            if b.is_injective():
                continue
            partial = _lane_partials(sch, b.block_rv)
            if partial is None:
                return None
            partials.append(partial)
        loops = sch.get_loops(infos[-1].block_rv)
        rows = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
        sch.parallel(rows)
        producers = [b for b in sch.get_child_blocks(sch.get_sblock("root"))][:-1]
        for block in reversed(producers):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        partial_names = {sch.get(p).name_hint for p in partials}
        for block in sch.get_child_blocks(rows):
            if sch.get(block).name_hint in partial_names:
                # compute_at regenerated them in iter-var order, with unit loops for the row's own axes
                lane, chunk = [loop for loop in sch.get_loops(block) if _extent(sch, loop) != 1][-2:]
                sch.reorder(chunk, lane)
                sch.vectorize(lane)
            elif all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars) \
                    and len(sch.get(block).iter_vars) == rank:
                # a head's vectors unrolled: RoPE's rotate-half in q's and k's norm kernels vectorises
                Matmul._vectorize_innermost(sch, block, unroll=True)
        return sch

    @staticmethod
    def _reduction_alone(sch, info):
        """One reduction over the last axis of each row, written as 16 vectorised partials per row, then combined."""
        kinds = info.dom_kind()
        if kinds != "S" * (len(kinds) - 1) + "R" or len(kinds) < 2:
            return None
        partial = _lane_partials(sch, info.block_rv)
        if partial is None:
            return None
        *partial_rows, _, partial_lane = sch.get_loops(partial)
        row = sch.fuse(*partial_rows) if len(partial_rows) > 1 else partial_rows[0]
        sch.parallel(row)
        sch.vectorize(partial_lane)
        sch.reverse_compute_at(info.block_rv, row)
        return sch


class Softmax(dl.ScheduleRule):
    """`tvm_compile.softmax_rows`, recognised by its block names: all blocks per row under one parallel loop, the
    partials' 16 lanes vectorised, and the row's elementwise passes (exp, scaling) in whole vectors with the tail of
    a row that is not whole vectors (SEQ 260: 4 elements) as a shorter vector of its own."""

    BLOCKS = ("softmax_max_lanes", "softmax_max", "softmax_shifted", "T_fast_exp", "softmax_sum_lanes", "softmax_sum",
              "softmax")

    @override
    def apply(self, func, target: Target, _):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
        if tuple(names) != self.BLOCKS:
            return None
        sch.compute_inline(sch.get_sblock("softmax_shifted"))
        out = sch.get_sblock("softmax")
        *row_loops, _ = sch.get_loops(out)
        rows = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
        sch.parallel(rows)
        for name in reversed(self.BLOCKS[:-1]):
            if name != "softmax_shifted":
                sch.compute_at(sch.get_sblock(name), rows, preserve_unit_loops=True)
        for name in ("softmax_max_lanes", "softmax_sum_lanes"):
            lane, vector = sch.get_loops(sch.get_sblock(name))[-2:]
            sch.reorder(vector, lane)
            sch.vectorize(lane)
        for block in (sch.get_sblock("T_fast_exp"), out):
            row = sch.get_loops(block)[-1]
            if _extent(sch, row) < VECTOR_LANES:  # bf16 pairs of a row under 32 (`softmax_rows(pairs=True)`)
                sch.vectorize(row)
                continue
            tail = _extent(sch, row) % VECTOR_LANES
            whole, *rest = sch.loop_partition(row, [_extent(sch, row) - tail, None]) if tail else [row]
            sch.vectorize(sch.split(whole, [None, VECTOR_LANES])[1])
            for loop in rest:
                sch.vectorize(loop)
        return sch


class Elementwise(dl.ScheduleRule):
    """Fallback for injective functions: each block's loops fused, split, parallel outer, vectorised inner."""

    @override
    def apply(self, func, target: Target, _):
        analyzed = _analyze(func)
        if analyzed is None:
            return None
        sch, infos = analyzed
        # Producers are inlined into their consumers: one pass over memory for the whole function instead of one
        # per op, each materialising its intermediate (SiLU*up was 10 passes over [tokens, 3072], RoPE 8). Not into
        # a transpose of the innermost axis (K^T): its vector lanes would gather; it reads the producer's output.
        for b in infos[:-1]:
            if not _read_along_innermost_axis(sch, b.block_rv):
                continue
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001  (a reduction, or a block whose output is also returned)
                pass
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            self.schedule_block(sch, block)
        return sch

    @staticmethod
    def schedule_block(sch, block):
        """Fuse the block's loops, parallelise the outer part and vectorise the inner lanes."""
        loops = sch.get_loops(block)
        if not loops:
            return
        spatial = [iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars]
        if not all(spatial):  # a reduction no other rule took: parallel over its leading spatial loops only
            lead = spatial.index(False)
            if lead:
                sch.parallel(sch.fuse(*loops[:lead]) if lead > 1 else loops[0])
            return
        innermost = _extent(sch, loops[-1])
        width = _largest_divisor(innermost, (VECTOR_LANES, 8, 4))
        if width > 1 and _vectorizable(sch, block):
            # vector lanes along the innermost axis alone: every access is a plain vector load, where lanes of a
            # fused index went through div/mod and could gather (RoPE's rotate-half reads); narrower vectors where
            # the axis is not whole 16-lane ones (K^T's SEQ columns: 28)
            chunks, lanes = sch.split(loops[-1], [None, width])
            rows = [_extent(sch, loop) for loop in loops[:-1]]
            # parallel over rows, a row's vectors in a serial loop (index math hoisted), unless rows are too few
            # (symbolic rows, batch * SEQ tokens, are taken to be many)
            if None in rows or math.prod(rows) >= 64:
                sch.parallel(sch.fuse(*loops[:-1]))
                _unroll_short_row(sch, block, chunks)
            else:
                sch.parallel(sch.fuse(*loops[:-1], chunks))
            sch.vectorize(lanes)
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


class DlightReduction(dl.cpu.Reduction):
    """dlight's CPU reduction rule, minus functions that store bools (it would vectorise those stores)."""

    @override
    def apply(self, func, target: Target, tunable):
        analyzed = _analyze(func)
        if analyzed is None or not all(_vectorizable(analyzed[0], b.block_rv) for b in analyzed[1]):
            return None
        return super().apply(func, target, tunable)


def cpu_rules():
    """Our CPU rules, in the order they are tried."""
    return [Matmul(), Softmax(), RowReduction(), DlightReduction(), Elementwise()]


def unscheduled(mod) -> list[str]:
    """Names of PrimFuncs that no rule scheduled."""
    return sorted(gv.name_hint for gv, f in mod.functions.items()
                  if isinstance(f, tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled", False)))
