"""Embedder/Reranker: option checks, lifetime, the other task's checkpoints, damaged artifacts, token ids, and where
errors and warnings point."""
import gc
import json
import shutil
import subprocess
import sys
import threading
import time
import warnings
import weakref

import numpy as np
import pytest

from toolkit.api import REFERENCE_MAX_LENGTH, Embedder, Reranker, check_instruction
from toolkit.backends import Backend
from toolkit.checkpoint import CheckpointTensors
from toolkit.errors import ToolkitError
from toolkit.runtime import Engine
from toolkit.tasks import EMBEDDING, check_instruction_text
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID, MAX_CONTEXT

from conftest import copy_artifact

TIMEOUT = 60  # seconds: every wait in these tests is bounded
LONG = "word " * 300  # more tokens than any test set's largest SEQ


def engine_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("engine-")}


def wait_until(condition) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def as_released(checkpoint, directory):
    """A copy of a synthetic checkpoint without its synthetic mark: its task shows only in its weights' layout."""
    copy = shutil.copytree(checkpoint, directory)
    config = json.loads((copy / "config.json").read_text())
    del config["synthetic"]
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("batch_size", [-1, 0, "8", 2.5, True, None])
def test_from_checkpoint_refuses_a_batch_size_that_is_not_a_count(checkpoints, batch_size):
    """-1 embedded three texts as one NaN row, 0 failed in range(), "8" and 2.5 with a TypeError."""
    with pytest.raises(ToolkitError, match=rf"^batch_size must be an integer >= 1, got {batch_size!r}$"):
        Embedder.from_checkpoint(checkpoints["embedding"], batch_size=batch_size)


@pytest.mark.parametrize("max_length", [0, "64", 2.5, MAX_CONTEXT + 1, 10 ** 6])
def test_from_checkpoint_refuses_a_max_length_outside_the_context(checkpoints, max_length):
    """0 ended in a raw TypeError at the first input, 10**6 was taken beyond Qwen3's context."""
    with pytest.raises(ToolkitError, match=rf"^max_length must be an integer in 1..{MAX_CONTEXT} \(the checkpoint's "
                                           "context"):
        Reranker.from_checkpoint(checkpoints["reranker"], max_length=max_length)


