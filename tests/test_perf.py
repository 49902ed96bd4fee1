"""`perf run`, `perf compare`, `perf profile` and `perf buckets` through the CLI on the tiny synthetic artifacts:
tables printed, JSON written, per-instance work, agreement between backends, per-kernel times and matmul FLOPs,
and every bad option refused (exit 2) before anything runs; every perf table's number columns each in one format,
no command running more compute threads than cores, and `perf traffic` naming the checkpoint a set was built from."""
import json
import os
import re
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.errors import ToolkitError

from conftest import copy_artifact, model_path


def invoke(*args):
    """Run `toolkit perf ARGS`; stderr is part of `output` (click 8.2+)."""
    return CliRunner().invoke(main, ["perf", *map(str, args)])


def read(path):
    return json.loads(path.read_text())


# ---- perf run --------------------------------------------------------------------------------------------------------
TIMEOUT = 60  # seconds: a bound on waits that only a hang (or a broken mode) reaches


def hold_measured_batches_until_the_queue_is_full(monkeypatch, instances: int, queue: int, warmup_batches: int):
    """Measured batches wait in the backend until the producer has submitted `instances + queue` of them, none
    finished: every instance holds one and the bounded queue behind them is full. Throughput mode's producer gets there
    at once; one that waited for results (as latency mode's clients do) never would, and the wait fails the run."""
    import threading

    import toolkit.perf.run as perf_run
    from toolkit.backends import ArtifactBackend

    lock, counts, full = threading.Lock(), {"runs": 0, "submitted": 0}, threading.Event()
    real_run = ArtifactBackend.run

    def run(self, input_ids, attention_mask):
        with lock:
            counts["runs"] += 1
            measured = counts["runs"] > warmup_batches
        if measured and not full.wait(0 if counts.get("gave_up") else TIMEOUT):
            counts["gave_up"] = True  # once is enough: the later batches fail at once
            raise AssertionError("the producer never filled the queue behind the running batches")
        return real_run(self, input_ids, attention_mask)

    class CountingEngine(perf_run.Engine):
        def run_async(self, *args, **kwargs):
            future = super().run_async(*args, **kwargs)
            with lock:
                counts["submitted"] += 1
                if counts["submitted"] == warmup_batches + instances + queue:
                    full.set()
            return future

    monkeypatch.setattr(ArtifactBackend, "run", run)
    monkeypatch.setattr(perf_run, "Engine", CountingEngine)
    return full


@pytest.mark.parametrize("queue, mode", [(0, "latency"), (8, "throughput")])
def test_perf_run_modes_use_both_instances(onnx_artifacts, tmp_path, monkeypatch, queue, mode):
    """Latency mode: two client threads, one request each in flight. Throughput mode: one producer keeps both
    instances busy and the queue full behind them (checked with the measured batches held until it is)."""
    if mode == "throughput":
        full = hold_measured_batches_until_the_queue_is_full(monkeypatch, instances=2, queue=queue, warmup_batches=2)
    out = tmp_path / "perf.json"
    r = invoke("run", "--artifact", onnx_artifacts["embedding"][0], "--percentiles", "50,90,99.9", "--iterations", 16,
               "--warmup", 1, "--instance", 2, "--queue-size", queue, "--json", out)
    assert r.exit_code == 0, r.output
    assert f"{mode} mode (queue {queue})" in r.output
    for row in ("sequences/s", "tokens/s", "latency avg (ms)", "latency p50 (ms)", "latency p99.9 (ms)"):
        assert row in r.output
    result = read(out)
    assert result["mode"] == mode and result["instances"] == 2 and result["iterations"] == 16
    assert result["backend"] == "onnx" and result["seq_len"] == 32 and result["batch"] == 2
    lat = result["latency_ms"]
    assert set(lat) == {"avg", "min", "max", "p50", "p90", "p99.9"}
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99.9"] <= lat["max"]
    assert result["throughput"]["sequences_per_s"] > 0
    assert result["throughput"]["tokens_per_s"] == pytest.approx(32 * result["throughput"]["sequences_per_s"])
    runs = result["runs_per_instance"]  # measured batches only (warm-up excluded)
    assert len(runs) == 2 and sum(runs) == 16
    assert min(runs) > 0, runs  # both instances worked
    if mode == "throughput":
        assert full.is_set()
    assert "batches per instance:" in r.output


def test_perf_run_on_dataset_lengths(onnx_artifacts, tmp_path):
    out = tmp_path / "perf.json"
    r = invoke("run", "--artifact", onnx_artifacts["embedding"][1], "--input", "sts12-sample", "--iterations", 3,
               "--warmup", 0, "--json", out)
    assert r.exit_code == 0, r.output
    result = read(out)
    assert result["input"] == "sts12-sample" and result["seq_len"] == 64
    tokens_per_sequence = result["throughput"]["tokens_per_s"] / result["throughput"]["sequences_per_s"]
    assert 1 < tokens_per_sequence < 64  # real sentence lengths, not full-length random rows


def test_perf_inputs_from_a_dataset_are_the_tasks_requests(onnx_artifacts):
    """A reranker artifact gets the dataset's (query, passage) pairs in its prompt, as the Reranker frames them."""
    from toolkit.artifact import Manifest
    from toolkit.checkpoint import load_tokenizer
    from toolkit.eval.datasets import load_dataset
    from toolkit.perf.common import make_inputs

    manifest = Manifest.load(onnx_artifacts["reranker"][1])
    tokenizer = load_tokenizer(manifest.path / "tokenizer")
    _, _, [example] = load_dataset("msmarco-sample", 1)
    batches = make_inputs(manifest, "msmarco-sample", 2)
    rows = [tokenizer.decode(ids[mask == 1].tolist()) for batch in batches for ids, mask in zip(*batch)]
    assert len(rows) == 2 * manifest.batch
    for row, passage in zip(rows, example.passages):  # the first query's passages, in order
        assert row.startswith("<|im_start|>system\n") and row.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert f"<Query>: {example.query}\n<Document>: {passage[:20]}" in row, row


