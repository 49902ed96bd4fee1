"""Scheduling real traffic: token-budget batches per SEQ, buckets chosen from data, one CPU budget per process,
and the traffic benchmark."""
import itertools
import json
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.api import Embedder
from toolkit.artifact import find_artifacts
from toolkit.backends import Backend
from toolkit.buckets import padded_tokens, suggest_seq_lens, token_lengths
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.eval.datasets import load_dataset
from toolkit.runner import BucketedRunner
from toolkit.runtime import ComputeBudget, Engine
from toolkit.tasks import EMBEDDING, RERANKER, SIMILARITY_INSTRUCTION
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID

from conftest import build

TIMEOUT = 60  # seconds: a bound on waits that only a hang reaches


class GatedBackend(Backend):
    """Counts the compute threads busy at once across every engine sharing `meter`; each run holds its threads until
    the test opens `meter["gate"]`, so the test sees every run the scheduler lets start together."""

    task, batch = EMBEDDING, 2

    def __init__(self, seq_len, threads, meter):
        self.seq_len, self.threads, self.meter = seq_len, threads, meter

    def run(self, input_ids, attention_mask):
        with self.meter["lock"]:
            self.meter["busy"] += self.threads
            self.meter["peak"] = max(self.meter["peak"], self.meter["busy"])
        try:
            assert self.meter["gate"].wait(3 * TIMEOUT), "the test never opened the gate"
        finally:
            with self.meter["lock"]:
                self.meter["busy"] -= self.threads
        return np.zeros((input_ids.shape[0], 4), np.float32)


@pytest.mark.parametrize("budget_threads, threads", [(3, 2), (2, 1), (3, 1)])
def test_busy_compute_threads_never_exceed_the_budget(budget_threads, threads):
    """3 buckets x 2 instances, every bucket submitted at once: without a shared budget up to 6 instances (each with
    its share of the cores) ran together. With every instance holding a batch, exactly as many run as the budget
    fits: never more (3, 2: one instance, as two would be 4 threads), and not fewer (1-thread instances of
    different engines run side by side up to the budget)."""
    meter = {"lock": threading.Lock(), "busy": 0, "peak": 0, "gate": threading.Event()}
    budget = ComputeBudget(budget_threads)
    engines = [Engine(lambda i, dev, s=s: GatedBackend(s, threads, meter), instances=2, threads=threads,
                      budget=budget) for s in (8, 16, 32)]
    runner = BucketedRunner(engines)
    rng = np.random.default_rng(0)
    rows = [[1] * int(n) for n in rng.integers(1, 33, 60)]
    planned = {id(e): 0 for e in engines}
    for engine, _ in runner.plan(rows):
        planned[id(engine)] += 1
    assert min(planned.values()) >= 3  # every instance of every engine has a batch to take
    fits = budget_threads // threads * threads  # the most threads that instances of `threads` can hold together
    batches = runner.submit(rows)

    def every_worker_took_a_batch():
        return all(e._queue.qsize() == planned[id(e)] - 2 for e in engines)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (every_worker_took_a_batch() and meter["busy"] >= fits) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a worker past its queue but not yet counted would be counted by now
        assert meter["busy"] == fits and meter["peak"] == fits, (meter, fits)
    finally:
        meter["gate"].set()
    outputs = [b.future.result(TIMEOUT) for b in batches]
    runner.close()
    assert sum(len(out) for out in outputs) == 60
    assert sum(sum(e.runs_per_instance) for e in engines) == sum(planned.values())  # work really ran
    assert meter["peak"] == fits <= budget_threads, (meter["peak"], fits)