def test_from_checkpoint_caps_its_default_max_length_at_the_checkpoints_context(checkpoints, tmp_path):
    """The default (8192) was checked against max_position_embeddings: a checkpoint with a shorter context was
    refused over an argument nobody passed."""
    short = shutil.copytree(checkpoints["embedding"], tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    with Embedder.from_checkpoint(short) as model:
        assert model.max_length == 64
    with Embedder.from_checkpoint(checkpoints["embedding"]) as model:
        assert model.max_length == REFERENCE_MAX_LENGTH


def test_from_checkpoint_runs_a_checkpoint_saved_as_pytorch_model_bin(checkpoints, tmp_path):
    """The weights-layout check read safetensors only, so it refused a checkpoint from_pretrained loads; compile,
    which reads safetensors, still refuses it, naming what it holds."""
    import torch
    from safetensors.torch import load_file

    saved_as_bin = as_released(checkpoints["embedding"], tmp_path / "bin")
    weights = {}
    for file in saved_as_bin.glob("model*.safetensors*"):
        if file.suffix == ".safetensors":
            weights.update(load_file(file))
        file.unlink()
    torch.save(weights, saved_as_bin / "pytorch_model.bin")
    with Embedder.from_checkpoint(saved_as_bin) as model, Embedder.from_checkpoint(checkpoints["embedding"]) as same:
        assert np.array_equal(model.encode_documents(["Hello world"]), same.encode_documents(["Hello world"]))
    with pytest.raises(ToolkitError, match=r"has no safetensors weights .*; it holds pytorch_model.bin: the toolkit "
                                           "reads safetensors"):
        CheckpointTensors(saved_as_bin, False)


def test_truncation_is_checked_before_any_model_is_loaded(checkpoints, onnx_artifacts, monkeypatch):
    """It was checked once the torch model (or every engine) was loaded."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before truncation was checked")

    monkeypatch.setattr(Engine, "from_checkpoint", load)
    monkeypatch.setattr(Engine, "from_artifact", load)
    for open_model, source in ((Embedder.from_checkpoint, checkpoints["embedding"]),
                               (Embedder.from_artifacts, onnx_artifacts["embedding"][0].parent)):
        with pytest.raises(ToolkitError, match=r"^truncation must be one of \('error', 'truncate'\), got 'cut'$"):
            open_model(source, truncation="cut")


BLOCKED_QUEUE = """
import sys, threading
import numpy as np
from toolkit.api import Embedder
from toolkit.backends import Backend
from toolkit.checkpoint import load_tokenizer
from toolkit.runner import BucketedRunner
from toolkit.runtime import Engine
from toolkit.tasks import EMBEDDING, check_instruction_text

running = threading.Event()

class Blocked(Backend):
    task, seq_len, batch = EMBEDDING, 8, 1

    def run(self, input_ids, attention_mask):
        running.set()
        threading.Event().wait()  # never returns: an exit that waits for this queue never comes

model = Embedder(BucketedRunner([Engine(lambda i, dev: Blocked())]), load_tokenizer(sys.argv[1]))
model.runner.submit([[1]] * 20)  # 20 batches, never waited for
assert running.wait(60)
print("exiting", flush=True)
"""


def test_a_model_never_closed_does_not_hold_the_interpreter_exit_for_its_queue(checkpoints):
    """Its finalizer ran at exit, closing the engines, which first run every batch queued: minutes at 8B (and a Ctrl-C
    in `encode` waited for them). Here a batch never finishes: an exit that waits for the queue hangs until the
    timeout."""
    done = subprocess.run([sys.executable, "-c", BLOCKED_QUEUE, str(checkpoints["embedding"])], capture_output=True,
                          text=True, timeout=TIMEOUT, check=True)
    assert done.stdout == "exiting\n"


def test_a_model_never_closed_releases_its_engines_when_dropped(onnx_artifacts):
    """The engines' worker threads held them: 20 models opened and dropped kept 40 threads and their sessions."""
    before = engine_threads()
    for _ in range(3):
        emb = Embedder.from_artifacts(onnx_artifacts["embedding"][0].parent)
        emb.encode_documents(["x"])
        engines, dropped = emb.runner.engines, weakref.ref(emb)
        del emb
        gc.collect()
        assert dropped() is None
        assert wait_until(lambda: engine_threads() <= before), engine_threads() - before
        assert all(e.backends == [] for e in engines)
    with Reranker.from_artifacts(onnx_artifacts["reranker"][0].parent) as rr:  # closing it detaches the finalizer
        rr.score([("q", "d")])
    assert engine_threads() <= before


class ClosedOnWorker(Backend):
    task, seq_len, batch = EMBEDDING, 4, 1

    def __init__(self):
        self.closes = 0

    def run(self, input_ids, attention_mask):
        return np.zeros((1, 2), np.float32)

    def close(self):
        self.closes += 1


def test_an_engine_closed_on_its_own_worker_thread_stops_and_releases_its_backend():
    """A finalizer the garbage collector runs on a worker (here: a future's callback, run there) used to join the
    current thread: RuntimeError, the backend never released. Each instance's backend is closed, once."""
    backends = []

    def make_backend(index, device):
        backends.append(ClosedOnWorker())
        return backends[-1]
    engine = Engine(make_backend, instances=2)
    ids = np.ones((1, 4), np.int64)
    future = engine.run_async(ids, ids)
    future.add_done_callback(lambda _: engine.close())
    assert future.result(timeout=TIMEOUT).shape == (1, 2)
    assert wait_until(lambda: not any(w.is_alive() for w in engine._workers))
    assert wait_until(lambda: engine.backends == []) and [b.closes for b in backends] == [1, 1]


def test_from_checkpoint_refuses_the_other_tasks_checkpoint_naming_the_class(checkpoints, tmp_path):
    """Embedder.from_checkpoint ran a reranker checkpoint without a word (toolkit compile refuses it)."""
    with pytest.raises(ToolkitError, match="is a synthetic reranker checkpoint and Embedder.from_checkpoint runs "
                                           "embedding models: load it with Reranker.from_checkpoint, or pass a "
                                           "checkpoint of the embedding task"):
        Embedder.from_checkpoint(checkpoints["reranker"])
    released = as_released(checkpoints["embedding"], tmp_path / "embedding")
    with pytest.raises(ToolkitError, match="holds a bare Qwen3Model's weights .* Reranker.from_checkpoint runs "
                                           "reranker models: load it with Embedder.from_checkpoint"):
        Reranker.from_checkpoint(released)
    released = as_released(checkpoints["reranker"], tmp_path / "reranker")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Embedder.from_checkpoint(released).close()  # a causal LM may be an embedding model: warned, not refused
    [warning] = [w for w in caught if "causal LM's weights" in str(w.message)]
    assert "load it with Reranker.from_checkpoint" in str(warning.message) and warning.filename == __file__


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_damaged_tokenizer_file_is_reported_as_a_damaged_artifact(onnx_artifacts, tmp_path, damage):
    """It failed in the tokenizer ("You need to have sentencepiece or tiktoken installed..."): the tokenizer was
    loaded before the manifest's hashes were checked."""
    artifact = copy_artifact(onnx_artifacts["embedding"][0], tmp_path)
    tokenizer_file = artifact / "tokenizer" / "tokenizer.json"
    if damage == "missing":
        tokenizer_file.unlink()
    else:
        tokenizer_file.write_text("{not json")
    with pytest.raises(ToolkitError, match=r"does not match its manifest \(tokenizer/tokenizer.json: .*recompile it "
                                           "with `toolkit compile`"):
        Embedder.from_artifacts(artifact.parent)


def test_token_ids_outside_the_vocabulary_are_refused(onnx_artifacts):
    """ids >= vocab read zeros on TVM and failed inside ONNX Runtime; negative ones wrapped around."""
    with Engine.from_artifact(onnx_artifacts["embedding"][0]) as engine:
        for bad in (151669, -1):
            ids, mask = left_pad([[5, bad, ENDOFTEXT_ID]] * engine.batch, engine.seq_len, ENDOFTEXT_ID)
            with pytest.raises(ToolkitError, match=r"^token ids must be in 0..151668 \(the model's vocabulary\), "
                                                   rf"got {min(bad, 5)}\.\.{max(bad, ENDOFTEXT_ID)}"):
                engine.run_sync(ids, mask)


def test_instructions_and_flags_of_the_wrong_type_are_refused(onnx_artifacts):
    """A list instruction was formatted as "Instruct: ['x']", 5 failed deep inside, "no" normalised (truthy)."""
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0]) as emb:
        for call in (lambda: emb.format(["a"], instruction=["x"]), lambda: emb.encode_queries(["a"], instruction=5),
                     lambda: emb.encode(["a"], instruction=[])):
            with pytest.raises(ToolkitError, match=r"^instruction must be a text \(or None for the default\), got"):
                call()
        for flag in ("normalize", "progress"):
            with pytest.raises(ToolkitError, match=f"^{flag} must be True or False, got 'no'$"):
                emb.encode_documents(["a"], **{flag: "no"})
    with Reranker.from_artifacts(onnx_artifacts["reranker"][1]) as rr:
        with pytest.raises(ToolkitError, match="^instruction must be a text"):
            rr.score([("q", "d")], instruction=5)
        with pytest.raises(ToolkitError, match="^return_documents must be True or False, got 'yes'$"):
            rr.rerank("q", ["d"], return_documents="yes")


