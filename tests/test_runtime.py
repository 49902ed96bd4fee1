"""Engine (instances, async queue, closing), buckets, text formats, truncation and input errors."""
import json
import os
import signal
import threading
import time
import warnings
from concurrent.futures import wait

import numpy as np
import pytest

from toolkit.api import Embedder, Reranker
from toolkit.artifact import Manifest, find_artifacts
from toolkit.backends import Backend
from toolkit.checkpoint import load_tokenizer
from toolkit.errors import ToolkitError
from toolkit.runner import BucketedRunner
from toolkit.runtime import CPU_BUDGET, Engine, EngineClosedError, QueueFullError, check_engine_options
from toolkit.tasks import EMBEDDING, RERANK_PREFIX, RERANK_SUFFIX, SIMILARITY_INSTRUCTION
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID

from conftest import build

TIMEOUT = 60  # seconds: every wait in these tests is bounded


def test_2000_async_requests_over_3_instances_return_to_their_callers(onnx_artifacts):
    artifact = onnx_artifacts["embedding"][0]  # batch 2, seq 32
    rng = np.random.default_rng(0)
    inputs = []
    for _ in range(2000):
        rows = [list(rng.integers(0, 151643, rng.integers(1, 32))) for _ in range(2)]
        inputs.append(left_pad(rows, 32, ENDOFTEXT_ID))
    with Engine.from_artifact(artifact, instances=1) as single:
        expected = [single.run_sync(*x) for x in inputs]
    with Engine.from_artifact(artifact, instances=3, queue_size=16) as engine:
        futures = [engine.run_async(*x) for x in inputs]
        results = [f.result(timeout=TIMEOUT) for f in futures]
        work = list(engine.runs_per_instance)
    assert sum(work) == 2000 and min(work) > 0, work  # every instance ran batches
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)  # bit-identical, and each result belongs to its own request


class BlockingBackend(Backend):
    task, seq_len, batch = EMBEDDING, 4, 1

    def __init__(self, release: threading.Event):
        self.release = release

    def run(self, input_ids, attention_mask):
        self.release.wait(TIMEOUT)
        return np.zeros((1, 2), np.float32)


class InstantBackend(Backend):
    task, seq_len, batch = EMBEDDING, 4, 1

    def run(self, input_ids, attention_mask):
        return np.zeros((1, 2), np.float32)


def test_auto_instances_are_one_single_thread_instance_per_core_for_tvm_on_cpu(onnx_artifacts, tvm_artifacts,
                                                                              monkeypatch):
    """"auto": each core its own single-thread TVM instance; ONNX Runtime keeps one instance of every thread."""
    monkeypatch.setattr(CPU_BUDGET, "threads", 2)
    for artifacts, want in ((tvm_artifacts, (2, 1)), (onnx_artifacts, (1, 2))):
        with Engine.from_artifact(artifacts["embedding"][0], instances="auto") as engine:
            assert (engine.instances, engine.threads) == want
    with Engine.from_artifact(tvm_artifacts["embedding"][0], instances=1) as engine:  # a count is taken as given
        assert (engine.instances, engine.threads) == (1, 2)


def test_queue_full_closed_engine_and_wrong_shape_are_clear_errors():
    release = threading.Event()
    engine = Engine(lambda i, dev: BlockingBackend(release), instances=1, queue_size=1)
    ids, mask = np.ones((1, 4), np.int64), np.ones((1, 4), np.int64)
    first = engine.run_async(ids, mask)  # taken by the worker, which blocks
    deadline = time.monotonic() + TIMEOUT
    while not first.running():
        assert time.monotonic() < deadline, "the worker never took the first request"
        time.sleep(0.001)
    engine.run_async(ids, mask)  # fills the queue
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.run_async(ids, mask, block=False)
    with pytest.raises(ToolkitError, match=r"does not match the artifact's \[batch, seq\] = \[1\.\.1, 4\]"):
        engine.run_async(np.ones((1, 5), np.int64), np.ones((1, 5), np.int64))
    with pytest.raises(ToolkitError, match="integer"):
        engine.run_async(ids.astype(np.float32), mask)
    release.set()
    engine.close()
    assert first.result(timeout=TIMEOUT).shape == (1, 2)
    with pytest.raises(EngineClosedError, match="closed"):
        engine.run_async(ids, mask)