def test_perf_run_refuses_a_dataset_the_task_cannot_use(onnx_artifacts, monkeypatch):
    import toolkit.perf.run

    def no_engine(*a, **kw):
        raise AssertionError("an engine was started for data the task cannot use")

    monkeypatch.setattr(toolkit.perf.run.Engine, "from_artifact", no_engine)
    r = invoke("run", "--artifact", onnx_artifacts["reranker"][1], "--input", "sts12-sample")
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "the reranker task cannot use sts12 (a pairs dataset)" in lines[0], r.output
    assert "use msmarco, msmarco-sample" in lines[0]


BAD_RUN_OPTIONS = [
    (["--iterations", "0"], "--iterations"),
    (["--warmup", "-1"], "--warmup"),
    (["--queue-size", "-1"], "--queue-size"),
    (["--instance", "0"], "--instance"),
    (["--percentiles", "101"], "--percentiles"),
    (["--percentiles", "50,-1"], "--percentiles"),
    (["--percentiles", "a,b"], "--percentiles"),
    (["--percentiles", ""], "--percentiles"),
    (["--percentiles", "50,,99"], "--percentiles must be a comma-separated list of numbers such as 50,90,99, got "
                                  "'50,,99'"),
    (["--percentiles", "50,99,"], "--percentiles must be a comma-separated list of numbers"),
    (["--percentiles", "0,50"], "--percentiles: each percentile must be a number > 0 and <= 100"),
    (["--device-ids", ""], "--device-ids"),
    (["--device-ids", ","], "--device-ids"),
    (["--device-ids", "x"], "--device-ids"),
    (["--device-ids", "0,,1"], "--device-ids must be a comma-separated list of integers"),
    (["--device-ids", "0,-1"], "--device-ids"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "4"], "takes 1..2 rows a call, not 4; pass --batch-size 2 or fewer"),
    (["--input", "no-such-dataset"], "unknown dataset"),
    (["--input", "RANDOM"], "--input 'RANDOM' is no dataset; for random ids, write it in lower case: --input random"),
]


@pytest.mark.parametrize("args, message", BAD_RUN_OPTIONS, ids=[" ".join(a) for a, _ in BAD_RUN_OPTIONS])
def test_perf_run_refuses_bad_options_before_running(onnx_artifacts, monkeypatch, args, message):
    import toolkit.perf.run

    def no_engine(*a, **kw):
        raise AssertionError("an engine was started despite a bad option")

    monkeypatch.setattr(toolkit.perf.run.Engine, "from_artifact", no_engine)
    r = invoke("run", "--artifact", onnx_artifacts["embedding"][0], "--iterations", 2, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "error:" in r.output and "Traceback" not in r.output


def test_perf_run_batch_size_runs_fewer_rows_than_the_artifact_s_batch(onnx_artifacts):
    """The batch axis is dynamic: `--batch-size 1` on a batch-2 artifact runs (and counts) one row a call."""
    from toolkit.artifact import Manifest
    from toolkit.perf.run import PerfRunOptions, run_perf

    artifact = onnx_artifacts["embedding"][0]
    manifest = Manifest.load(artifact)
    assert manifest.batch == 2
    result = run_perf(PerfRunOptions(artifact=artifact, batch_size=1, iterations=4, warmup=0))
    throughput = result["throughput"]
    assert result["batch"] == 1  # and each call's rows were one full-length random row:
    assert throughput["tokens_per_s"] / throughput["batches_per_s"] == pytest.approx(manifest.seq_len)


def test_perf_run_refuses_device_ids_on_a_cpu_artifact(onnx_artifacts, monkeypatch):
    """They pick GPUs: on a CPU artifact they were accepted and ignored."""
    import toolkit.runtime

    monkeypatch.setattr(toolkit.runtime, "open_backend", lambda *a, **kw: pytest.fail("a backend was opened"))
    r = invoke("run", "--artifact", onnx_artifacts["embedding"][0], "--iterations", 2, "--device-ids", "0,1")
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0] == "error: device ids [0, 1] pick GPUs, and this is a CPU artifact (its instances share the " \
        "CPU's cores): leave --device-ids at its default, 0"


def test_perf_run_options_check_without_the_cli(onnx_artifacts):
    from toolkit.perf.run import PerfRunOptions, run_perf

    good = PerfRunOptions(artifact=onnx_artifacts["embedding"][0])
    assert good.check() is good and good.mode == "latency"
    for bad in (dict(percentiles=(101,)), dict(percentiles=(0,)), dict(percentiles=(float("nan"),)),
                dict(device_ids=()), dict(device_ids=(True,)), dict(iterations=1.5), dict(queue_size=-1),
                dict(instances=True)):
        [option] = bad
        with pytest.raises(ToolkitError, match=f"^--{option.replace('_', '-')}[: ]"):  # names the bad option
            run_perf(PerfRunOptions(artifact=onnx_artifacts["embedding"][0], **bad))


def test_standalone_perf_command_reports_errors_cleanly(onnx_artifacts):
    from toolkit.perf.cli import perf

    r = CliRunner().invoke(perf, ["run", "--artifact", str(onnx_artifacts["embedding"][0]), "--iterations", "0"])
    assert r.exit_code == 2 and "--iterations must be an integer >= 1, got 0" in r.output
    for args, line in ((["compare"], "error: Missing option '--artifact'; see `perf compare --help`"),
                       (["--bogus"], "error: No such option '--bogus'; see `perf --help`"),
                       (["bogus"], "error: No such command 'bogus'; see `perf --help`")):
        r = CliRunner().invoke(perf, args, prog_name="perf")  # click's refusals: one line too, not its usage block
        assert r.exit_code == 2 and r.output.splitlines() == [line], r.output