def test_a_whitespace_instruction_is_refused(onnx_artifacts):
    """An embedding query was formatted with an instruction line holding no instruction; "" still means none."""
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0]) as emb:
        with pytest.raises(ToolkitError, match=r"^the instruction ' \\n' is only whitespace: give one with words, "):
            emb.encode_queries(["a"], instruction=" \n")
        assert emb.format(["a"], instruction="") == ["a"]
    with Reranker.from_artifacts(onnx_artifacts["reranker"][1]) as rr:
        with pytest.raises(ToolkitError, match="^the instruction '  ' is only whitespace"):
            rr.score([("q", "d")], instruction="  ")


def test_rerank_takes_sentence_transformers_top_k(onnx_artifacts):
    docs = ["Beijing.", "Gravity pulls.", "Paris is in France."]
    with Reranker.from_artifacts(onnx_artifacts["reranker"][1]) as rr:
        assert rr.rerank("capital", docs, top_k=2) == rr.rerank("capital", docs, top_n=2) \
            == rr.rerank("capital", docs)[:2]
        with pytest.raises(ToolkitError, match="^pass top_k or top_n, not both"):
            rr.rerank("capital", docs, top_n=1, top_k=1)
        with pytest.raises(ToolkitError, match="^top_k must be an integer >= 1, got 0$"):
            rr.rerank("capital", docs, top_k=0)