def test_bucket_choice_is_the_smallest_that_fits(onnx_artifacts):
    path = onnx_artifacts["embedding"][0].parent  # seq32 + seq64
    assert [m.path.name for m in find_artifacts(path)] == ["seq32", "seq64"]
    with Embedder.from_artifacts(path) as emb:
        assert [emb.runner.bucket_for(n).seq_len for n in (1, 32, 33, 64)] == [32, 32, 64, 64]
        with pytest.raises(ToolkitError, match="do not fit"):
            emb.runner.bucket_for(65)


def test_bucketed_results_match_a_single_bucket_and_torch(onnx_artifacts, checkpoints):
    texts = ["short", "a somewhat longer sentence " * 4, "medium length text here", "x " * 50]
    path = onnx_artifacts["embedding"][0].parent
    with Embedder.from_artifacts(path) as both, Embedder.from_artifacts(path / "seq64") as one, \
            Embedder.from_checkpoint(checkpoints["embedding"], max_length=64) as ref:
        a, b, c = both.encode(texts), one.encode(texts), ref.encode(texts)
        assert {both.runner.bucket_for(len(r)).seq_len for r in both.tokenize(texts)} == {32, 64}
    assert np.min(np.sum(a * b, -1)) > 0.99999 and np.min(np.sum(a * c, -1)) > 0.999
    assert np.allclose(np.linalg.norm(a, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("task", ["embedding", "reranker"])
def test_onnx_runtime_runs_each_batch_at_its_longest_row_with_the_outputs_of_the_buckets_seq(onnx_artifacts,
                                                                                             tvm_artifacts, task):
    """An ONNX Runtime graph's sequence axis is symbolic: a batch is padded to its longest row, not to the bucket's
    SEQ (the padding is computed like real tokens); the outputs are those of the bucket's shape."""
    texts = ["short", "a somewhat longer sentence here", "medium length text", "x " * 12]
    model_class = Embedder if task == "embedding" else Reranker
    with model_class.from_artifacts(onnx_artifacts[task][0].parent) as model:
        rows = model.tokenize(texts if task == "embedding" else [("q", t) for t in texts])
        engine = model.runner.bucket_for(max(map(len, rows)))
        assert engine.dynamic_seq and max(map(len, rows)) < engine.seq_len
        trimmed = model.runner.run(rows)
        batches = [[len(rows[i]) for i in indices] for _, indices in model.runner.plan(rows)]
        assert model.runner.stats.computed_tokens == sum(len(b) * max(b) for b in batches)
        engine.dynamic_seq = False  # as a static-shape backend runs it
        padded = model.runner.run(rows)
        with pytest.raises(ToolkitError, match="does not match the artifact's"):
            engine.run_sync(*left_pad(rows, engine.seq_len + 1, ENDOFTEXT_ID))
    np.testing.assert_allclose(trimmed, padded, atol=1e-5 * np.abs(padded).max())
    with Engine.from_artifact(tvm_artifacts[task][0]) as tvm_engine:
        assert not tvm_engine.dynamic_seq


def test_endoftext_is_appended_exactly_once(onnx_artifacts, tokenizers, tmp_path):
    from toolkit.tokenizer import Tokenizer, build_qwen3_tokenizer

    with Embedder.from_artifacts(onnx_artifacts["embedding"][1]) as emb:
        for tok in (build_qwen3_tokenizer(append_eos=True), build_qwen3_tokenizer(append_eos=False)):
            emb.tokenizer = Tokenizer(tok.backend_tokenizer, {})
            [row] = emb.tokenize(["Hello world"])
            assert row == [9707, 1879, ENDOFTEXT_ID]


def test_query_instruction_and_mrl_dim(onnx_artifacts):
    with Embedder.from_artifacts(onnx_artifacts["embedding"][1]) as emb:
        q = emb.encode(["capital of China"], instruction="Find the city")
        assert emb.tokenizer.decode(emb.tokenize(["Instruct: Find the city\nQuery:capital of China"])[0]) \
            == "Instruct: Find the city\nQuery:capital of China<|endoftext|>"
        assert not np.allclose(q, emb.encode(["capital of China"]))
        cut = emb.encode(["capital of China"], dim=16)
        assert cut.shape == (1, 16) and np.isclose(np.linalg.norm(cut), 1.0)
        full = emb.encode(["capital of China"], normalize=False)
        assert np.allclose(cut, full[:, :16] / np.linalg.norm(full[:, :16]), atol=1e-6)


def test_an_embedding_set_built_for_one_instruction_embeds_queries_with_it_and_says_what_it_refuses(
        checkpoints, onnx_artifacts, tmp_path):
    """`--instruction` on an embedding build: every input is a query with it, the instruction's tokens (up to "Query",
    a whole multiple of 4 of them) cached. The set agrees with the unpatched model on those queries, encode_queries
    takes its instruction by default, documents and other instructions are refused naming the fix (by the service
    too, and by `toolkit eval` on passages before anything runs); `perf traffic` runs every set on such queries (the
    set's instruction by default), the bare set too."""
    import httpx
    from serving import served

    from toolkit.eval.run import EvalOptions, evaluate
    from toolkit.perf.traffic import TrafficOptions, run_traffic
    from toolkit.serve.app import create_app

    [artifact, _] = build(checkpoints, tmp_path, "embedding", seq_lens=(32, 64), instruction=SIMILARITY_INSTRUCTION)
    manifest = Manifest.load(artifact)
    start = EMBEDDING.prompt_start(load_tokenizer(checkpoints["embedding"]), SIMILARITY_INSTRUCTION)
    assert manifest.instruction == SIMILARITY_INSTRUCTION and manifest.cached_prefix == start[:8]
    texts = ["capital of China", "A man is playing a guitar.", "123 and more", "北京"]
    with Embedder.from_artifacts(artifact.parent) as emb, Embedder.from_checkpoint(checkpoints["embedding"]) as ref:
        ours = emb.encode(texts, instruction=SIMILARITY_INSTRUCTION)
        assert np.sum(ours * ref.encode(texts, instruction=SIMILARITY_INSTRUCTION), axis=1).min() >= 0.9999
        assert np.array_equal(emb.encode_queries(texts), ours)
        with pytest.raises(ToolkitError, match="documents.* need a set compiled without --instruction"):
            emb.encode_documents(texts)
        with pytest.raises(ToolkitError, match="compiled for the instruction"):
            emb.encode_queries(texts, instruction="Find the city")
    with served(create_app(Embedder.from_artifacts(artifact.parent))) as base, \
            httpx.Client(base_url=base, timeout=TIMEOUT) as http:  # the service: a 422 naming the fix, not a 500
        refused = http.post("/embed", json={"inputs": texts})
        assert refused.status_code == 422 and "need a set compiled without --instruction" in refused.json()["error"]
        assert http.post("/embed", json={"inputs": texts, "instruction": SIMILARITY_INSTRUCTION}).status_code == 200
    with pytest.raises(ToolkitError, match="msmarco also has texts without it: for msmarco, use a set compiled with"):
        evaluate(EvalOptions(task="embedding", dataset="msmarco-sample", artifact=artifact.parent, limit=1,
                             instruction=SIMILARITY_INSTRUCTION))  # before the torch run, not after it
    result = run_traffic(TrafficOptions(data="sts12-sample", artifacts=(str(artifact.parent),
                                        str(onnx_artifacts["embedding"][0].parent)), torch_batches=(8,), limit=8),
                         progress=False)
    assert result["instruction"] == SIMILARITY_INSTRUCTION
    assert all(r["agreement_vs_first"]["min_cosine"] >= 0.999 for r in result["runs"][1:])


def test_truncation_policy(onnx_artifacts):
    long_text = "word " * 200
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0].parent) as emb:
        with pytest.raises(ToolkitError, match="more than 64 tokens, the model's max input length"):
            emb.encode([long_text])
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0].parent, truncation="truncate") as emb:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            [row] = emb.tokenize([long_text])
        assert len(row) == 64 and row[-1] == ENDOFTEXT_ID and "truncated" in str(caught[0].message)
    with Reranker.from_artifacts(onnx_artifacts["reranker"][0].parent, truncation="truncate") as rr:
        [row] = rr.tokenize([("q", long_text)])
        prefix = rr.tokenizer.encode_one(RERANK_PREFIX)
        suffix = rr.tokenizer.encode_one(RERANK_SUFFIX)
        assert len(row) == 128 and row[:len(prefix)] == prefix and row[-len(suffix):] == suffix
        # truncation keeps the query and instruction whole: where they fill the row, no document would be left
        with pytest.raises(ToolkitError, match=r"^\d+ tokens of the query and instruction leave no room for the "
                                               "document: this model has"):
            rr.tokenize([("short query", "document"), (long_text, "document")])
        assert rr.tokenize([(long_text[:60], "document")])  # room left: a document's tokens stay
    with Reranker.from_artifacts(onnx_artifacts["reranker"][0].parent) as rr:  # truncation "error"
        # the query fills the row: truncating would not help, so that is not the advice
        with pytest.raises(ToolkitError, match=r"^\d+ tokens of the query and instruction leave no room for the "
                                               "document: this model has"):
            rr.tokenize([("short query", "document"), (long_text, "document")])
        with pytest.raises(ToolkitError, match=r"^input #1 has more than 128 tokens.*pass truncation='truncate'"):
            rr.tokenize([("short query", "document"), ("short query", long_text)])
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0].parent, truncation="truncate") as emb:
        with pytest.raises(ToolkitError, match="tokens of the instruction leave no room for the text"):
            emb.encode(["a text", "another"], instruction=long_text)


