"""int8 artifacts (W8A8, int32 accumulation): calibrate on real text, smooth the outlier channels, keep out of int8
the linear layers int8 would still break (this module: the `QuantizationPlan`), then quantize: the exported graph's
linear weights, one at a time, into the graph ONNX Runtime's own tool writes (`onnx_quantize`), or (TVM) as `tvm_int8`
packs them at compile.

- The model calibrated and exported is the fp16-weight one, computing in fp32 as an fp16 artifact does: no fp32 copy
  of the weights is ever made (the build's peak is about the fp16 model's), and what is not quantized stays as an
  fp16 artifact has it (fp16 weights, fp32 compute), measured as exact (min cosine 1.000000 against HF fp32).
- Weights: int8 per output channel. Activations: int8 with a dynamic scale, per tensor on ONNX Runtime
  (`DynamicQuantizeLinear`, fused into `DynamicQuantizeMatMul`; per token with `activation_scales: row`), per token
  on TVM: VNNI `vpdpbusd` (or AMX `tdpbusd`)
  on CPU. ONNX Runtime's weights are stored as uint8 (zero point 128) where its uint8 x int8 matmul would saturate
  (x86 without VNNI: `host.int8_full_range_exact`): its uint8 x uint8 matmul is exact there, with the same 255
  levels.
- Outliers: real LLMs carry 20-100x channels at the inputs of linear layers; a per-tensor activation scale spends its
  256 levels on them. SmoothQuant (Xiao et al. 2023) moves that range into the weights with a per-input-channel factor
  `s = max|X|^alpha / max|W|^(1-alpha)`, folded into the preceding RMSNorm weight (q/k/v, gate/up) or into the up
  projection's rows (down); `o_proj` is left alone (its input channels are shared across grouped-query heads).
- Weights are rounded by GPTQ (Frantar et al. 2023; `weight_rounding: gptq`, the default) onto the same per-channel
  grid the backends compute: each column's rounding error is compensated in the columns not yet rounded, weighted by
  the layer's calibration inputs, so the layer's output moves less than with each weight rounded to nearest. The
  backends then round the stored weights again and get the same integers. On the 0.6B-shape outlier reranker the
  weights' share of the error fell 5.6x (max |dP(yes)| with fp32 activations 0.0128 -> 0.0023), the whole model's
  from 0.0173 to between 0.0088 and 0.0197 (fake int8, the bundled calibration and holdout records): GPTQ's outcome
  moves with 1e-3 changes of the inputs' X^T X, so int8 at the gate's edge passes or fails by the draw.
- After smoothing and rounding, each linear layer's int8 error is measured on the calibration rows (fake quantization
  in torch, as the artifact rounds); layers above `max_linear_error` are kept (`keep_fp32`: fp32 compute, fp16
  weights). Errors compound through the depth, so the whole model then runs in fake int8 on those rows and on the
  gate's edge cases: while it uses more than half the int8 gate's error budget, whole decoder layers are kept too,
  the one whose int8 error moves the residual stream most first (per token, relative: the first layers, whose error
  meets a small residual stream and passes through every later one), as long as that cuts the error (the gate itself
  runs on the compiled artifact, also on texts calibration never saw). What was kept and why goes into the manifest.
- The embedding table (a gather, no arithmetic), the norms and the reranker's yes/no head keep fp16 weights.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.errors import ToolkitError
from toolkit.patches.modeling_qwen3 import Linear, Qwen3ForDeployment
from toolkit.progress import progress_bar
from toolkit.tasks import Task
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID
from toolkit.validation import validation_rows

DEFAULT_CALIBRATION = Path(__file__).parent / "data" / "calibration.jsonl"
CALIBRATION_BATCH = 16
# Before compiling, the whole model in fake int8 may use this share of the int8 gate's error budget on the calibration
# rows and the gate's edge cases (the rest is margin for unseen text); over it, one more decoder layer (the one adding
# the most error to the residual stream) stays fp32, at most PREFLIGHT_ROUNDS checks, for as long as each round cuts
# the share used to PREFLIGHT_GAIN of the best so far. Whole layers: keeping part of one leaves the rest's error
# without its counterpart (0.6B outlier reranker, fake int8 on held-out texts: layer 0 kept, mean |dP| 0.0035 ->
# 0.0030; its down_proj or o_proj alone, 0.0044 or 0.0051); and not the linear layers of largest own error (there the
# down_proj of layers 0-3: 0.0054)
PREFLIGHT_BUDGET, PREFLIGHT_ROUNDS, PREFLIGHT_GAIN = 0.5, 4, 0.9
# GPTQ's damping (a share of the inputs' mean square added to the Hessian's diagonal) and its column block (the
# paper's lazy batch updates), as in its reference implementation
GPTQ_DAMP, GPTQ_BLOCK = 0.01, 128
WEIGHT_MAX = 127  # int8 weights span [-127, 127]: symmetric, as ONNX Runtime's quantizer and our TVM kernels take them


@dataclass(frozen=True)
class CalibrationSet:
    """(query, document) records of real text: `calibration` ones set the quantization, `holdout` ones only check it."""

    path: Path
    calibration: list[tuple[str, str]]
    holdout: list[tuple[str, str]]
    sha256: str

    @classmethod
    def load(cls, path: str | Path | None = None, named_by: str | None = None) -> "CalibrationSet":
        """Read a calibration JSONL (`{"query", "document", "split": "calibration"|"holdout"}` per line); `named_by`:
        where a missing `path` was given (a config key), for the error. Another file than the bundled one is gated on
        its held-out records and the bundled ones, so a gate never rests on a handful of texts (a file with one
        held-out record built): those that calibration saw are left out; a held-out record of the file that is also a
        calibration record is refused."""
        path = Path(path).resolve() if path else DEFAULT_CALIBRATION  # the manifest records it: from any directory
        if not path.is_file():
            raise ToolkitError(f"calibration file {path} not found; " + (
                f"fix {named_by}" if named_by else "pass --calibration FILE (JSONL with query, document and split per "
                "line) or leave it out for the bundled set"))
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ToolkitError(f"{path} is not UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); save it as "
                               "UTF-8") from None
        splits: dict[str, dict] = {"calibration": {}, "holdout": {}}  # dicts: in order, without repeats
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records = splits[row.get("split", "calibration")]
                record = (row["query"], row["document"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ToolkitError(f"{path}:{number}: expected a JSON object with `query`, `document` and `split` "
                                   "(calibration or holdout)") from None
            for key, value in zip(("query", "document"), record):
                if not isinstance(value, str):  # str(None) would calibrate on "None"
                    raise ToolkitError(f"{path}:{number}: `{key}` must be a string, got {json.dumps(value)}")
            records.setdefault(record, number)
        calibration, holdout = list(splits["calibration"]), list(splits["holdout"])
        leaked = [(number, splits["calibration"][record]) for record, number in splits["holdout"].items()
                  if record in splits["calibration"]]
        if leaked:
            raise ToolkitError(f"{path}:{leaked[0][0]}: this holdout record is also the calibration record of line "
                               f"{leaked[0][1]} ({len(leaked)} such in all): the gate checks texts calibration never "
                               "saw; drop one of each")
        if not calibration or not holdout:
            raise ToolkitError(f"{path} needs both `calibration` and `holdout` records (the gate checks texts "
                               "calibration never saw)")
        if path != DEFAULT_CALIBRATION:
            holdout += [r for r in cls.load().holdout if r not in splits["calibration"] and r not in splits["holdout"]]
        return cls(path, calibration, holdout, hashlib.sha256(data).hexdigest())

    def rows(self, task: Task, tokenizer, split: str, max_length: int, instruction: str | None = None
             ) -> list[list[int]]:
        """The split's records as this task's token rows (the API's formats, with a build's fixed `instruction`), cut
        to `max_length`."""
        from toolkit.api import token_rows

        # without repeats: an embedding of a query with several passages, or a record the bundled set also holds
        bodies = list(dict.fromkeys(task.calibration_bodies(getattr(self, split), instruction)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # long passages are cut to the largest SEQ, as the runtime would
            return token_rows(task.prompt(tokenizer), tokenizer, bodies, max_length, truncation="truncate")

    def describe(self) -> dict:
        """For the manifest."""
        return {"file": str(self.path), "sha256": self.sha256, "calibration_records": len(self.calibration),
                "holdout_records": len(self.holdout), "holdout_includes_bundled": self.path != DEFAULT_CALIBRATION}


def _weight_row_scales(w: torch.Tensor) -> torch.Tensor:
    """The `[N]` int8 scales of a `[N, K]` weight (rows = output channels): `max|w| / WEIGHT_MAX` per row."""
    return torch.clamp(w.abs().amax(dim=1) / WEIGHT_MAX, min=1e-12)


def _on_weight_grid(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`w` rounded to the nearest of its int8 levels at `scale` (clamped to +-WEIGHT_MAX), as `scale * integer`."""
    return torch.clamp(torch.round(w / scale), -WEIGHT_MAX, WEIGHT_MAX) * scale


