"""The service under load on loopback, bounded in count and time: 5,000 requests from 64 concurrent clients, each with a
known expected output, come back complete and right (and batched across requests); an overload is answered with 429s
and Retry-After, never a 500, and the server is healthy after.

The clients are aiohttp's (the `perf serve` load generator): httpx spends about 10 ms of CPU per request, which on two
cores would make the client, not the server, what the test measures."""
import asyncio
import re
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from serving import TIMEOUT, bucket_sets, serve_process, served

from toolkit.api import Embedder
from toolkit.errors import ToolkitError
from toolkit.perf.serve_load import (
    ServeLoadOptions,
    ServerProcess,
    closed_loop,
    in_child,
    measure_server,
    run_offline,
    run_serve_load,
    serve_load_report,
)
from toolkit.serve.app import create_app
from toolkit.serve.service import Limits

REQUESTS, CLIENTS = 5000, 64
TOLERANCE = 1e-5  # a row's vector may differ in the last bits with the batch it shares (another GEMM shape)
WORDS = ["alpha", "beta", "gamma", "delta", "北京", "river", "stone", "capital", "的", "light"]


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(n))) for n in rng.integers(1, 40, count)]


@pytest.fixture(scope="module")
def embedding_set(onnx_artifacts):
    return bucket_sets(onnx_artifacts)["embedding"]


async def bounded(load, seconds: float = 600):
    """The load, failed if it takes longer than `seconds` in all (each request has its own timeout as well)."""
    return await asyncio.wait_for(load, seconds)


def test_5000_requests_from_64_clients_none_lost_none_mismatched(embedding_set):
    texts = sentences(200)
    with Embedder.from_artifacts(embedding_set) as offline:
        expected = offline.encode(texts)
    rng = np.random.default_rng(1)
    picks = [list(rng.integers(0, len(texts), rng.choice([1, 1, 1, 2, 3]))) for _ in range(REQUESTS)]
    bodies = [{"inputs": [texts[i] for i in pick]} for pick in picks]
    # two single-thread instances per bucket: two batches run at once
    with serve_process("--embedding", embedding_set, "--max-wait-ms", 1, "--instances", 2, "--threads", 2) as (base, _):
        answers, _ = asyncio.run(bounded(closed_loop(base, "/embed", bodies, CLIENTS, TIMEOUT)))
        metrics = httpx.get(f"{base}/metrics", timeout=TIMEOUT).text
    lost = [a for a in answers if a.status != 200]
    assert not lost, f"{len(lost)} lost, e.g. {lost[0]!r}"
    mismatched = [i for i, (a, pick) in enumerate(zip(answers, picks))
                  if np.max(np.abs(np.array(a.body) - expected[pick])) > TOLERANCE]
    assert not mismatched, f"{len(mismatched)} mismatched, e.g. request {mismatched[0]}"
    batches = float(re.search(r'toolkit_batch_rows_count\{model="embedding"\} (\S+)', metrics).group(1))
    assert batches < REQUESTS  # apart, every request would need a batch of its own: requests shared batches


def test_overload_is_429_with_retry_after_never_500_and_health_after(embedding_set):
    texts = sentences(64, seed=2)
    with Embedder.from_artifacts(embedding_set) as offline:
        expected = offline.encode(texts)
    # two requests in flight at most, each waiting for company: 64 at once overflow it
    app = create_app(Embedder.from_artifacts(embedding_set), limits=Limits(max_concurrent_requests=2, max_wait_ms=200))
    with served(app) as base:
        answers, _ = asyncio.run(bounded(closed_loop(base, "/embed", [{"inputs": t} for t in texts], CLIENTS, TIMEOUT)))
        statuses = [a.status for a in answers]
        assert set(statuses) == {200, 429}, statuses
        for answer, want in zip(answers, expected):
            if answer.status == 429:
                assert answer.headers["retry-after"] == "1"
                assert "max concurrent requests (2)" in answer.body["error"]
            else:
                assert np.max(np.abs(np.array(answer.body[0]) - want)) <= TOLERANCE
        assert httpx.get(f"{base}/health", timeout=TIMEOUT).json() == {"status": "ok"}
        after = httpx.post(f"{base}/embed", json={"inputs": texts[0]}, timeout=TIMEOUT)
        assert after.status_code == 200 and np.max(np.abs(np.array(after.json()[0]) - expected[0])) <= TOLERANCE