def test_paths_and_device_ids_are_checked(onnx_artifacts, monkeypatch):
    """None and device_ids=0 failed with raw TypeErrors; one device number is one device, as --device-ids 0 is."""
    import toolkit.runtime as runtime

    real_open_backend = runtime.open_backend
    with pytest.raises(ToolkitError, match="^path must be an artifact directory .*got NoneType$"):
        Embedder.from_artifacts(None)
    with pytest.raises(ToolkitError, match="^checkpoint must be a checkpoint directory or a hub id .*got NoneType$"):
        Embedder.from_checkpoint(None)
    for bad in ("0", [0, "1"], None):
        with pytest.raises(ToolkitError, match="^device_ids must be a device number or a non-empty list of them"):
            Embedder.from_artifacts(onnx_artifacts["embedding"][0], device_ids=bad)
    opened = []

    def open_backend(manifest, threads, device_id):
        opened.append(device_id)
        return real_open_backend(manifest, threads, device_id)
    monkeypatch.setattr(runtime, "open_backend", open_backend)
    by_devices = {}
    for device_ids in (0, [0]):  # one number is that device for every instance, as a list of it is
        opened.clear()
        with Embedder.from_artifacts(onnx_artifacts["embedding"][0], instances=2, device_ids=device_ids) as emb:
            assert emb.encode_documents(["a"]).shape[0] == 1
        by_devices[repr(device_ids)] = list(opened)
    assert by_devices == {"0": [0, 0], "[0]": [0, 0]}
    # any other device is a GPU's, which a CPU artifact refuses (before it opens); for a GPU's: 1 is [1]
    for device_ids in (1, [1]):
        with pytest.raises(ToolkitError, match=r"^device ids \[1\] pick GPUs, and this is a CPU artifact"):
            Embedder.from_artifacts(onnx_artifacts["embedding"][0], device_ids=device_ids)
    assert opened == [0, 0]  # the last [0] run's: the refused ones opened nothing
    assert runtime.check_engine_options(2, 1, 8, "cuda") == runtime.check_engine_options(2, [1], 8, "cuda") \
        == (2, (1,), 8)


def test_numpy_integers_are_integers_everywhere_and_bools_are_not(onnx_artifacts):
    """dim took np.int64 but top_n, max_length, instances and queue_size refused it."""
    one = np.int64(1)
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0].parent, instances=one, queue_size=np.int64(4),
                                 device_ids=[np.int64(0)], max_length=np.int64(40)) as emb:
        assert emb.max_length == 40 and emb.encode_documents(["a"], dim=np.int64(8)).shape == (1, 8)
    with Reranker.from_artifacts(onnx_artifacts["reranker"][1]) as rr:
        assert len(rr.rerank("q", ["a", "b"], top_n=one)) == 1
        with pytest.raises(ToolkitError, match="top_n must be an integer >= 1"):
            rr.rerank("q", ["a", "b"], top_n=True)
    for kwargs in ({"instances": True}, {"queue_size": True}, {"max_length": True}):
        with pytest.raises(ToolkitError, match="must be"):
            Embedder.from_artifacts(onnx_artifacts["embedding"][0], **kwargs)


def test_invalid_unicode_is_placed_in_the_users_own_text(onnx_artifacts):
    """The position was the one in the formatted prompt ("at character 93" for a query's third character), and a
    reranker did not say whether the query or the document was at fault."""
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0]) as emb:
        with pytest.raises(ToolkitError, match=r"^text #1 is not valid Unicode \(surrogates not allowed at character "
                                               r"2\); send UTF-8 text$"):
            emb.encode_queries(["fine", "ab\ud800"])
        with pytest.raises(ToolkitError, match=r"^the instruction is not valid Unicode \(surrogates not allowed at "
                                               r"character 1\)"):
            emb.encode_queries(["fine"], instruction="a\ud800")
    with Reranker.from_artifacts(onnx_artifacts["reranker"][1]) as rr:
        with pytest.raises(ToolkitError, match=r"^the document of pair #1 is not valid Unicode \(surrogates not "
                                               r"allowed at character 3\)"):
            rr.score([("q", "d"), ("q", "doc\ud800")])
        with pytest.raises(ToolkitError, match=r"^the query of pair #0 is not valid Unicode \(surrogates not allowed "
                                               r"at character 0\)"):
            rr.rerank("\ud800q", ["d"])