def test_token_budget_batches_mixed_lengths_come_back_in_order(checkpoints, tmp_path):
    """SEQ 32 / 48 / 64 with a 128-token budget: batches 4 / 2 / 2, one set; outputs in input order, as torch."""
    from toolkit.compile import compile_config
    from toolkit.config import BuildConfig

    cfg = BuildConfig(name="budget", task="embedding", checkpoint=str(checkpoints["embedding"]), seq_lens=(32, 48, 64),
                      batch_tokens=128, workspace=tmp_path)
    compile_config(cfg, log=lambda m: None)
    manifests = find_artifacts(tmp_path / "budget" / "onnx")
    assert [(m.seq_len, m.batch) for m in manifests] == [(32, 4), (48, 2), (64, 2)]
    with Engine.from_artifact(manifests[0]) as engine:
        one = engine.run_sync(*left_pad([[9707, ENDOFTEXT_ID]], 32, ENDOFTEXT_ID))
        assert one.shape == (1, 64)
        with pytest.raises(ToolkitError, match="does not match"):
            engine.run_sync(*left_pad([[ENDOFTEXT_ID]] * 5, 32, ENDOFTEXT_ID))
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "北京", "river"]
    texts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(1, 40, 23)]
    with Embedder.from_artifacts(tmp_path / "budget" / "onnx") as emb, \
            Embedder.from_checkpoint(checkpoints["embedding"], max_length=64, batch_size=5) as ref:
        ours, theirs = emb.encode(texts), ref.encode(texts)
        stats = emb.runner.stats
        assert set(stats.batches_per_seq) == {32, 48, 64}
        assert 0 < stats.padding_fraction < 1
        tokens = emb.tokenize(texts)
        rows = [len(r) for r in tokens]
        # no filler rows, and ONNX Runtime pads each batch to its longest row only (`dynamic_seq`), not to its SEQ
        batches = [[rows[i] for i in indices] for _, indices in emb.runner.plan(tokens)]
        assert stats.computed_tokens == sum(len(b) * max(b) for b in batches)
        assert stats.computed_tokens < sum(min(s for s in (32, 48, 64) if s >= n) for n in rows)
        assert stats.real_tokens == sum(rows)
    assert np.min(np.sum(ours * theirs, axis=-1)) >= 0.999