def _fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """What `DynamicQuantizeLinear` does to a tensor: uint8, one asymmetric scale for the whole tensor."""
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=1e-12)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_quant_activation_per_token(x: torch.Tensor) -> torch.Tensor:
    """What `tvm_int8.quantize_rows` does: int8, symmetric, one scale per token (row)."""
    scale = torch.clamp(x.abs().amax(dim=-1, keepdim=True) / 127.0, min=1e-30)
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


@dataclass(frozen=True)
class Int8Scheme:
    """How a backend's int8 linear layers round: activations with one scale per token (TVM's VNNI kernel) or per
    tensor (ONNX Runtime's `DynamicQuantizeLinear`); weights symmetric per output channel to +-WEIGHT_MAX, stored as
    int8, or (`unsigned_weights`) as uint8 with zero point 128 where ONNX Runtime's uint8 x int8 matmul would saturate
    (`host.int8_full_range_exact`): the same values, multiplied by its exact uint8 x uint8 matmul. Its other remedy,
    7-bit weights (`reduce_range`), doubles the weights' rounding error: on the 4B-shape outlier checkpoint the whole
    model in fake int8 used 132% of the gate's error budget with 7-bit weights, 76% with 8-bit ones."""

    per_token: bool
    unsigned_weights: bool = False

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the backend rounds it."""
        return _fake_quant_activation_per_token(x) if self.per_token else _fake_quant_activation(x)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """`w` (rows = output channels) as the backend rounds it."""
        return _on_weight_grid(w, _weight_row_scales(w)[:, None])

    @property
    def weight_type(self) -> str:
        """How the weights are stored (the manifest's `weight_type`)."""
        return "uint8" if self.unsigned_weights else "int8"

    @property
    def weight_grid(self) -> str:
        """How the stored weights are scaled (and, as uint8, offset)."""
        return "per output channel" + (", zero point 128" if self.unsigned_weights else "")

    @property
    def scale_granularity(self) -> str:
        """What one dynamic activation scale covers: a "token" (row) or the whole "tensor"."""
        return "token" if self.per_token else "tensor"

    @property
    def onnx_kernel(self) -> str:
        """ONNX Runtime's kernel for its linear layers (`onnx_quantize`'s nodes as ONNX Runtime loads them)."""
        return "MatMulInteger" + ("" if self.per_token else ", fused into DynamicQuantizeMatMul")

    def describe(self) -> str:
        """For the manifest."""
        shifted = " (int8 values shifted into uint8: exact on CPUs without VNNI)" if self.unsigned_weights else ""
        return (f"W8A8: {self.weight_type} weights {self.weight_grid}{shifted}, int8 activations with a dynamic "
                f"per-{self.scale_granularity} scale, int32 accumulation")


TVM_INT8 = Int8Scheme(per_token=True)


def int8_scheme(backends, activation_scales: str = "tensor") -> Int8Scheme:
    """The rounding int8 layers are calibrated for: ONNX Runtime's on this machine where an ONNX artifact is built
    (its per-tensor scales err more, so layers fit for it fit TVM too; the gate runs here, so the artifact is for
    CPUs like this one), else TVM's. `activation_scales` "row": ONNX Runtime's activations get a scale per token too
    (`onnx_quantize.quantize_onnx`)."""
    from toolkit.host import int8_full_range_exact

    if "onnx" not in backends:
        return TVM_INT8
    return Int8Scheme(per_token=activation_scales == "row", unsigned_weights=not int8_full_range_exact())


class _Rows:
    """Calibration rows in batches of similar lengths, left-padded as the runtime pads them, run through the model one
    decoder layer at a time: every batch through layer i, then through layer i+1. Only that layer's weights are
    resident (a streamed model reads them from the checkpoint for it: the model is never held whole); they are upcast
    and rounded once per pass instead of once per batch, and a layer can be changed (smoothed) between its statistics
    and its use. Holds every row's hidden states (fp32 rows x length x hidden: 40 MB at 0.6B, 150 MB at 8B)."""

    def __init__(self, model: Qwen3ForDeployment, rows: list[list[int]]):
        self.model, self.count = model, len(rows)
        ordered = sorted(rows, key=len)
        self.inputs = []  # per batch: (embedded tokens, RoPE's tables, mask)
        with torch.no_grad(), model.resident("embed_tokens."):
            for start in range(0, len(ordered), CALIBRATION_BATCH):
                chunk = ordered[start:start + CALIBRATION_BATCH]
                ids, mask = left_pad(chunk, max(map(len, chunk)), ENDOFTEXT_ID)
                self.inputs.append(model.prepare(torch.from_numpy(ids), torch.from_numpy(mask)))

    def through(self, layer, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every batch's hidden `states` through one decoder `layer`, as the model runs it (`run_layer`: the last one at
        the last position alone, so its linear layers are calibrated on the rows the artifact computes)."""
        with torch.no_grad():
            return [self.model.run_layer(layer, x, rotary, mask)
                    for x, (_, rotary, mask) in zip(states, self.inputs)]

    def run(self, desc: str, around_layer) -> np.ndarray:
        """The model's raw outputs for the rows (shortest first). `around_layer(name, layer, states)` is a context
        entered around each layer's run, `states` being that layer's inputs; what it yields, if not None, is called
        with the layer's outputs."""
        states = [x for x, *_ in self.inputs]
        for i, layer in enumerate(progress_bar(self.model.layers, desc=desc, unit="layer")):
            with self.model.resident(f"layers.{i}."), around_layer(f"layers.{i}.", layer, states) as outputs_seen:
                states = self.through(layer, states)
                if outputs_seen is not None:
                    outputs_seen(states)
        with torch.no_grad(), self.model.resident("norm.", "yes_no_head"):
            return np.concatenate([self.model.finish(x).float().numpy() for x in states])

    def token_error(self, approx: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
        """How far one layer's outputs `approx` are from `exact` (both as `through` returns them): per real token, the
        distance over the hidden size relative to the exact vector, averaged. Per token, because the residual stream
        of a few delimiter tokens is 100x the others' (massive activations) and would drown them in one norm."""
        total, count = 0.0, 0
        for a, e, (*_, mask) in zip(approx, exact, self.inputs):
            real = mask[:, 0, -1, -e.shape[1]:] == 0  # the keys the last position sees: the row's tokens, not padding
            distance = (a - e).norm(dim=-1) / e.norm(dim=-1).clamp(min=1e-30)
            total, count = total + float(distance[real].sum()), count + int(real.sum())
        return total / count


def _linears(prefix: str, layer) -> dict[str, Linear]:
    """The Linears of one decoder `layer` by their model-wide names (`prefix` + their name in it)."""
    return {f"{prefix}{name}": m for name, m in layer.named_modules() if isinstance(m, Linear)}


class _LinearProbe:
    """Forward hooks on one decoder layer's Linears at a time: per-input-channel max |x|, optionally the inputs'
    `X^T X` (GPTQ's Hessian) and the int8 error of their outputs, summed over the rows seen."""

    def __init__(self, scheme: Int8Scheme = TVM_INT8):
        self.scheme = scheme
        self.absmax: dict[str, torch.Tensor] = {}
        self.hessians: dict[str, torch.Tensor] = {}
        self.err: dict[str, float] = {}
        self.ref: dict[str, float] = {}

    @contextmanager
    def watching(self, prefix: str, layer, measure_error: bool, hessians: bool = False,
                 exact: dict[str, torch.Tensor] | None = None):
        """Within the block, record the Linears of `layer` (named `prefix` + their name in it). A linear layer named
        in `exact` has had its weight rounded already: its error is measured against that weight, as it was."""
        linears = _linears(prefix, layer)
        rounded = {name: self.scheme.weight(m.weight.float()) for name, m in linears.items()} if measure_error else {}

        def hook(name, module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            amax = x.abs().amax(dim=0)
            self.absmax[name] = torch.maximum(self.absmax[name], amax) if name in self.absmax else amax
            if hessians:
                xf = x.float()
                self.hessians[name] = self.hessians[name] + xf.T @ xf if name in self.hessians else xf.T @ xf
            if measure_error:
                approx = self.scheme.activation(x) @ rounded[name].T
                target = x @ exact[name].to(x.dtype).T if name in (exact or {}) else output.reshape(approx.shape)
                self.err[name] = self.err.get(name, 0.0) + float((approx - target).pow(2).sum())
                self.ref[name] = self.ref.get(name, 0.0) + float(target.pow(2).sum())

        handles = [m.register_forward_hook(partial(hook, name)) for name, m in linears.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def errors(self) -> dict[str, float]:
        """Relative int8 error of each linear's output over the rows seen: ||ŷ - y|| / ||y||."""
        return {name: (self.err[name] / self.ref[name]) ** 0.5 if self.ref[name] else 0.0 for name in self.err}


@contextmanager
def _fake_quantized(prefix: str, layer, names: set[str], scheme: Int8Scheme):
    """Within the block, the Linears of `layer` whose names (`prefix` + their name in it) are in `names` compute in
    fake int8 (weights and activations rounded as the artifact rounds them), so the model's outputs are what the int8
    artifact would give. Each weight is rounded once for the block."""
    replaced = []
    for name, module in _linears(prefix, layer).items():
        if name in names:
            weight, bias = scheme.weight(module.weight.float()), module.bias
            module.forward = partial(lambda x, w, b: F.linear(scheme.activation(x), w, b), w=weight,
                                     b=None if bias is None else bias.float())
            replaced.append(module)
    try:
        yield
    finally:
        for module in replaced:
            del module.forward  # the class's forward again


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """`weight` (`[N, K]`, rows = output channels) on the int8 grid the backends use (per row: `max|w| / WEIGHT_MAX`),
    rounded by GPTQ for inputs whose `X^T X` is `hessian` (`[K, K]`): returns `scale * integer`, fp32.

    Columns go in order of decreasing input energy (the paper's act-order: the loud channels' errors are spread over
    the quiet ones, not the reverse); on the 0.6B-shape outlier reranker it cut the weights' error to 0.0023 from
    0.0038 in order. Each row keeps its largest weight at +-WEIGHT_MAX, so a backend that computes the scale from the
    stored values gets this one and the same integers."""
    order, weight = torch.argsort(hessian.diagonal(), descending=True), weight.float()
    scale = _weight_row_scales(weight)
    columns = weight[:, order].T.contiguous()  # [K, N]: a column's weights contiguous, as they are updated
    rows = columns.shape[1]
    peak_column = columns.abs().argmax(dim=0)
    peak = torch.sign(columns[peak_column, torch.arange(rows)]) * WEIGHT_MAX * scale
    inverse = _upper_cholesky_of_inverse(hessian, order).float()
    rounded = torch.empty_like(columns)
    for start in range(0, len(columns), GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, len(columns))
        block, errors = columns[start:end], torch.empty(end - start, rows)
        for i, j in enumerate(range(start, end)):
            rounded[j] = torch.where(peak_column == j, peak, _on_weight_grid(block[i], scale))
            errors[i] = (block[i] - rounded[j]) / inverse[j, j]
            block[i:].addr_(inverse[j, j:end], errors[i], alpha=-1)
        columns[end:].addmm_(inverse[start:end, end:].T, errors, alpha=-1)
    return rounded.T[:, torch.argsort(order)]


def _upper_cholesky_of_inverse(hessian: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """U (upper triangular, float64) with (H + damping)^-1 = U^T U, H being `hessian` with its channels in `order`.

    Damped: a channel calibration never saw (a zero row and column) is rounded to nearest, its error not spread. One
    factorization and one triangular inverse: if J reverses the channels and J H J = L L^T, then U = J L^-1 J. In
    float64: outlier channels carry thousands of times the others' energy."""
    reversed_order = order.flip(0)
    flipped = hessian[reversed_order][:, reversed_order].double()
    flipped.diagonal().add_(GPTQ_DAMP * flipped.diagonal().mean().clamp(min=1e-12))
    lower = torch.linalg.cholesky(flipped)
    del flipped
    return torch.linalg.solve_triangular(lower, torch.eye(len(lower), dtype=lower.dtype), upper=False).flip(0, 1)


def round_weights(prefix: str, layer, hessians: dict[str, torch.Tensor], divisors: dict[str, torch.Tensor], weights,
                  scratch: Path | None) -> dict[str, torch.Tensor]:
    """GPTQ (`gptq_round`) on the linear layers of one resident decoder layer (named `prefix`), from their inputs'
    `X^T X` on the calibration rows (`hessians`, taken by name) before smoothing divided those inputs by `divisors`
    (`smooth`'s factors): the rounded values replace the weights, in place and in `weights`
    (`PatchedWeights.replace`, kept in `scratch`), so the export writes them. Returns the weights as they were."""
    before = {}
    for name, module in _linears(prefix, layer).items():
        hessian, divisor = hessians.pop(name), divisors.get(name)
        if divisor is not None:  # the smoothed inputs are x / s: their X^T X is H / (s s^T)
            hessian = hessian / divisor[:, None] / divisor[None, :]
        rounded = gptq_round(module.weight, hessian).to(module.weight.dtype)
        weights.replace(f"{name}.weight", rounded, scratch)
        before[name], module.weight.data = module.weight.data, rounded
    return before


def smooth(prefix: str, layer, absmax: dict[str, torch.Tensor], alpha: float, weights) -> dict[str, torch.Tensor]:
    """SmoothQuant on one resident decoder layer (named `prefix`): its factors folded into its weights (computed in
    fp32, stored in the weights' dtype), in place and as adjustments of `weights` (`PatchedWeights`), so every later
    read of the layer, and the export, is smoothed. The layer's function is unchanged but for that storage's
    rounding. Returns what each smoothed linear layer's inputs are now divided by: for q/k/v and gate/up, the ratio
    of their norm's weight before and after, as stored (for q/k/v the exact ratio of its inputs); for down, s. The
    later linears' inputs also move with the fp16 rounding of the weights before them (1e-4 to 1e-3 of their X^T X
    on the 0.6B outlier reranker)."""
    def factor(x_max: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w_max = weight.float().abs().amax(dim=0).clamp(min=1e-5)
        return (x_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)

    def divided(s, first_row=0):  # rows from `first_row` on, each divided by its s (a norm's weight: one row)
        return lambda w: torch.cat([w[:first_row], (w[first_row:].float() / s).to(w.dtype)])

    def multiplied(s):  # input channels (columns) times s
        return lambda w: (w.float() * s).to(w.dtype)

    down = layer.mlp.down_proj.weight
    s_qkv = factor(absmax[f"{prefix}self_attn.qkv_proj"], layer.self_attn.qkv_proj.weight)
    s_gate_up = factor(absmax[f"{prefix}mlp.gate_up_proj"], layer.mlp.gate_up_proj.weight)
    s_down = factor(absmax[f"{prefix}mlp.down_proj"], down)
    adjustments = [("input_layernorm.weight", divided(s_qkv)), ("self_attn.qkv_proj.weight", multiplied(s_qkv)),
                   ("post_attention_layernorm.weight", divided(s_gate_up)),
                   ("mlp.gate_up_proj.weight", multiplied(s_gate_up)),
                   # the up half: down's input is silu(gate) * up
                   ("mlp.gate_up_proj.weight", divided(s_down[:, None], first_row=down.shape[1])),
                   ("mlp.down_proj.weight", multiplied(s_down))]
    norms = {"self_attn.qkv_proj": "input_layernorm.weight", "mlp.gate_up_proj": "post_attention_layernorm.weight"}
    before = {name: layer.get_parameter(norm).data.float().clone() for name, norm in norms.items()}
    with torch.no_grad():
        for name, adjust in adjustments:
            weights.adjust(f"{prefix}{name}", adjust)
            param = layer.get_parameter(name)
            param.data = adjust(param.data)
    divisors = {f"{prefix}mlp.down_proj": s_down}
    for name, norm in norms.items():  # a channel the norm zeroes gets inf: its X^T X row and column are zero
        after = layer.get_parameter(norm).data.float()
        divisors[f"{prefix}{name}"] = torch.where(after != 0, before[name] / after, torch.inf)
    return divisors


@dataclass(frozen=True)
class QuantizationPlan:
    """What calibration decided: the smoothing applied, how the weights were rounded and the linear layers that stay
    fp32."""

    smooth_alpha: float
    weight_rounding: str
    max_linear_error: float
    linear_errors: dict[str, float]
    keep_fp32: list[str]
    calibration: dict
    preflight: dict | None  # the whole model in fake int8 on the calibration rows, the round kept (None: off)

    def int8_layers(self) -> list[str]:
        """The linear layers quantized (module names)."""
        return [name for name in self.linear_errors if name not in self.keep_fp32]

    def describe(self, scheme: Int8Scheme) -> dict:
        """For the manifest of an artifact quantized with `scheme` (the five worst layers' errors, and every layer
        kept)."""
        worst = sorted(self.linear_errors.items(), key=lambda kv: -kv[1])[:5]
        return {"scheme": scheme.describe(), "weight_max": WEIGHT_MAX, "weight_type": scheme.weight_type,
                "smooth_alpha": self.smooth_alpha, "weight_rounding": self.weight_rounding,
                "max_linear_error": self.max_linear_error, "keep_fp32": self.keep_fp32,
                "worst_linear_errors": {k: round(v, 5) for k, v in worst}, "calibration": self.calibration,
                "preflight": self.preflight}


def plan_int8(model: Qwen3ForDeployment, task: Task, tokenizer, calibration: CalibrationSet, max_length: int,
              scheme: Int8Scheme, smooth_alpha: float, max_linear_error: float, weight_rounding: str = "gptq",
              preflight: bool = True, scratch: Path | None = None, log=print,
              instruction: str | None = None) -> QuantizationPlan:
    """Calibrate `model` (fp32 compute, weights in any dtype; streamed or whole) in place: smooth it (adjusting its
    weights), round its linear weights (`weight_rounding` "gptq": `round_weights`, the rounded weights kept in a
    temporary directory in `scratch` until the model goes; "nearest": left to the backends), then pick the linear
    layers kept out of int8, measuring each layer's error as `scheme` rounds; with `preflight`, the linear layers of
    whole decoder layers too, one per round, the one adding the most error to the residual stream first, while the
    whole model in fake int8 uses over PREFLIGHT_BUDGET of the gate's error budget (on the calibration rows and the
    gate's edge cases at `max_length`) and that helps. `instruction`: the build's fixed one (its rows carry it)."""
    gptq = weight_rounding == "gptq"
    calibration_rows = calibration.rows(task, tokenizer, "calibration", max_length, instruction)
    tokens, shape = sum(map(len, calibration_rows)), model.shape
    widest = max(shape.hidden_size, shape.num_attention_heads * shape.head_dim, shape.intermediate_size)
    if gptq and tokens < widest:
        log(f"GPTQ: the calibration rows hold {tokens} tokens, fewer than the {widest} input channels of the widest "
            "linear layer, so its inputs' X^T X is rank-deficient and GPTQ fits the calibration rows more than other "
            "text (a 4B-shape build gained nothing on held-out text); a larger --calibration set fixes it")
    rows = _Rows(model, calibration_rows)
    probe = _LinearProbe(scheme)
    layer_errors: dict[str, float] = {}  # per decoder layer alone in fake int8: the error it adds to the residual

    @contextmanager
    def calibrate(prefix, layer, states):  # smoothed and rounded from one pass over its inputs; then errors measured
        if smooth_alpha > 0 or gptq:
            with probe.watching(prefix, layer, measure_error=False, hessians=gptq):
                rows.through(layer, states)
        divisors = smooth(prefix, layer, probe.absmax, smooth_alpha, model.weights) if smooth_alpha > 0 else {}
        exact = round_weights(prefix, layer, probe.hessians, divisors, model.weights, scratch) if gptq else {}
        residual_error = None
        if preflight:  # it keeps whole layers, the most harmful first: an early layer's error meets a small residual
            # stream and is carried through every later layer (0.6B outlier reranker: layer 0 adds 2x layer 1's error
            # and 12x layer 27's)
            with _fake_quantized(prefix, layer, set(_linears(prefix, layer)), scheme):
                quantized = rows.through(layer, states)

            def residual_error(outputs):
                layer_errors[prefix] = rows.token_error(quantized, outputs)
        with probe.watching(prefix, layer, measure_error=True, exact=exact):
            yield residual_error

    def fake_int8(names: set[str]):
        return lambda prefix, layer, _: _fake_quantized(prefix, layer, names, scheme)
    # The preflight compares against the model as it came, on the calibration rows and on the gate's edge cases (no
    # body, a sentence, a row of max_length: the longest is the one int8 errs most on). GPTQ changes the weights
    # while calibrating; smoothing alone keeps the model's function, so its calibrated outputs serve then
    if preflight:
        edge_cases = _Rows(model, validation_rows(task, tokenizer, max_length,
                                                  task.prompt_start(tokenizer, instruction)))
        edge_reference = edge_cases.run("int8 reference, edge cases", lambda *_: nullcontext())
        unchanged = rows.run("int8 reference", lambda *_: nullcontext()) if gptq else None
    calibrated = rows.run("calibrating int8", calibrate)
    errors = probe.errors()
    keep = sorted((n for n, e in errors.items() if e > max_linear_error), key=lambda n: -errors[n])
    if len(keep) == len(errors):
        raise ToolkitError(f"every linear layer's int8 error exceeds max_linear_error {max_linear_error} (the best is "
                           f"{min(errors.values()):.4f}); int8 would quantize nothing: raise "
                           "quantization.max_linear_error or build fp16")
    log(f"int8 calibration on {rows.count} rows: smoothing alpha {smooth_alpha}, {weight_rounding} rounding, worst "
        f"linear error {max(errors.values()):.4f}, {len(keep)} of {len(errors)} linear layers kept out of int8 "
        f"(error > {max_linear_error})")
    if not preflight:
        return QuantizationPlan(smooth_alpha, weight_rounding, max_linear_error, errors, keep, calibration.describe(),
                                None)
    # Per-layer errors compound through the depth: check the whole model in fake int8 before compiling, and keep
    # decoder layers fp32, the most harmful first, until the checked rows leave the gate a margin for unseen text
    reference = task.finish(np.concatenate([calibrated if unchanged is None else unchanged, edge_reference]))
    harmful = [prefix for prefix in sorted(layer_errors, key=lambda p: -layer_errors[p])
               if any(name.startswith(prefix) and name not in keep for name in errors)]
    worst_layers = {prefix.rstrip("."): round(layer_errors[prefix], 5) for prefix in harmful[:5]}
    best = None  # the plan kept: the first round, or a later one that cut the error enough to be worth its fp32 layers
    for attempt in range(1, PREFLIGHT_ROUNDS + 1):
        names = {name for name in errors if name not in keep}
        outputs = np.concatenate([rows.run("checking int8 end to end", fake_int8(names)),
                                  edge_cases.run("checking int8, edge cases", fake_int8(names))])
        agreement = task.agreement(reference, task.finish(outputs))
        used = task.tolerance_used(agreement, "int8")
        log(f"int8 end to end on the calibration rows and the gate's edge cases, {len(keep)} linear layers kept out "
            f"of int8: {task.format_agreement(agreement)}: {used:.0%} of the gate's error budget")
        if best is not None and used > PREFLIGHT_GAIN * best["budget_used"]:
            log("keeping more layers out of int8 did not help (the error is spread over the layers, not in the worst "
                f"ones): the plan of round {best['rounds']} is kept, and the gate decides")
            break
        best = {"agreement": agreement, "budget_used": round(used, 4), "rounds": attempt, "keep_fp32": list(keep),
                "worst_layer_errors": worst_layers}
        if used <= PREFLIGHT_BUDGET or attempt > len(harmful):
            break
        kept_next = sorted((n for n in names if n.startswith(harmful[attempt - 1])), key=lambda n: -errors[n])
        if len(kept_next) == len(names):  # int8 would be left nothing
            break
        keep = keep + kept_next
    keep = best.pop("keep_fp32")
    return QuantizationPlan(smooth_alpha, weight_rounding, max_linear_error, errors, keep, calibration.describe(), best)