# ---- perf compare ----------------------------------------------------------------------------------------------------
def test_perf_compare_torch_onnx_tvm(onnx_artifacts, tvm_artifacts, checkpoints, tmp_path):
    onnx64, [tvm64] = onnx_artifacts["embedding"][1], tvm_artifacts["embedding"]
    out = tmp_path / "compare.json"
    r = invoke("compare", "--checkpoint", checkpoints["embedding"], "--artifact", onnx64, "--artifact", tvm64,
               "--iterations", 2, "--warmup", 1, "--json", out)
    assert r.exit_code == 0, r.output
    assert "median ms" in r.output and "min_cosine vs first" in r.output and "TVM vs ONNX Runtime:" in r.output
    assert "warning" not in r.output
    result = read(out)
    assert (result["task"], result["seq_len"], result["batch"]) == ("embedding", 64, 2)
    assert [run["backend"] for run in result["runs"]] == ["torch", "onnx", "tvm"]
    assert result["reference"] == result["runs"][0]["name"] and "parity_vs_first" not in result["runs"][0]
    assert result["runs"][0]["speedup_vs_first"] == 1.0
    for run in result["runs"]:
        assert run["latency_ms_median"] > 0 and run["gflops"] > 0 and run["name"] in r.output
    for run in result["runs"][1:]:
        parity = run["parity_vs_first"]
        assert parity["nonfinite"] == 0 and parity["items"] == 2
        assert parity["min_cosine"] >= 0.999 and parity["passed"]
    onnx_ms, tvm_ms = (result["runs"][i]["latency_ms_median"] for i in (1, 2))
    assert result["tvm_vs_onnx"] == pytest.approx(onnx_ms / tvm_ms)
    assert result["tvm_vs_onnx_runs"] == [result["runs"][2]["name"], result["runs"][1]["name"]]
    assert result["runs"][1]["name"].startswith("onnx fp16 (") and result["runs"][2]["name"].startswith("tvm fp16 (")
    assert "engines" not in result and "tvm_vs_onnxruntime" not in result
    r = invoke("compare", "--no-torch", "--artifact", onnx64, "--artifact", tvm64, "--iterations", 1, "--json", out)
    assert r.exit_code == 0, r.output
    result = read(out)
    assert [run["backend"] for run in result["runs"]] == ["onnx", "tvm"] and "tvm_vs_onnx" in result
    assert result["runs"][1]["parity_vs_first"]["min_cosine"] >= 0.999


def test_perf_compare_judges_tolerance_only_when_torch_ran_first(onnx_artifacts, checkpoints, tmp_path, monkeypatch):
    """The dtypes' tolerances are against the fp32 Hugging Face model, yet with --no-torch every run was judged
    against the first artifact by them: an artifact agreeing with itself could be reported off tolerance."""
    from toolkit.tasks import EMBEDDING

    onnx64 = onnx_artifacts["embedding"][1]
    monkeypatch.setitem(EMBEDDING.tolerances, "fp16", 1.01)  # a bound no agreement meets: every judged run fails it
    out = tmp_path / "compare.json"
    r = invoke("compare", "--no-torch", "--artifact", onnx64, "--artifact", onnx64, "--iterations", 1, "--warmup", 0,
               "--json", out)
    assert r.exit_code == 0 and "off tolerance" not in r.output, r.output
    parity = read(out)["runs"][1]["parity_vs_first"]
    assert parity["min_cosine"] >= 0.999 and "passed" not in parity and "tolerance" not in parity
    r = invoke("compare", "--checkpoint", checkpoints["embedding"], "--artifact", onnx64, "--iterations", 1,
               "--warmup", 0, "--json", out)
    assert r.exit_code == 0 and "off tolerance" in r.output, r.output
    assert read(out)["runs"][1]["parity_vs_first"]["passed"] is False


def test_perf_compare_names_the_checkpoint_a_set_was_built_from_when_torch_ran_another(onnx_artifacts, tmp_path):
    """As `perf traffic` and `toolkit eval` do: a run off its dtype's tolerance of torch gets the likely cause."""
    from toolkit.artifact import Manifest
    from toolkit.synth import write_synthetic_checkpoint

    wrong = write_synthetic_checkpoint(tmp_path / "wrong", "embedding", "tiny", seed=1)  # other random weights
    onnx64 = onnx_artifacts["embedding"][1]
    built = Manifest.load(onnx64).model.resolved
    out = tmp_path / "compare.json"
    r = invoke("compare", "--checkpoint", wrong, "--artifact", onnx64, "--iterations", 1, "--warmup", 0,
               "--json", out)
    assert r.exit_code == 0, r.output
    [warning] = [line for line in r.output.splitlines() if "off tolerance" in line]
    hint = f"torch ran {read(out)['checkpoint']}, but the set was built from {built}: pass --checkpoint {built}"
    assert warning.endswith(f"; {hint}"), warning
    assert read(out)["runs"][1]["parity_vs_first"]["hint"] == hint


def test_perf_compare_interleaved_times_every_run_in_alternating_rounds(onnx_artifacts, tvm_artifacts, tmp_path,
                                                                        monkeypatch):
    import toolkit.perf.compare as compare

    onnx64, [tvm64] = onnx_artifacts["embedding"][1], tvm_artifacts["embedding"]
    calls = []  # the backend of every forward, in order
    real_open = compare.open_backend

    def open_recording(manifest, **options):
        backend = real_open(manifest, **options)
        if manifest.backend == "onnx":  # its threads sleep after a run: spinning, they held up TVM's next one
            config = backend.session.get_session_options().get_session_config_entry
            assert config("session.intra_op.allow_spinning") == "0"
        real_run = backend.run

        def run(ids, mask):
            calls.append(manifest.backend)
            return real_run(ids, mask)
        backend.run = run
        return backend
    monkeypatch.setattr(compare, "open_backend", open_recording)
    out = tmp_path / "compare.json"
    r = invoke("compare", "--no-torch", "--interleave", "--artifact", onnx64, "--artifact", tvm64,
               "--iterations", 4, "--warmup", 0, "--json", out)
    assert r.exit_code == 0, r.output
    assert "timed in alternating rounds" in r.output
    # both loaded, each one's compared output, then 4 timed rounds, every other one reversed
    assert calls == ["onnx", "tvm"] + ["onnx", "tvm", "tvm", "onnx"] * 2
    result = read(out)
    assert result["interleaved"] and [run["backend"] for run in result["runs"]] == ["onnx", "tvm"]
    assert result["runs"][1]["parity_vs_first"]["min_cosine"] >= 0.999 and "tvm_vs_onnx" in result