def test_suggested_buckets_are_the_least_padding_choice():
    rng = np.random.default_rng(2)
    lengths = np.concatenate([rng.integers(5, 40, 400), rng.integers(40, 120, 40)])
    best = suggest_seq_lens(lengths, count=3, multiple=8)
    assert best[-1] >= lengths.max() and len(best) == 3 and all(s % 8 == 0 for s in best)
    top = -(-lengths.max() // 8) * 8
    brute = min((c + (top,) for c in itertools.combinations(range(8, top, 8), 2)),
                key=lambda seqs: padded_tokens(lengths, seqs))
    assert padded_tokens(lengths, best) == padded_tokens(lengths, brute)
    assert padded_tokens(lengths, best) < padded_tokens(lengths, (64, 128))  # finer at the short end pays
    assert suggest_seq_lens([3, 4, 5], count=4, minimum=63) == (64,)


def test_compile_seq_auto_picks_buckets_from_the_data(checkpoints, tokenizers, tmp_path):
    result = CliRunner().invoke(main, ["compile", "build_configs/reranker_config_fp16.yaml", "--checkpoint",
                                       str(checkpoints["reranker"]), "--seq", "auto", "--lengths", "msmarco-sample",
                                       "--buckets", "2", "--batch-tokens", "256", "--workspace", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifests = find_artifacts(tmp_path / "qwen3-reranker-0.6b-fp16" / "onnx")
    lengths = token_lengths(RERANKER, tokenizers["reranker"], RERANKER.traffic(load_dataset("msmarco-sample")[2]))
    assert [m.seq_len for m in manifests] == list(suggest_seq_lens(lengths, 2, minimum=63))
    assert all(m.batch == max(1, 256 // m.seq_len) for m in manifests)
    bad = CliRunner().invoke(main, ["compile", "build_configs/reranker_config_fp16.yaml", "--seq", "auto"])
    assert bad.exit_code == 2 and "--lengths" in bad.output
    # flags that would be ignored are refused: bucket shapes without --seq auto, calibration texts for fp16
    for flags, fix in ((["--seq", "128", "--buckets", "3"], "add --seq auto --lengths DATA"),
                       (["--calibration", "build_configs/reranker_config_fp16.yaml"], "--calibration is for --dtype")):
        ignored = CliRunner().invoke(main, ["compile", "build_configs/reranker_config_fp16.yaml", *flags])
        assert ignored.exit_code == 2 and fix in ignored.output, ignored.output
    # sentence pairs hold no (query, passage) pairs: refused by name, before anything is built
    pairs = CliRunner().invoke(main, ["compile", "build_configs/reranker_config_fp16.yaml", "--checkpoint",
                                      str(checkpoints["reranker"]), "--seq", "auto", "--lengths", "sts12-sample",
                                      "--workspace", str(tmp_path / "pairs")])
    assert pairs.exit_code == 2 and "reranker task cannot use sts12 (a pairs dataset)" in pairs.output
    assert not (tmp_path / "pairs").exists()


@pytest.mark.parametrize("instruction", [None, SIMILARITY_INSTRUCTION])
def test_seq_auto_says_how_much_its_set_pads_on_the_rows_as_the_build_s_inputs_carry_them(checkpoints, tokenizers,
                                                                                          instruction):
    """A set for queries (`--instruction`) is chosen on the texts with it, a bare set on the texts alone (documents,
    what `perf traffic` replays); the padding it leaves there is printed, so the choice can be checked."""
    from toolkit.buckets import padding_share, suggest_for_dataset

    logged = []
    seqs = suggest_for_dataset("embedding", str(checkpoints["embedding"]), "sts12-sample", 4,
                               instruction=instruction, log=logged.append)
    texts = EMBEDDING.traffic(load_dataset("sts12-sample")[2])
    lengths = token_lengths(EMBEDDING, tokenizers["embedding"], texts, instruction)
    assert seqs == suggest_seq_lens(lengths, 4, minimum=EMBEDDING.min_seq_len(tokenizers["embedding"], instruction),
                                    max_seq=seqs[-1])
    share = padding_share(lengths, seqs)
    assert 0 < share < 0.5 and share == padded_tokens(lengths, seqs) / (padded_tokens(lengths, seqs) + lengths.sum())
    measured = f"with the instruction {instruction!r}" if instruction else "bare, as documents"
    assert logged[-1].startswith(f"buckets chosen from sts12-sample: --seq {','.join(map(str, seqs))}, "
                                 f"{share:.1%} of the token slots padding (each of its {len(texts)} rows in the "
                                 f"smallest SEQ that holds it; measured {measured}"), logged


def test_perf_traffic_prints_ratios_padding_and_agreement(onnx_artifacts, tmp_path):
    out = tmp_path / "traffic.json"
    result = CliRunner().invoke(main, ["perf", "traffic", "--data", "sts12-sample", "--artifact",
                                       str(onnx_artifacts["embedding"][0].parent), "--torch-batch", "8",
                                       "--limit", "24", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "requests/s" in result.output and "padding" in result.output and "of peak" in result.output
    assert "memory MB" in result.output
    report = json.loads(out.read_text())
    torch_run, artifact_run = report["runs"]
    assert report["requests"] == 24 and torch_run["vs_best_torch"] == 1.0
    assert artifact_run["name"].endswith("(embedding-fp16-b2)")  # which set, when several share a backend and dtype
    assert artifact_run["agreement_vs_first"]["min_cosine"] >= 0.999
    assert 0 <= artifact_run["padding"] < 1 and artifact_run["gflops"] > 0
    assert isinstance(artifact_run["resident_mb"], int)
    seq_rows = sum(artifact_run["batches_per_seq"].values())
    assert seq_rows >= 24 // 2  # batch-2 artifacts: at least 12 batches ran
    pairs = CliRunner().invoke(main, ["perf", "traffic", "--data", "bq-sample", "--artifact",
                                      str(onnx_artifacts["reranker"][0].parent)])
    assert pairs.exit_code == 2 and "reranker task cannot use bq (a pairs dataset); use msmarco" in pairs.output


def test_perf_traffic_rounds_alternate_the_order_and_take_each_ratio_within_its_round(onnx_artifacts, monkeypatch):
    from toolkit.perf import traffic

    order = []

    def recording_time_run(task, name, *args):
        order.append(name)
        return real_time_run(task, name, *args)

    real_time_run = traffic.time_run
    monkeypatch.setattr(traffic, "time_run", recording_time_run)
    result = traffic.run_traffic(traffic.TrafficOptions(
        data="sts12-sample", artifacts=(str(onnx_artifacts["embedding"][0].parent),), torch_batches=(8,), limit=8,
        rounds=3), progress=False)
    torch_name, artifact_name = (r["name"] for r in result["runs"])
    assert order == [torch_name, artifact_name, artifact_name, torch_name, torch_name, artifact_name]
    torch_run, artifact_run = result["runs"]
    assert [r["vs_best_torch"] for r in torch_run["per_round"]] == [1.0, 1.0, 1.0]
    ratios = [r["vs_best_torch"] for r in artifact_run["per_round"]]
    assert artifact_run["vs_best_torch"] == float(np.median(ratios))
    assert artifact_run["vs_best_torch_range"] == [min(ratios), max(ratios)]
    rates = [r["requests_per_s"] for r in artifact_run["per_round"]]
    assert artifact_run["requests_per_s"] == float(np.median(rates))
    assert artifact_run["agreement_vs_first"]["min_cosine"] >= 0.999
    assert "medians of 3 rounds" in traffic.traffic_report(result)
    with pytest.raises(ToolkitError, match="--rounds"):
        traffic.TrafficOptions(data="sts12-sample", artifacts=("x",), rounds=0).check()
    with pytest.raises(ToolkitError, match="the instruction '  ' is only whitespace"):  # checked before models load
        traffic.TrafficOptions(data="sts12-sample", artifacts=("x",), instruction="  ").check()


def test_perf_traffic_names_two_sets_of_one_config_by_their_directories(onnx_artifacts, tmp_path):
    import shutil

    from toolkit.perf import traffic

    before, after = onnx_artifacts["embedding"][0].parent, tmp_path / "after"
    shutil.copytree(before, after)
    result = traffic.run_traffic(traffic.TrafficOptions(
        data="sts12-sample", artifacts=(str(before), str(after)), torch_batches=(8,), limit=4, rounds=1),
        progress=False)
    first, second = (r["name"] for r in result["runs"][1:])
    assert first.endswith(f"({before})") and second.endswith(f"({after})")


def test_perf_traffic_compares_a_set_with_a_smaller_largest_seq_only_on_the_requests_it_ran_whole(
        checkpoints, onnx_artifacts, tokenizers, tmp_path):
    """torch cuts requests at the largest SEQ of all the sets (64 here): a set of SEQ 16 ran other tokens for the
    requests longer than 16, which measured its cut (min cosine 0.90 on STS12), and the warning blamed the artifact."""
    from toolkit.perf import traffic

    [short] = build(checkpoints, tmp_path, "embedding", seq_lens=(16,))
    result = traffic.run_traffic(traffic.TrafficOptions(
        data="sts12-sample", artifacts=(str(onnx_artifacts["embedding"][0].parent), str(short.parent)),
        torch_batches=(8,), limit=24), progress=False)
    requests = EMBEDDING.traffic(load_dataset("sts12-sample")[2])[:24]
    longer = int((token_lengths(EMBEDDING, tokenizers["embedding"], requests) > 16).sum())
    assert 0 < longer < 24
    torch_run, whole, cut = result["runs"]
    report = traffic.traffic_report(result)
    assert "off tolerance" not in report and "itself is off" not in report
    assert cut["agreement_vs_first"]["items"] == 24 - longer and cut["agreement_vs_first"]["passed"]
    assert cut["truncated"] == cut["agreement_left_out"] == longer and cut["max_length"] == 16
    assert whole["truncated"] == whole["agreement_left_out"] == 0 and whole["agreement_vs_first"]["items"] == 24
    assert f"cut {longer} of 24 requests to 16 tokens: it computed fewer tokens" in report
    assert f"agreement leaves out the {longer} requests it and torch eager fp32, batch 8 cut differently" in report


def test_find_artifacts_accepts_a_batch_per_seq_but_not_two_artifacts_for_one_seq(onnx_artifacts, tmp_path):
    import shutil

    set_dir = tmp_path / "set"
    shutil.copytree(onnx_artifacts["embedding"][0], set_dir / "seq32")
    shutil.copytree(onnx_artifacts["embedding"][0], set_dir / "copy")

    with pytest.raises(ToolkitError, match="several artifacts for one SEQ"):
        find_artifacts(set_dir)
    shutil.rmtree(set_dir / "copy")
    assert [m.seq_len for m in find_artifacts(set_dir)] == [32]


def test_a_compiles_workspace_serves_as_its_one_set_and_names_its_sets_when_it_holds_several(onnx_artifacts, tmp_path):
    import shutil

    workspace = tmp_path / "ws"  # as `toolkit compile --workspace ws` lays out a set: model / backend / SEQ
    for artifact in onnx_artifacts["embedding"]:
        shutil.copytree(artifact, workspace / "qwen3-embedding" / "onnx" / artifact.name)
    assert [m.seq_len for m in find_artifacts(workspace)] == [32, 64]
    shutil.copytree(onnx_artifacts["reranker"][0], workspace / "qwen3-reranker" / "onnx" / "seq64")
    with pytest.raises(ToolkitError, match="point at one of the sets .*qwen3-embedding/onnx, .*qwen3-reranker/onnx$"):
        find_artifacts(workspace)


def test_a_directory_of_several_sets_is_refused_naming_them_before_any_manifest_is_read(tmp_path):
    """`perf serve --artifact /tmp` quoted the manifest of an old build three levels down ("is a
    'qwen3-deploy-artifact/2' manifest ...; recompile") where /tmp is no set at all. A directory holding several sets
    now names them (the first few), reading none; a directory holding one is that set, its manifests read."""
    for set_dir in ("a/onnx", "a/tvm", "b/old", "c/onnx", "d/onnx", "e/onnx", "f/onnx"):
        (tmp_path / set_dir / "seq32").mkdir(parents=True)
        (tmp_path / set_dir / "seq32" / "manifest.json").write_text('{"format": "qwen3-deploy-artifact/2"}')
    with pytest.raises(ToolkitError) as refused:
        find_artifacts(tmp_path)
    assert str(refused.value) == (f"{tmp_path} is not a bucket set but holds 7; point at one of the sets "
                                  f"{', '.join(str(tmp_path / d) for d in ('a/onnx', 'a/tvm', 'b/old', 'c/onnx'))}, "
                                  f"{tmp_path / 'd/onnx'} (and 2 more)")
    with pytest.raises(ToolkitError, match="'qwen3-deploy-artifact/2' manifest"):
        find_artifacts(tmp_path / "b")


def test_perf_traffic_memory_is_what_unloading_the_model_gives_back(monkeypatch):
    """A runtime's first load brings in libraries that stay loaded: counted as growth since before the load, they were
    charged to the first run of each runtime (one tiny torch model: 476 MB at batch 8, then 242 MB at batch 32)."""
    from types import SimpleNamespace

    from toolkit.perf import traffic
    from toolkit.runner import RunnerStats

    resident = {"libraries": 0, "model": 0}
    monkeypatch.setattr(traffic, "resident_mb", lambda: 100 + sum(resident.values()))
    monkeypatch.setattr(traffic, "token_lengths", lambda task, tokenizer, requests, instruction: np.full(
        len(requests), 4))

    class Model:
        max_length, tokenizer = 64, None

        def __init__(self):
            self.runner = SimpleNamespace(stats=RunnerStats())

        def __enter__(self):
            resident.update(libraries=400, model=50)  # the libraries stay once loaded
            return self

        def __exit__(self, *exc):
            resident["model"] = 0

    task = SimpleNamespace(run_requests=lambda model, requests, instruction, progress=False: [0.0] * len(requests))
    config = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
              "num_hidden_layers": 1}
    for _ in range(2):  # the first run and a later one alike
        figures, *_ = traffic.time_run(task, "torch eager fp32, batch 8", Model, ["a", "b"], None, config, False)
        assert figures["resident_mb"] == 50