def test_the_truncation_warning_points_at_the_users_call(onnx_artifacts):
    """stacklevel=5 pointed into api.py for every entry point but one."""
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0].parent, truncation="truncate") as emb, \
            Reranker.from_artifacts(onnx_artifacts["reranker"][0].parent, truncation="truncate") as rr:
        for call in (lambda: emb.encode_documents([LONG]), lambda: emb.encode_queries([LONG]),
                     lambda: emb.encode([LONG]), lambda: emb.tokenize([LONG]), lambda: rr.score([("q", LONG)]),
                     lambda: rr.rerank("q", [LONG])):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                call()
            [warning] = caught
            assert "truncated" in str(warning.message) and warning.filename == __file__, warning


def test_refused_instructions_are_named_in_a_message_that_does_not_grow_with_them():
    """A service answers these messages to its clients: a 100,000-character instruction was echoed whole."""
    for check, instruction in ((lambda text: check_instruction("Judge", text), "x" * 100_000),
                               (check_instruction_text, " " * 100_000)):
        with pytest.raises(ToolkitError) as refused:
            check(instruction)
        assert len(str(refused.value)) < 600 and "... (99" in str(refused.value)


def test_input_type_errors_name_the_method_called_and_the_fix(onnx_artifacts):
    """A generator or a numpy array got "wrap a single text in a list" (their fix is list(...)), and the messages of
    encode_documents / encode_queries named `encode`, a method the user never called."""
    with Embedder.from_artifacts(onnx_artifacts["embedding"][0]) as emb:
        for method, texts, message in (
                (emb.encode_documents, "one text", "encode_documents takes a list of texts, got str; wrap a single "
                                                   "text in a list"),
                (emb.encode_documents, (t for t in ["a"]), "encode_documents takes a list of texts, got generator; "
                                                           "convert it with list(...)"),
                (emb.encode_queries, np.array(["a", "b"]), "encode_queries takes a list of texts, got ndarray; "
                                                           "convert it with list(...)"),
                (emb.encode_documents, None, "encode_documents takes a list of texts, got NoneType"),
                (emb.encode_documents, [], "encode_documents got an empty list; pass at least one text"),
                (emb.encode_queries, ["a", None], "encode_queries: item #1 is a NoneType, not a text"),
                (emb.encode, [], "encode got an empty list; pass at least one text"),
                (emb.format, "one text", "format takes a list of texts, got str; wrap a single text in a list")):
            with pytest.raises(ToolkitError) as refused:
                method(texts)
            assert str(refused.value) == message
    with Reranker.from_artifacts(onnx_artifacts["reranker"][0]) as rr:
        with pytest.raises(ToolkitError, match=r"^score takes a list of \(query, document\) pairs, got list_iterator; "
                                               r"convert it with list\(\.\.\.\)$"):
            rr.score(iter([("query", "document")]))
        with pytest.raises(ToolkitError, match=r"^score takes a list of \(query, document\) pairs, got str$"):
            rr.score("query and document")


def test_paths_that_name_no_model_say_what_to_pass(onnx_artifacts):
    """"" searched the current directory; an artifact set passed as a checkpoint was only "not a Hugging Face
    checkpoint directory"; the wrong task's set asked for "a embedding set"."""
    for load in (Embedder.from_artifacts, Reranker.from_artifacts):
        with pytest.raises(ToolkitError, match="^the artifact path is empty; name an artifact directory or a bucket "
                                               "set"):
            load("")
    with pytest.raises(ToolkitError, match="^the checkpoint path is empty; name a checkpoint directory or a hub id"):
        Embedder.from_checkpoint("")
    artifact = onnx_artifacts["embedding"][0]
    for compiled in (artifact, artifact.parent):
        with pytest.raises(ToolkitError, match=r"is not a Hugging Face checkpoint directory \(no config.json\): it "
                                               r"holds compiled artifacts \(manifest.json\); run them with "
                                               r"Embedder/Reranker.from_artifacts"):
            Embedder.from_checkpoint(compiled)
    with pytest.raises(ToolkitError, match="not embedding ones: pass an embedding set"):
        Embedder.from_artifacts(onnx_artifacts["reranker"][0])