def test_perf_compare_refuses_mismatched_artifacts_and_bad_options(onnx_artifacts, tvm_artifacts, checkpoints):
    onnx32, [tvm64] = onnx_artifacts["embedding"][0], tvm_artifacts["embedding"]
    r = invoke("compare", "--checkpoint", checkpoints["embedding"], "--artifact", onnx32, "--artifact", tvm64)
    assert r.exit_code == 2, r.output
    assert "must share task, seq and batch" in r.output and "seq 32" in r.output and "seq 64" in r.output
    r = invoke("compare", "--artifact", onnx32, "--artifact", onnx_artifacts["reranker"][0])
    assert r.exit_code == 2 and "must share task, seq and batch" in r.output
    r = invoke("compare", "--artifact", onnx32, "--checkpoint", checkpoints["reranker"])
    assert r.exit_code == 2 and "is a synthetic reranker checkpoint and the artifacts are embedding ones: compare " \
        "reranker artifacts with it" in r.output, r.output
    for args, flag in ((["--iterations", "0"], "--iterations"), (["--warmup", "-1"], "--warmup")):
        r = invoke("compare", "--artifact", onnx32, *args)
        assert r.exit_code == 2 and flag in r.output, r.output


# ---- perf profile ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_perf_profile_times_kernels_and_counts_matmul_flops(onnx_artifacts, tvm_artifacts, checkpoints, tmp_path,
                                                             backend):
    from toolkit.checkpoint import read_hf_config
    from toolkit.perf.compare import forward_flops
    from toolkit.perf.profile import tvm_op_type

    artifact = onnx_artifacts["embedding"][1] if backend == "onnx" else tvm_artifacts["embedding"][0]
    out, trace = tmp_path / "profile.json", tmp_path / "trace.json"
    r = invoke("profile", "--artifact", artifact, "--iterations", 3, "--warmup", 1, "--top", 5, "--trace", trace,
               "--json", out)
    assert r.exit_code == 0, r.output
    for text in ("op types", "kernels", "calls/iter", "ms/iter", "share", "GFLOP/s", "framework overhead",
                 "GFLOP/s effective", f"trace: {trace}"):
        assert text in r.output
    result = read(out)
    assert (result["backend"], result["task"], result["seq_len"], result["batch"]) == (backend, "embedding", 64, 2)
    assert result["iterations"] == 3 and result["warmup"] == 1
    kernels = result["kernels"]
    assert f"top 5 of {len(kernels)} kernels" in r.output and len(kernels) > 5
    assert all(k["ms_per_iteration"] > 0 and k["calls_per_iteration"] >= 1 for k in kernels)
    assert [k["ms_per_iteration"] for k in kernels] == sorted((k["ms_per_iteration"] for k in kernels), reverse=True)
    kernel_ms = sum(k["ms_per_iteration"] for k in kernels)
    assert kernel_ms == pytest.approx(result["kernel_ms_per_iteration"])
    assert kernel_ms == pytest.approx(sum(o["ms_per_iteration"] for o in result["op_types"]))
    # kernels run one after another inside each timed run: together they cannot take longer than the run
    assert kernel_ms <= result["wall_ms_per_iteration"] * 1.01 + 0.01
    assert sum(k["share"] for k in kernels) <= 1.01

    # matmul FLOPs, derived from the shapes each call saw, against the tiny model's config
    config = read_hf_config(checkpoints["embedding"])
    batch, seq, hidden, ffn = 2, 64, config["hidden_size"], config["intermediate_size"]
    heads, head_dim = config["num_attention_heads"], config["head_dim"]
    matmuls = [k for k in kernels if k["gflop_per_iteration"] is not None]
    assert matmuls and all(k["gflops"] > 0 for k in matmuls)
    per_call = {round(k["gflop_per_iteration"] * 1e9 / k["calls_per_iteration"]) for k in matmuls}
    assert 2 * batch * seq * ffn * hidden in per_call  # MLP down projection: [B*S, F] @ [F, H]
    assert 2 * batch * heads * seq * seq * head_dim in per_call  # attention scores: Q [S, d] @ K^T [d, S] per head
    # the artifact's last layer computes its query, o_proj and MLP for the last position alone: of Hugging Face's
    # forward, the other seq - 1 positions' o_proj, MLP and attention rows are left out
    q = heads * head_dim
    per_position = 2 * (q * hidden + 3 * hidden * ffn)  # o_proj; gate, up and down projections
    left_out = batch * (seq - 1) * (per_position + 2 * 2 * seq * q)
    assert result["matmul_gflop_per_iteration"] * 1e9 == pytest.approx(
        forward_flops(config, seq, batch) - left_out, rel=1e-9)
    assert result["model_gflop"] * 1e9 == pytest.approx(forward_flops(config, seq, batch), rel=1e-9)
    # both backends' effective rate over the same time, the one named: ONNX Runtime's was over its profiled runs
    assert result["model_gflops_time"] == "unprofiled_wall_ms_median"
    assert result["model_gflops"] == pytest.approx(result["model_gflop"] / result["unprofiled_wall_ms_median"] * 1e3)
    assert "GFLOP/s effective, over the unprofiled wall time" in r.output
    if backend == "tvm":
        assert all(k["op_type"] == tvm_op_type(k["name"]) for k in kernels)

    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events  # TVM: an object; ONNX Runtime: a list
    timed = [e for e in events if e.get("ph") == "X" and e["dur"] >= 0]
    assert len(timed) >= 3 * len(kernels)
    names = {e["name"] for e in timed}
    suffix = "_kernel_time" if backend == "onnx" else ""
    assert all(k["name"] + suffix in names for k in kernels)


