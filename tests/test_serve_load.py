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
    failures_line,
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


def test_perf_serve_admits_every_client_past_the_servers_default_limit(embedding_set, tmp_path):
    """perf serve measures throughput, not admission: with more clients than `toolkit serve`'s default max concurrent
    requests (512), those past it were answered 429, and the figures covered fewer sentences than the offline run's.
    A max wait of 1 s holds the first requests for a fuller batch while the others arrive: all in flight at once."""
    clients = Limits.max_concurrent_requests + 88
    data = sts_jsonl(tmp_path, sentences(clients, seed=3))
    result = run_serve_load(ServeLoadOptions(artifact=embedding_set, data=data, limit=clients, clients=clients,
                                             max_wait_ms=1000), progress=False)
    (served,) = result["runs"]
    assert result["sentences"] == clients
    assert (served["failed"], served["half_load_failed"]) == (0, 0), serve_load_report(result)
    assert served["vs_offline"] > 0 and served["agreement"]["max_abs_diff"] <= TOLERANCE


def test_perf_serve_reports_failures_by_status_and_no_ratio_over_other_work(embedding_set, tmp_path):
    """A request that fails leaves the served run with less work than the offline run: its ratios to offline compared
    917 sentences with 1,024. They are left out, and the failures are reported by status with the first answer."""
    texts = sentences(15, seed=4) + ["alpha " * 400_000]  # last: over the server's payload limit (2 MB), a 413
    with pytest.warns(UserWarning, match="1 input.* truncated"):  # offline, the long one is cut to the largest SEQ
        result = run_serve_load(ServeLoadOptions(artifact=embedding_set, data=sts_jsonl(tmp_path, texts), limit=None,
                                                 clients=4), progress=False)
    (served,) = result["runs"]
    assert (served["failed"], served["failures"], served["half_load_failed"]) == (1, {"413": 1}, 0)
    assert served["vs_offline"] is served["token_slots_vs_offline"] is None
    assert served["sentences_per_s"] > 0 and "agreement" not in served
    report = serve_load_report(result)
    row = next(line for line in report.splitlines() if line.startswith("served, 4 clients"))
    assert row.split()[5] == row.split()[7] == "-", report  # the ratios, after sentences/s and after token slots
    assert report.splitlines()[-1].startswith("uvicorn: 1 of 16 requests at saturation (413: 1) failed; the first: "
                                              '413 {"error":"request body is larger than the payload limit'), report


def test_perf_serve_says_an_overloaded_run_needs_fewer_clients():
    run = {"name": "uvicorn", "failed": 3, "failures": {"429": 2, "ServerDisconnectedError": 1}, "half_load_failed": 1,
           "half_load_failures": {"TimeoutError": 1}, "first_failure": '429 {"error":"..."}'}
    assert failures_line({"sentences": 10, "repeat": 2}, run) == (
        'uvicorn: 3 of 20 requests at saturation (429: 2, ServerDisconnectedError: 1) and 1 at half load '
        '(TimeoutError: 1) failed; the first: 429 {"error":"..."}; sentences/s counts the answered ones, and no ratio '
        "to offline is given (the served run did less work); the server was overloaded: run with fewer --clients")


def sts_jsonl(tmp_path, texts: list[str]) -> str:
    """An STS-format evaluation file whose sentences are `texts`, in order (an even count)."""
    import json

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": 1.0}) + "\n"
                            for a, b in zip(texts[::2], texts[1::2])))
    return str(data)


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



TERMINATED = """
import os, sys, threading
from pathlib import Path
from toolkit.perf import serve_load
from toolkit.perf.cli import perf

def say_then_block(pid):  # the phase reached: names the child it runs in (whole: renamed into place), never ends
    Path(sys.argv[1] + ".tmp").write_text(str(pid))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    threading.Event().wait()

def block_offline(options, texts, progress):  # the offline run, in its child
    say_then_block(os.getpid())

def block_served(name, server, *args):  # the served run, the server up
    say_then_block(server.process.pid)

if __name__ == "__main__":
    if sys.argv[3] == "offline":
        serve_load.run_offline = block_offline
    else:
        serve_load.measure_server = block_served
    perf(["serve", "--artifact", sys.argv[2], "--data", "sts12-sample", "--limit", "4", "--clients", "2"])
"""


@pytest.mark.parametrize("phase", ["offline", "served"])
def test_perf_serve_terminated_stops_its_children_and_exits_143(phase, embedding_set, tmp_path):
    """SIGTERM (a supervisor's stop) ended perf serve alone: the offline run's child, or the `toolkit serve` child,
    went on without a parent. Now it stops them as Ctrl-C does, and exits 143."""
    import os
    import signal
    import subprocess
    import sys

    script, started, log = tmp_path / "terminated.py", tmp_path / "child-started", tmp_path / "perf.log"
    script.write_text(TERMINATED)
    with log.open("w") as output:  # a file, not a pipe: a child left behind would hold a pipe open
        perf = subprocess.Popen([sys.executable, str(script), str(started), str(embedding_set), phase],
                                stdout=output, stderr=subprocess.STDOUT)
    child = None
    try:
        wait_until(lambda: started.exists() or perf.poll() is not None)
        assert started.exists(), log.read_text()
        child = int(started.read_text())
        perf.send_signal(signal.SIGTERM)
        perf.wait(TIMEOUT)
        wait_until(lambda: not running(child))
        assert (perf.returncode, running(child)) == (143, False), log.read_text()
    finally:
        perf.kill()
        if child is not None and running(child):
            os.kill(child, signal.SIGKILL)  # left behind


def wait_until(condition) -> None:
    """Poll `condition` until it holds or TIMEOUT seconds have passed."""
    import time

    deadline = time.monotonic() + TIMEOUT
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether a process of this id runs (a zombie, exited and not yet collected, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