def test_text_that_is_not_valid_unicode_is_refused_by_name(onnx_artifacts):
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0]) as emb:
        with pytest.raises(ToolkitError, match=r"^text #1 is not valid Unicode \(surrogates not allowed at character "
                                               r"2\); send UTF-8 text$"):
            emb.encode(["fine", "ab\ud800"])


def test_reranker_template_and_batch_rerank(onnx_artifacts, checkpoints):
    docs = ["Paris is in France.", "Beijing.", "Gravity pulls."]  # input order is not their length order
    with Reranker.from_artifacts(onnx_artifacts["reranker"][1]) as rr, \
            Reranker.from_checkpoint(checkpoints["reranker"], max_length=128) as ref:
        text = rr.tokenizer.decode(rr.tokenize([("Q?", "D.")], instruction="Judge")[0])
        assert text == (RERANK_PREFIX + "<Instruct>: Judge\n<Query>: Q?\n<Document>: D." + RERANK_SUFFIX)
        pairs = [("capital", d) for d in docs]
        assert np.argsort([len(r) for r in rr.tokenize(pairs, instruction="Judge")]).tolist() != [0, 1, 2]
        scores = rr.score(pairs, instruction="Judge")  # input order
        assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
        reference = ref.score(pairs, instruction="Judge")
        assert np.abs(scores - reference).max() <= 1e-4  # neighbouring scores differ by ~1e-3: a row swap fails
        one_by_one = [rr.score([pair], instruction="Judge")[0] for pair in pairs]  # no batch to reorder
        assert np.abs(scores - one_by_one).max() <= 1e-4
        ranked = rr.rerank("capital", docs, instruction="Judge", return_documents=True)
        assert [r["corpus_id"] for r in ranked] == list(np.argsort(-scores, kind="stable"))
        assert [r["score"] for r in ranked] == sorted(scores.tolist(), reverse=True)
        assert all(r["text"] == docs[r["corpus_id"]] for r in ranked)
        top = rr.rerank("capital", docs, top_n=2, instruction="Judge")
        assert top == [{k: r[k] for k in ("corpus_id", "score")} for r in ranked[:2]]
    with pytest.raises(ToolkitError, match="holds embedding artifacts, not reranker ones: pass a reranker set \\(or, "
                                           "in Python, load it with Embedder\\)"):
        Reranker.from_artifacts(onnx_artifacts["embedding"][0])