def test_perf_profile_matmul_flops_from_shapes():
    from toolkit.perf.profile import ort_matmul_flops, tvm_matmul_flops

    assert ort_matmul_flops([[2, 10, 96]], [2, 10, 192]) == 2 * 2 * 10 * 192 * 96  # weight not in the shapes
    assert ort_matmul_flops([[96, 10], [96, 192]], [10, 192]) == 2 * 10 * 192 * 96  # Gemm with transA
    assert ort_matmul_flops([[2, 10, 96]], [2, 7, 192]) is None
    # packed weight panels [N/64, K, 64] times activations [B, 1, M, K] into [B, N/64, M, 64], in either order
    assert tvm_matmul_flops("matmul", [(3, 96, 64), (2, 1, 10, 96)], (2, 3, 10, 64)) == 2 * 2 * 3 * 10 * 64 * 96
    # attention scores with a fused mask epilogue: [B, H, M, d] @ [B, H, d, M]
    assert tvm_matmul_flops("fused_matmul_add", [(2, 4, 10, 16), (2, 4, 16, 10), (2, 1, 10, 10)],
                            (2, 4, 10, 10)) == 2 * 2 * 4 * 100 * 16
    assert tvm_matmul_flops("matmul", [(2, 10, 96), (2, 10, 96)], (2, 10, 96)) is None  # elementwise, not a matmul
    # packed linear kernels: planes / quads of 12 rows padded to a tile, K and N from the name
    assert tvm_matmul_flops("bf16x3_matmul_batchx12_96_128", [(16, 2, 48), (2, 2, 48, 64)], (12, 128)) \
        == 2 * 12 * 128 * 96
    assert tvm_matmul_flops("int8_matmul_amx_batchx12_96_128", [(16, 96), (2, 24, 64, 4), (2, 128), (12,)],
                            (12, 128)) == 2 * 12 * 128 * 96
    # with an epilogue: the residual's [rows, N] input; GLU's output, half the product's columns as [rows, N/64, 32]
    assert tvm_matmul_flops("int8_matmul_batchx12_96_128_residual", [(12, 96), (2, 24, 64, 4), (2, 128), (12,),
                                                                     (12, 128)], (12, 128)) == 2 * 12 * 128 * 96
    assert tvm_matmul_flops("bf16_matmul_batchx12_96_256_glu", [(12, 48), (4, 48, 64)], (12, 4, 32)) \
        == 2 * 12 * 256 * 96
    # bf16 attention: q·kᵀ from pairs (K/2 = 64) against k's padded columns, the mask beside; P·V from SEQ/2 pairs
    assert tvm_matmul_flops("bf16_attention_scores_batch_8_56_28", [(3, 8, 56, 64), (3, 8, 64, 32), (3, 1, 56, 28)],
                            (3, 8, 56, 28)) == 2 * 3 * 8 * 56 * 28 * 128
    assert tvm_matmul_flops("bf16_attention_values_batch_8_56_128", [(3, 8, 56, 14), (3, 8, 14, 128)],
                            (3, 8, 56, 128)) == 2 * 3 * 8 * 56 * 128 * 28


def test_perf_profile_tvm_op_types_keep_dtypes_and_group_numbered_copies():
    """All digits were stripped: bf16x3 kernels showed as `bfx_matmul_batchx__`."""
    from toolkit.perf.profile import tvm_op_type

    cases = {
        "bf16x3_matmul_batchx32_64_128": "bf16x3_matmul_batchx",
        "bf16x3_matmul_batchx32_128_64_residual": "bf16x3_matmul_batchx_residual",
        "bf16x3_matmul_batchx32_64_64_residual": "bf16x3_matmul_batchx_residual",
        "int8_matmul_amx_batchx12_96_128": "int8_matmul_amx_batchx",
        "bf16_attention_scores_batch_8_56_28": "bf16_attention_scores_batch",
        "fused_reshape4_transpose2_reshape5_reshape_bf16x3_planes_batchx32_64":
            "fused_reshape_transpose_reshape_reshape_bf16x3_planes_batchx",
        "rms_norm_rope_batch_2_32_16_of_128_from_64": "rms_norm_rope_batch_of_from",
        "fused_matmul2_multiply1_add2": "fused_matmul_multiply_add",
        "matmul1": "matmul", "matmul": "matmul", "softmax_1": "softmax", "softmax_2": "softmax",
        "fused_cast_fp16_1": "fused_cast_fp16",
    }
    assert {name: tvm_op_type(name) for name in cases} == cases


def test_perf_profile_refuses_bad_input_in_one_line(onnx_artifacts, tmp_path):
    seq32 = onnx_artifacts["embedding"][0]
    cases = [
        ([tmp_path], "is not an artifact"),
        ([seq32.parent], "is an artifact set, not one artifact; pass one of its SEQ directories, e.g."),
        ([seq32, "--iterations", 0], "--iterations must be an integer >= 1, got 0"),
        ([seq32, "--warmup", -1], "--warmup must be an integer >= 0"),
        ([seq32, "--top", 0], "--top must be an integer >= 1"),
        ([seq32, "--threads", 0], "--threads must be an integer >= 1"),
        ([seq32, "--input", "no-such-dataset"], "unknown dataset"),
    ]
    for (artifact, *args), message in cases:
        r = invoke("profile", "--artifact", artifact, *args)
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output


def test_perf_profile_refuses_one_file_for_both_the_trace_and_the_json(onnx_artifacts, tmp_path, monkeypatch):
    """The JSON, written last, overwrote the trace: refused before anything is profiled."""
    import toolkit.perf.profile

    monkeypatch.setattr(toolkit.perf.profile, "run_profile", lambda *a, **kw: pytest.fail("profiled anyway"))
    monkeypatch.chdir(tmp_path)
    r = invoke("profile", "--artifact", onnx_artifacts["embedding"][0], "--trace", "out.json", "--json",
               tmp_path / "out.json")
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0] == f"error: --trace and --json both name {tmp_path / 'out.json'}; give the trace and the JSON " \
        "different files"


def test_perf_profile_refuses_a_corrupt_artifact_in_one_line(onnx_artifacts, tmp_path):
    broken = copy_artifact(onnx_artifacts["embedding"][0], tmp_path)
    model = model_path(broken)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    r = invoke("profile", "--artifact", broken, "--iterations", 1, "--warmup", 0)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "does not match its manifest" in lines[0] and "sha256 mismatch" in lines[0], r.output
    assert "toolkit compile" in lines[0]