def test_perf_serve_rates_each_served_run_against_the_offline_runs_around_it(embedding_set):
    result = run_serve_load(ServeLoadOptions(artifact=embedding_set, data="sts12-sample", limit=16, clients=4),
                            progress=False)
    (served,), offline_runs = result["repeats"][0]["runs"], result["repeats"][0]["offline"]["runs"]
    assert len(offline_runs) == 2 and served["offline_around"] == offline_runs
    assert served["vs_offline"] == pytest.approx(served["sentences_per_s"] / np.mean(offline_runs))
    assert served["failed"] == served["half_load_failed"] == 0 and served["exit_code"] == 0
    assert served["agreement"]["max_abs_diff"] <= TOLERANCE
    assert result["runs"][0]["vs_offline"] == served["vs_offline"]  # one repeat: its figures are the medians
    assert "served, 4 clients (uvicorn)" in serve_load_report(result)
    # ONNX Runtime pads a batch to its longest row: the slots depend on which rows share a batch, served or offline
    assert served["token_slots"] > 0 and result["offline"]["token_slots"] > 0
    assert served["token_slots_vs_offline"] == pytest.approx(served["token_slots"] / result["offline"]["token_slots"])


def test_perf_serve_quotes_the_first_failure_when_no_request_succeeds(embedding_set):
    """Not a rate of 0 (and a division by it for the half load): the error says what the server answered."""
    app = create_app(Embedder.from_artifacts(embedding_set), limits=Limits(payload_limit=10))
    with served(app) as base, pytest.raises(ToolkitError) as error:
        measure_server("uvicorn", SimpleNamespace(base=base), sentences(4), [], np.zeros((4, 64)), clients=2)
    assert str(error.value).startswith("the server (uvicorn) answered no request with 200; the first answer: 413 "
                                       '{"error":"request body is larger than the payload limit (10 bytes)')


def test_perf_serve_brings_the_offline_childs_warnings_back_as_one_line_each(embedding_set, capfd):
    """The offline run's child would print Python's raw warnings (file, line, source) into the user's terminal; they
    come back and are warned in the parent, where the command line prints `warning: MESSAGE`."""
    texts = sentences(4) + ["alpha " * 100]  # one input longer than the set's largest SEQ (64): truncated
    with pytest.warns(UserWarning, match=r"^1 input\(s\) truncated to 64 tokens$"):
        _, vectors, _, _ = in_child("the offline run", run_offline, ServeLoadOptions(artifact=embedding_set), texts,
                                  False)
    assert len(vectors) == len(texts)
    printed = capfd.readouterr().err
    assert "truncated" not in printed and "Warning" not in printed, printed


def test_perf_serve_says_in_one_line_when_its_child_dies():
    """Killed (for memory, say) or crashed: a one-line error, not BrokenProcessPool's traceback."""
    import os

    with pytest.raises(ToolkitError, match=r"^a child process of perf serve \(the offline run\) died before it "
                                           "finished .*; free memory"):
        in_child("the offline run", os._exit, 3)


INTERRUPTED = """
import multiprocessing, os, signal, sys, threading, time
from pathlib import Path
from toolkit.perf.serve_load import in_child

def mark_started_then_block(path):  # the child: says it has started its run, which never ends
    Path(path).write_text(str(os.getpid()))
    threading.Event().wait()

def interrupt_once_started(path):  # a real SIGINT (interrupt_main would not wake a wait on a lock)
    while not Path(path).exists():
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)

if __name__ == "__main__":
    threading.Thread(target=interrupt_once_started, args=(sys.argv[1],), daemon=True).start()
    try:
        in_child("the offline run", mark_started_then_block, sys.argv[1])
    except KeyboardInterrupt:
        print("interrupted; children left:", len(multiprocessing.active_children()), flush=True)
"""


def test_perf_serve_interrupted_stops_its_child_instead_of_waiting_for_it(tmp_path):
    """SIGINT to perf serve alone (a supervisor's, `timeout -s INT`): the executor's exit waited for the child's run,
    then the interpreter's exit for the idle child, so perf serve hung until killed. Here the child's run never ends:
    waiting for it hangs until the timeout."""
    import os
    import signal
    import subprocess
    import sys

    script, started = tmp_path / "interrupted.py", tmp_path / "child-started"
    script.write_text(INTERRUPTED)
    try:
        done = subprocess.run([sys.executable, str(script), str(started)], capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(int(started.read_text()), signal.SIGKILL)  # the child left behind, blocked for good
        raise
    assert done.returncode == 0 and done.stdout == "interrupted; children left: 0\n", done.stdout + done.stderr


def test_perf_serve_closes_the_servers_log_whether_or_not_it_came_up(tmp_path, monkeypatch):
    failed = ServerProcess(["--embedding", tmp_path / "missing"])
    with pytest.raises(ToolkitError, match=r"(?s)`toolkit serve` did not come up \(exit 2\):.*missing: no such "
                                           "directory"), failed:
        pass
    assert failed.log.closed  # the child's output, its last lines in the error above
    monkeypatch.setattr(ServerProcess, "healthy", lambda self: True)
    with ServerProcess(["--embedding", tmp_path / "missing"]) as up:
        pass
    assert up.log.closed