def test_close_racing_submitters_leaves_no_request_pending():
    """close() from one thread while 4 threads submit: every future resolves (run, or refused with
    EngineClosedError at submission), none is stranded. Failed before the fix in about a third of trials."""
    for trial in range(50):
        engine = Engine(lambda i, dev: InstantBackend(), instances=2, queue_size=4)
        futures, lock, start = [], threading.Lock(), threading.Barrier(5)
        ids = np.ones((1, 4), np.int64)

        def submit():
            start.wait(TIMEOUT)
            while True:
                try:
                    future = engine.run_async(ids, ids)
                except EngineClosedError:
                    return
                with lock:
                    futures.append(future)

        threads = [threading.Thread(target=submit) for _ in range(4)]
        for t in threads:
            t.start()
        start.wait(TIMEOUT)
        time.sleep(0.002 * (trial % 5))
        engine.close()
        for t in threads:
            t.join(TIMEOUT)
            assert not t.is_alive()
        done, pending = wait(futures, timeout=TIMEOUT)
        assert not pending, f"trial {trial}: {len(pending)} of {len(futures)} accepted requests never resolved"
        assert all(f.exception() is None for f in done)


def test_bad_inputs_are_one_line_errors(onnx_artifacts):
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0]) as emb:
        for bad, message in (([], "empty list"), ("one text", "list of texts"), ([1], "item #0")):
            with pytest.raises(ToolkitError, match=message):
                emb.encode(bad)
        for dim in (True, 0, 1000, 2.5):
            with pytest.raises(ToolkitError, match="dim must be"):
                emb.encode(["text"], dim=dim)
    with Reranker.from_artifacts(onnx_artifacts["reranker"][0]) as rr:
        with pytest.raises(ToolkitError, match="list of texts"):
            rr.rerank("query", "a bare document string")
        with pytest.raises(ToolkitError, match="pairs"):
            rr.score("qd")
        with pytest.raises(ToolkitError, match="item #0 must be a \\(query, document\\) pair"):
            rr.score(["qd"])
        with pytest.raises(ToolkitError, match="empty list"):
            rr.score([])
        with pytest.raises(ToolkitError, match="top_n"):
            rr.rerank("q", ["d"], top_n=0)
    for kwargs in ({"instances": 0}, {"instances": "many"}, {"queue_size": -1}, {"device_ids": ()}):
        with pytest.raises(ToolkitError, match="must be"):
            Embedder.from_artifacts(onnx_artifacts["embedding"][0], **kwargs)
        with pytest.raises(ToolkitError, match="must be"):
            Engine.from_artifact(onnx_artifacts["embedding"][0], **kwargs)