def test_perf_profile_refuses_a_profile_missing_runs(onnx_artifacts, monkeypatch):
    """ONNX Runtime's profiler drops events past its cap: a trace short of runs is an error naming the fix."""
    import toolkit.perf.profile as profile

    def without_last_run(text):  # what a trace cut at the cap holds: fewer model_run events than runs made
        events = json.loads(text)
        last = max((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        return [e for e in events if e is not last]

    monkeypatch.setattr(profile, "json", SimpleNamespace(loads=without_last_run, dumps=json.dumps))
    r = invoke("profile", "--artifact", onnx_artifacts["embedding"][0], "--iterations", 2, "--warmup", 1)
    assert r.exit_code == 2, r.output
    error = r.output.strip().splitlines()[-1]  # after the progress bar
    assert error.lstrip().startswith("error: ONNX Runtime's profiler recorded 2 of the 3 runs"), r.output
    assert "--iterations plus --warmup at most 2" in error and "Traceback" not in r.output


def test_perf_profile_options_check_without_the_cli(onnx_artifacts):
    from toolkit.perf.profile import ProfileOptions, run_profile

    good = ProfileOptions(artifact=onnx_artifacts["embedding"][0])
    assert good.check() is good and (good.iterations, good.warmup, good.top, good.input) == (10, 2, 15, "random")
    for bad in (dict(iterations=1.5), dict(iterations=True), dict(warmup=-1), dict(top=0), dict(threads=0),
                dict(threads=os.cpu_count() + 1), dict(input=""), dict(trace=str(onnx_artifacts["embedding"][0]))):
        [option] = bad
        with pytest.raises(ToolkitError, match=f"^--{option}[: ]"):  # names the bad option
            run_profile(ProfileOptions(artifact=onnx_artifacts["embedding"][0], **bad), progress=False)


def test_perf_profile_compares_median_walls_and_words_the_difference_by_its_sign(onnx_artifacts, monkeypatch):
    """On a loaded host one slow run moved the mean: the summary printed "(-224.901 ms less)". Profiled runs of 10 ms
    but one of 500 against unprofiled ones of 11 ms: medians 10 against 11, the profiled runs 1 ms faster."""
    import toolkit.perf.profile as profile

    def measured(manifest, options, inputs, bar):
        kernels = profile._Kernels()
        kernels.add("matmul", "MatMul", 0.009 * options.iterations, None)
        return kernels, [0.010, 0.500, 0.010], [0.011, 0.011, 0.011], {"profiler": "onnxruntime"}
    monkeypatch.setattr(profile, "_profile_onnx", measured)
    result = profile.run_profile(profile.ProfileOptions(artifact=onnx_artifacts["embedding"][0], iterations=3),
                                 progress=False)
    assert result["wall_ms_median"] == pytest.approx(10) and result["unprofiled_wall_ms_median"] == pytest.approx(11)
    assert result["model_gflops_time"] == "unprofiled_wall_ms_median"
    assert result["model_gflops"] == pytest.approx(result["model_gflop"] / 11e-3)
    report = profile.profile_report(result)
    assert "unprofiled wall 11.000 ms per iteration (median; profiled 10.000): the same runs with the profiler off " \
           "(1.000 ms more)" in report
    assert "-" not in report.split("unprofiled wall")[1].split("\n")[0]


# ---- perf buckets ----------------------------------------------------------------------------------------------------
def test_perf_buckets_fixed_vs_bucket_set(onnx_artifacts, tmp_path):
    seq32, seq64 = onnx_artifacts["embedding"]
    out = tmp_path / "buckets.json"
    r = invoke("buckets", "--fixed", seq64, "--buckets", seq32.parent, "--data", "sts12-sample", "--limit", 10,
               "--json", out)
    assert r.exit_code == 0, r.output
    assert "bucket speed-up:" in r.output and "texts per bucket" in r.output
    result = read(out)
    assert result["texts"] == 10 and result["speedup"] > 0
    assert result["min_cosine_fixed_vs_buckets"] >= 0.9999
    assert result["fixed"]["seq_lens"] == [64] and result["buckets"]["seq_lens"] == [32, 64]
    for side in ("fixed", "buckets"):
        assert sum(result[side]["rows_per_bucket"].values()) == 10
    assert result["buckets"]["rows_per_bucket"]["32"] > 0  # short sentences really went to the small bucket
    # ONNX Runtime never pads the fixed artifact's batches to its SEQ: the report says so, not a 64-token padding
    assert result["fixed"]["padded_to_seq"] is False and "not padded to its SEQ (ONNX Runtime)" in r.output


def test_perf_buckets_times_no_lazy_setup(onnx_artifacts, monkeypatch):
    """The model's first encode works out what a token spans (151,669 vocabulary entries: 0.14 s): timed, it made
    a 10-text run look 1.2x where it was several times that."""
    import time

    import toolkit.api
    from toolkit.perf import buckets

    events, measure = [], toolkit.api.max_token_chars
    monkeypatch.setattr(toolkit.api, "max_token_chars", lambda tokenizer: events.append("setup") or measure(tokenizer))
    monkeypatch.setattr(buckets, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or
                                                         time.perf_counter()))
    seq32, seq64 = onnx_artifacts["embedding"]
    buckets.run_bucket_benchmark(buckets.BucketOptions(fixed=seq64, buckets=seq32.parent, data="sts12-sample",
                                                       limit=4))
    assert events == ["setup", "clock", "clock"] * 2


def test_perf_buckets_refuses_bad_options(onnx_artifacts):
    seq32, seq64 = onnx_artifacts["embedding"]
    cases = [
        (["--fixed", seq64, "--buckets", seq32.parent, "--data", "sts12-sample", "--limit", "0"], "--limit"),
        (["--fixed", seq32.parent, "--buckets", seq32.parent, "--data", "sts12-sample"], "--fixed must be one"),
        (["--fixed", onnx_artifacts["reranker"][1], "--buckets", seq32.parent, "--data", "sts12-sample"],
         "embedding artifacts"),
        (["--fixed", seq64, "--buckets", seq32.parent, "--data", "no-such-dataset"], "unknown dataset"),
        # the fixed artifact would cut texts that the set runs whole
        (["--fixed", seq32, "--buckets", seq32.parent, "--data", "sts12-sample"],
         f"--fixed is SEQ 32, below the bucket set's largest SEQ 64: the two would not embed the same tokens; pass "
         f"--fixed {seq64} or"),
    ]
    for args, message in cases:
        r = invoke("buckets", *args)
        assert r.exit_code == 2 and message in r.output, r.output


def test_perf_buckets_reports_the_texts_own_token_lengths_and_how_many_were_cut(onnx_artifacts, tmp_path):
    seq32, seq64 = onnx_artifacts["embedding"]
    data = tmp_path / "sts12_long.jsonl"
    rows = [{"sentence1": "a short one", "sentence2": " ".join(["word"] * 200), "score": 1.0}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "buckets.json"
    r = invoke("buckets", "--fixed", seq64, "--buckets", seq32.parent, "--data", data, "--json", out)
    assert r.exit_code == 0, r.output
    result = read(out)
    assert result["token_lengths"]["max"] > 200 and result["buckets"]["rows_truncated"] == 1
    assert f"max {result['token_lengths']['max']}; 1 longer than the largest SEQ 64, cut to it)" in r.output


def test_an_unwritable_json_path_is_refused_before_any_work(onnx_artifacts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a file named '-' would go
    (tmp_path / "afile").write_text("")
    for path, message in ((tmp_path / "afile" / "x.json", "afile is a file, not a directory"),
                          (tmp_path, "is a directory; name a file in it"),
                          ("-", "'-' is not standard output here (the tables go there); name a file, /dev/stdout")):
        r = invoke("run", "--artifact", onnx_artifacts["embedding"][0], "--iterations", 1, "--json", path)
        assert r.exit_code == 2 and message in r.output and "p50" not in r.output, r.output


def test_perf_traffic_list_errors_give_an_example_of_their_own_option(onnx_artifacts):
    r = invoke("traffic", "--data", "sts12-sample", "--artifact", onnx_artifacts["embedding"][0].parent,
               "--torch-batch", "")
    assert r.exit_code == 2, r.output
    assert "--torch-batch must be a comma-separated list of integers such as 8,32, got ''" in r.output, r.output


# ---- rules every perf command keeps ----------------------------------------------------------------------------------
def test_perf_commands_refuse_more_threads_than_cores_in_one_line(onnx_artifacts):
    """TVM's thread pool spins: more compute threads than cores crawl, so no perf command starts them."""
    seq32, cores = onnx_artifacts["embedding"][0], os.cpu_count()
    more = f"--threads {cores + 1} is more than this machine's {cores} cores"
    cases = [
        (["profile", "--artifact", seq32, "--threads", cores + 1], more),
        (["traffic", "--data", "sts12-sample", "--artifact", seq32.parent, "--threads", cores + 1], more),
        (["serve", "--artifact", seq32.parent, "--threads", cores + 1], more),
        (["serve", "--artifact", seq32.parent, "--threads", cores, "--ray-replicas", 2],
         f"--threads {cores} per replica x 2 replicas is {2 * cores} compute threads, which is more than"),
        (["serve", "--artifact", seq32.parent, "--ray-replicas", cores + 1],
         f"--ray-replicas {cores + 1} is more than this machine's {cores} cores"),
    ]
    for args, message in cases:
        r = invoke(*args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
        assert message in lines[0] and ("pass --threads" in lines[0] or "pass --ray-replicas" in lines[0]), r.output


def test_perf_serve_refuses_what_its_server_would_before_the_offline_run(onnx_artifacts, monkeypatch):
    """The server's batching limits were checked only by the server, started after the offline run."""
    import toolkit.perf.serve_load

    monkeypatch.setattr(toolkit.perf.serve_load, "in_child", lambda *a, **kw: pytest.fail("the offline run ran"))
    embedding_set = onnx_artifacts["embedding"][0].parent  # SEQ 32 and 64
    cases = [
        (["--max-wait-ms", 70000], "--max-wait-ms must be a number of milliseconds in 0..60000, got 70000.0"),
        (["--max-batch-tokens", 32], "--max-batch-tokens must be an integer >= the max input length 64, got 32; "
                                     "raise it to at least 64"),
    ]
    for args, message in cases:
        r = invoke("serve", "--artifact", embedding_set, "--data", "sts12-sample", *args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and lines == [f"error: {message}"], r.output


def test_perf_traffic_names_the_checkpoint_a_set_was_built_from_when_torch_ran_another(onnx_artifacts, tmp_path):
    """As `toolkit eval` does: a set off its dtype's tolerance of torch gets a warning line with the likely cause."""
    from toolkit.artifact import Manifest
    from toolkit.synth import write_synthetic_checkpoint

    wrong = write_synthetic_checkpoint(tmp_path / "wrong", "embedding", "tiny", seed=1)  # other random weights
    built = Manifest.load(onnx_artifacts["embedding"][0]).model.resolved
    out = tmp_path / "traffic.json"
    args = ["traffic", "--data", "sts12-sample", "--artifact", onnx_artifacts["embedding"][0].parent, "--torch-batch",
            8, "--limit", 4, "--json", out]
    r = invoke(*args, "--checkpoint", wrong)
    assert r.exit_code == 0, r.output
    result = read(out)
    [warning] = [line for line in r.output.splitlines() if "off tolerance" in line]
    assert warning.startswith(f"warning: {result['runs'][1]['name']} is off tolerance vs torch eager fp32, batch 8 "
                              "(min_cosine >= 0.999): min cosine "), warning
    assert warning.endswith(f"; torch ran {result['checkpoint']}, but the set was built from {built}: pass "
                            f"--checkpoint {built}"), warning
    agreement = result["runs"][1]["agreement_vs_first"]
    assert agreement["passed"] is False and agreement["tolerance"] == "min_cosine >= 0.999"
    r = invoke(*args)  # the checkpoint it was built from: within tolerance, nothing to warn about
    assert r.exit_code == 0 and "off tolerance" not in r.output, r.output
    assert read(out)["runs"][1]["agreement_vs_first"]["passed"] is True


def table_columns(text: str) -> dict[str, list[str]]:
    """The first table in `text` as {header: its cells as printed, padding included}: the columns are where the
    dashes under the headers are, the rows the lines after them of the table's width."""
    lines = text.splitlines()
    dashes = next(i for i, line in enumerate(lines) if line.startswith("-") and set(line) <= {"-", " "})
    spans = [m.span() for m in re.finditer(r"-+", lines[dashes])]
    rows = []
    for line in lines[dashes + 1:]:
        if len(line) != len(lines[dashes]):
            break
        rows.append(line)
    return {lines[dashes - 1][a:b].strip(): [row[a:b] for row in rows] for a, b in spans}


NUMBER = re.compile(r"(\d[\d,]*)(?:\.(\d+))?(e[+-]\d+|%)?")


def assert_one_format(cells: list[str], column: str) -> None:
    """Every number in the column's cells (a ratio's range too) with the same decimals and notation, thousands
    separated, right-aligned."""
    formats = set()
    for cell in cells:
        assert not cell.endswith(" "), f"{column}: {cells} not right-aligned"
        for whole, decimals, suffix in NUMBER.findall(cell):
            assert re.fullmatch(r"\d{1,3}(,\d{3})*", whole), f"{column}: {cell!r} without thousands separators"
            formats.add((len(decimals), suffix[:1]))
    assert len(formats) == 1, f"{column}: {cells} mix the formats {formats}"


def table_results():
    """Reports of made-up results whose numbers straddle 1 and 1,000 (where a per-cell format changes), and each
    report's number columns."""
    from toolkit.perf.buckets import bucket_report
    from toolkit.perf.compare import compare_report
    from toolkit.perf.profile import profile_report
    from toolkit.perf.run import perf_table
    from toolkit.perf.serve_load import serve_load_report
    from toolkit.perf.traffic import traffic_report

    agreement = {"items": 4, "nonfinite": 0, "min_cosine": 0.9999994, "max_abs_diff": 2.1e-4, "passed": True}
    traffic = {"task": "embedding", "data": "sts12-sample", "requests": 4, "instruction": None, "rounds": 2,
               "matmul_peak_gflops": 1234.5, "gate_key": "min_cosine", "runs": [
                   {"name": "torch eager fp32, batch 8", "requests_per_s": 1234.5, "real_tokens_per_s": 45678.9,
                    "padding": 0.155, "gflops": 1500.25, "fraction_of_peak": 0.5, "vs_best_torch": 1.0,
                    "vs_best_torch_range": [1.0, 1.0], "per_round": [], "resident_mb": 1234},
                   {"name": "onnx fp16 SEQ 32,64 (emb)", "requests_per_s": 12.25, "real_tokens_per_s": 450.5,
                    "padding": 0.016, "gflops": 0.5, "fraction_of_peak": 0.0004, "vs_best_torch": 0.9,
                    "vs_best_torch_range": [0.85, 1.05], "per_round": [], "resident_mb": 90,
                    "agreement_vs_first": agreement}]}
    served = {"name": "uvicorn", "sentences_per_s": 475.99, "vs_offline": 0.1965, "token_slots": 438.0,
              "token_slots_vs_offline": 1.033, "latency_ms": {"p50": 3.876, "p99": 1234.5}, "failed": 0,
              "half_load_failed": 0, "failures": {}, "half_load_failures": {}, "first_failure": None,
              "agreement": agreement}
    ray = {**served, "name": "Ray Serve, 2 replicas", "token_slots": None, "token_slots_vs_offline": None,
           "latency_ms": None, "agreement": None}
    serve = {"data": "sts12", "sentences": 16, "clients": 4, "artifact": "ws/emb/onnx", "repeat": 1,
             "offline": {"sentences_per_s": 2422.4, "token_slots": 4240}, "runs": [served, ray]}
    compare = {"task": "embedding", "batch": 2, "seq_len": 64, "gflop_per_forward": 0.0231,
               "matmul_peak_gflops": 1292.0, "reference": "torch eager (HF, fp32)", "interleaved": False, "runs": [
                   {"name": "torch eager (HF, fp32)", "latency_ms_median": 1234.5, "latency_ms_min": 1100.25,
                    "sequences_per_s": 1.62, "gflops": 0.5, "fraction_of_matmul_peak": 0.0004,
                    "speedup_vs_first": 1.0},
                   {"name": "onnx fp16 (emb)", "latency_ms_median": 0.414, "latency_ms_min": 0.377,
                    "sequences_per_s": 4827.5, "gflops": 1055.7, "fraction_of_matmul_peak": 0.191,
                    "speedup_vs_first": 2981.9, "parity_vs_first": agreement}]}
    run = {"backend": "onnx", "task": "embedding", "batch": 2, "seq_len": 32, "instances": 1, "mode": "latency",
           "queue_size": 0, "iterations": 20, "input": "random", "runs_per_instance": [20],
           "throughput": {"sequences_per_s": 3641.57, "tokens_per_s": 116530.1},
           "latency_ms": {"avg": 0.38, "min": 0.28, "max": 1234.5}}
    ops = [{"op_type": "MatMul", "name": "matmul_1", "kernels": 1200, "calls_per_iteration": 1200,
            "ms_per_iteration": 1234.5, "share": 0.5, "gflops": 1500.5},
           {"op_type": "Add", "name": "add_1", "kernels": 3, "calls_per_iteration": 1.5, "ms_per_iteration": 0.25,
            "share": 0.0001, "gflops": None}]
    profile = {"top": 15, "backend": "onnx", "dtype": "fp16", "task": "embedding", "batch": 2, "seq_len": 32,
               "iterations": 2, "warmup": 1, "input": "random", "profiler": "onnxruntime", "op_types": ops,
               "kernels": ops, "wall_ms_per_iteration": 1300.0, "wall_ms_min": 1250.0,
               "kernel_ms_per_iteration": 1234.75, "wall_ms_median": 1290.0, "unprofiled_wall_ms_median": 1234.8,
               "model_gflop": None,
               "matmul_gflop_per_iteration": 0.01, "trace": None}
    buckets = {"texts": 10, "data": "sts12-sample", "token_lengths": {"mean": 14.5, "max": 41}, "speedup": 2.0,
               "min_cosine_fixed_vs_buckets": 1.0,
               "fixed": {"seq_lens": [64], "rows_per_bucket": {64: 10}, "seconds": 1234.5, "texts_per_s": 0.5,
                         "padded_to_seq": True},
               "buckets": {"seq_lens": [32, 64], "rows_per_bucket": {32: 9, 64: 1}, "seconds": 0.25,
                           "texts_per_s": 4000.0}}
    return [
        ("traffic", traffic_report(traffic), ["requests/s", "real tokens/s", "padding", "GFLOP/s", "of peak",
                                              "vs torch", "min_cosine vs first", "memory MB"]),
        ("serve", serve_load_report(serve), ["sentences/s", "vs offline", "token slots", "slots vs offline", "p50 ms",
                                             "p99 ms", "failed", "min_cosine vs offline"]),
        ("compare", compare_report(compare), ["median ms", "min ms", "seq/s", "GFLOP/s", "of peak", "speed-up",
                                              "min_cosine vs first"]),
        ("run", perf_table(run), ["value"]),
        ("profile", profile_report(profile), ["kernels", "calls/iter", "ms/iter", "share", "GFLOP/s"]),
        ("buckets", bucket_report(buckets), ["seconds", "texts/s"]),
    ]


def test_perf_tables_print_each_number_column_in_one_format():
    for command, report, numbers in table_results():
        columns = table_columns(report)
        for column in numbers:
            assert_one_format(columns[column], f"perf {command}, {column}")