def test_device_ids_other_than_the_default_are_refused_for_a_cpu_artifact(onnx_artifacts, monkeypatch):
    """They pick GPUs: a CPU artifact accepted and ignored them. Refused before the artifact's files are hashed."""
    message = (r"^device ids \[1\] pick GPUs, and this is a CPU artifact \(its instances share the CPU's cores\): "
               "leave device_ids at its default, 0$")
    with pytest.raises(ToolkitError, match=message):
        Embedder.from_artifacts(onnx_artifacts["embedding"][0].parent, device_ids=1)
    monkeypatch.setattr(Manifest, "verify", lambda *a, **kw: pytest.fail("the artifact's files were hashed"))
    with pytest.raises(ToolkitError, match=message):
        Engine.from_artifact(onnx_artifacts["embedding"][0], device_ids=[1])
    assert check_engine_options(1, [np.int64(0)], 4, "cpu") == (1, (0,), 4)
    assert check_engine_options(1, (0, 1), 4, "cuda") == (1, (0, 1), 4)


def test_huge_text_is_cut_before_tokenizing(onnx_artifacts):
    """A text far longer than the largest bucket is cut (in characters) before it reaches the tokenizer: a 50 MB text
    used to be tokenised whole (7 GB, 61 s) to keep 64 tokens."""
    huge = "tokens and more tokens " * 200_000  # 4.6 MB
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0].parent, truncation="truncate") as emb:
        seen, tokenizer = [], emb.tokenizer
        encode = tokenizer.encode

        def recording(texts, *options):
            seen.extend(len(t) for t in texts)
            return encode(texts, *options)

        tokenizer.encode = recording
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            [row] = emb.tokenize([huge])
        expected = encode([huge[:5000]])[0][:63] + [ENDOFTEXT_ID]
    assert max(seen) <= 65 * 128 < len(huge)
    assert row == expected


def test_set_cpu_threads_refuses_more_threads_than_cores_as_the_cli_does():
    """`set_cpu_threads(64)` on a 2-core machine was accepted: TVM engines then ran 64 spinning threads."""
    from toolkit.runtime import CORES, set_cpu_threads

    before = CPU_BUDGET.threads
    with pytest.raises(ToolkitError, match=f"threads={CORES + 1} is more than this machine's {CORES} cores.*pass "
                                           f"threads={CORES} or fewer"):
        set_cpu_threads(CORES + 1)
    with pytest.raises(ToolkitError, match="threads must be an integer >= 1, got 0"):
        set_cpu_threads(0)
    assert CPU_BUDGET.threads == before


def test_an_engine_used_in_a_forked_child_is_refused_at_once(onnx_artifacts):
    """Its worker threads exist only in the process that loaded it: a forked child's request (os.fork, a
    multiprocessing 'fork' pool, gunicorn's preloaded workers) waited forever. Now its first call says so, naming
    what the user holds."""
    ids = np.ones((1, 4), np.int64)
    with Engine(lambda i, dev: InstantBackend()) as engine, \
            Embedder.from_artifacts(onnx_artifacts["embedding"][0]) as emb:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: writes each call's error; the alarm ends one that hangs, and the test fails
            try:
                os.close(read)
                signal.alarm(20)
                messages = []
                for call in (lambda: engine.run_sync(ids, ids), lambda: emb.encode_documents(["a text"])):
                    try:
                        call()
                        messages.append("no error")
                    except ToolkitError as e:
                        messages.append(str(e))
                os.write(write, json.dumps(messages).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            reported = pipe.read()
        os.waitpid(pid, 0)
        assert engine.run_sync(ids, ids).shape == (1, 2)  # the parent's engines are as they were
        assert emb.encode_documents(["a text"]).shape[0] == 1
    assert reported, "the child hung on its first call"
    fix = ("its engine threads exist only in the process that loaded it; load it in the child (or use "
           "multiprocessing's 'spawn' start method)")
    assert json.loads(reported) == [
        f"this {what} was loaded in process {os.getpid()} and is used in process {pid} (a forked child): {fix}"
        for what in ("engine", "Embedder")]


def test_attention_masks_that_are_not_left_padded_are_refused():
    """A right-padded row, or one with no token, ran and returned wrong outputs without an error (the models read the
    last position and count positions from the first real token)."""
    ids = np.ones((1, 4), np.int64)
    with Engine(lambda i, dev: InstantBackend()) as engine:
        for mask in ([[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 1, 0, 1]], [[0, 0, 1, 2]], [[0, 0, -1, 1]]):
            with pytest.raises(ToolkitError, match=r"^each attention_mask row must be 0\.\.\.0 1\.\.\.1 \(left-padded, "
                                                   r"at least one token\); pad rows on the left"):
                engine.run_sync(ids, np.array(mask))
        for mask in ([[0, 0, 1, 1]], [[1, 1, 1, 1]], [[0, 0, 0, 1]]):
            assert engine.run_sync(ids, np.array(mask)).shape == (1, 2)


class GatedBackend(Backend):
    """Counts its runs; with `fail_first` the first one fails, and every other waits for `release`."""

    task, seq_len, batch = EMBEDDING, 4, 1

    def __init__(self, release: threading.Event, fail_first: bool):
        self.release, self.fail_first, self.runs = release, fail_first, 0

    def run(self, input_ids, attention_mask):
        self.runs += 1
        if self.fail_first and self.runs == 1:
            raise RuntimeError("batch failed")
        self.release.wait(TIMEOUT)
        return np.zeros((len(input_ids), 2), np.float32)


def recorded_submissions(engine: Engine, monkeypatch, interrupt_at: int | None = None) -> list:
    """The futures of the batches queued on `engine` from now on; with `interrupt_at`, that submission raises
    KeyboardInterrupt instead (Ctrl-C while a full queue blocks it)."""
    submitted, run_async = [], engine.run_async

    def recording(*args, **kwargs):
        if len(submitted) == interrupt_at:
            raise KeyboardInterrupt
        submitted.append(run_async(*args, **kwargs))
        return submitted[-1]
    monkeypatch.setattr(engine, "run_async", recording)
    return submitted


def test_a_failed_batch_cancels_the_callers_batches_not_started(monkeypatch):
    """The caller's other batches ran on for nobody, and the next call waited behind them. One instance: the first
    batch fails, the second may have started (it waits), none after it may run."""
    release = threading.Event()
    backend = GatedBackend(release, fail_first=True)
    runner = BucketedRunner([Engine(lambda i, dev: backend, queue_size=16)])
    submitted = recorded_submissions(runner.engines[0], monkeypatch)
    with pytest.raises(RuntimeError, match="batch failed"):
        runner.run([[1, 2]] * 6)
    assert len(submitted) == 6 and all(f.cancelled() for f in submitted[2:])
    release.set()
    runner.close()  # runs every batch still queued and not cancelled
    assert backend.runs <= 2


def test_an_interrupt_while_submitting_cancels_the_batches_already_queued(monkeypatch):
    """Ctrl-C during a long encode left up to a queue's worth of batches to run for nobody."""
    release = threading.Event()
    backend = GatedBackend(release, fail_first=False)
    runner = BucketedRunner([Engine(lambda i, dev: backend, queue_size=16)])
    submitted = recorded_submissions(runner.engines[0], monkeypatch, interrupt_at=4)
    with pytest.raises(KeyboardInterrupt):
        runner.run([[1, 2]] * 6)
    assert len(submitted) == 4 and all(f.cancelled() for f in submitted[1:])  # the first may be running
    release.set()
    runner.close()
    assert backend.runs <= 1


def test_a_closed_model_says_what_closed_it_and_to_load_it_again(onnx_artifacts):
    """It said "the engine is closed; create a new one": the user holds an Embedder, not an engine."""
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0]) as emb:
        pass
    with pytest.raises(EngineClosedError, match=r"^this Embedder is closed \(close\(\), or the end of its with block, "
                                                r"stopped its engine threads\); load it again$"):
        emb.encode_documents(["a text"])
