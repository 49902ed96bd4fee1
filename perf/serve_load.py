"""`perf serve`: what `toolkit serve` delivers on real sentences, against the offline API on the same artifacts.

1. offline: `Embedder.encode_documents` over every sentence at once (the best batching there is): sentences/s;
2. served: `toolkit serve` as a child process, `clients` concurrent connections each sending one sentence per request
   as soon as its last one is answered (closed loop): sentences/s, the ratio to offline, agreement with its vectors,
   and the token slots its batches computed (from `/metrics`) against offline's: how much the service loses to
   packing, a figure the machine's drift does not move. The server admits every request sent; should some fail all
   the same, they are counted by status, and the run has no ratios to offline (it did less work);
3. at half that load: requests arriving at a fixed rate of half the served throughput (open loop): latency p50 / p99;
4. with `ray_replicas`: 2 and 3 again on `toolkit serve --ray --replicas N` (a local Ray instance).

An offline run goes before and after each served run, and a served run's ratio is to the mean of those two (a shared
machine drifts by more than the gap being measured). With `repeat` > 1 the whole sequence runs that many times and
each figure is the median.

    result = run_serve_load(ServeLoadOptions(artifact="ws/emb/onnx", data="sts12", limit=256, ray_replicas=2))
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import numpy as np
import orjson

from toolkit.api import Embedder, check_set
from toolkit.buckets import token_lengths
from toolkit.errors import ToolkitError, check_int
from toolkit.eval.datasets import load_dataset
from toolkit.perf.common import check_instances, median
from toolkit.perf.traffic import warmup_subset
from toolkit.report import format_columns
from toolkit.runtime import AUTO_INSTANCES, check_threads, set_cpu_threads
from toolkit.scheduler import check_max_batch_tokens, check_max_wait_ms
from toolkit.serve.service import Limits
from toolkit.tasks import EMBEDDING

REQUEST_TIMEOUT_S = 600  # per request: at saturation a request waits for `clients` others on a slow model
STARTUP_TIMEOUT_S = 900  # loading a bucket set of a large model (and starting Ray) takes minutes


@dataclass(frozen=True)
class ServeLoadOptions:
    """What `perf serve` measures. `artifact`: an embedding bucket set; `data`: an evaluation JSONL path or name whose
    sentences are the requests; `limit`: the first N sentences; `clients`: concurrent connections at saturation;
    `instances` / `threads`: the server's (and the offline run's) engine settings; `max_wait_ms` / `max_batch_tokens`:
    the server's batching; `ray_replicas`: also measure Ray Serve with that many replicas; `repeat`: times to run it
    all (the figures are medians)."""

    artifact: str | Path
    data: str = "sts12"
    limit: int | None = 256
    clients: int = 64
    instances: int | str = AUTO_INSTANCES
    threads: int | None = None
    max_wait_ms: float = Limits.max_wait_ms
    max_batch_tokens: int = Limits.max_batch_tokens
    ray_replicas: int | None = None
    repeat: int = 1

    def check(self) -> "ServeLoadOptions":
        """Raise ToolkitError (naming the option) for the first invalid field; return self. (`max_batch_tokens`
        against the set's largest SEQ: `run_serve_load`, which reads the set.)"""
        if self.limit is not None:
            check_int(self.limit, "--limit", 1)
        check_int(self.clients, "--clients", 1)
        check_instances(self.instances)
        check_int(self.repeat, "--repeat", 1)
        if self.ray_replicas is not None:
            check_int(self.ray_replicas, "--ray-replicas", 1)
        check_threads(self.threads, self.ray_replicas or 1, "--ray-replicas")
        check_max_wait_ms(self.max_wait_ms, "--max-wait-ms")  # the server's own checks, before the offline run
        return self


@dataclass
class Answer:
    """One HTTP request's outcome: status, headers (lower-case names) and JSON body (its text if not JSON), or the
    client error; seconds from send to answer."""

    seconds: float
    status: int | None = None
    headers: dict | None = None
    body: object = None
    error: str | None = None


# ---- load generators ------------------------------------------------------------------------------------------------
async def closed_loop(base: str, path: str, bodies: list, clients: int,
                      timeout: float = REQUEST_TIMEOUT_S) -> tuple[list[Answer], float]:
    """POST every body from `clients` connections, each sending its next as soon as its last is answered; the answers
    in order, and the wall seconds."""
    answers: list = [None] * len(bodies)
    queue = iter(range(len(bodies)))

    async def client(http: aiohttp.ClientSession):
        for i in queue:
            answers[i] = await post(http, path, bodies[i])

    started = time.perf_counter()
    async with session(base, clients, timeout) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return answers, time.perf_counter() - started


async def open_loop(base: str, path: str, bodies: list, rate: float,
                    timeout: float = REQUEST_TIMEOUT_S) -> list[Answer]:
    """POST the bodies at a fixed rate (requests/s) whatever the answers do; the answers in order."""
    started = time.perf_counter()

    async def scheduled(http: aiohttp.ClientSession, i: int) -> Answer:
        await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
        return await post(http, path, bodies[i])

    async with session(base, 0, timeout) as http:
        return list(await asyncio.gather(*(scheduled(http, i) for i in range(len(bodies)))))


def session(base: str, connections: int, timeout: float) -> aiohttp.ClientSession:
    """A client session to `base` with at most `connections` connections (0: no limit)."""
    return aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


async def post(http: aiohttp.ClientSession, path: str, body) -> Answer:
    """One request; a client error (refused, reset, timed out) is an Answer with `error`."""
    started = time.perf_counter()
    try:
        async with http.post(path, json=body) as r:
            content = await r.read()
            headers = {k.lower(): v for k, v in r.headers.items()}
        try:
            payload = orjson.loads(content)  # orjson: on one machine, the load generator's CPU is taken from the server
        except orjson.JSONDecodeError:
            payload = content.decode(errors="replace")
        return Answer(time.perf_counter() - started, r.status, headers, payload)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return Answer(time.perf_counter() - started, error=f"{type(e).__name__}: {e}")


# ---- the server under test ------------------------------------------------------------------------------------------
def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`toolkit serve ARGS` as a child process on a free loopback port, its output in a temporary file (a pipe nobody
    reads fills up with access-log lines and blocks it). Usable as a context manager: entered once `/health` answers
    200, stopped with SIGTERM on exit."""

    def __init__(self, args: list, startup_timeout: float = STARTUP_TIMEOUT_S):
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.args = [sys.executable, "-m", "toolkit.cli", "serve", *map(str, args), "--port", str(port)]
        self.startup_timeout = startup_timeout
        self.log = tempfile.TemporaryFile("w+")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self.wait_until_healthy()
        except BaseException:  # no __exit__ follows a failed __enter__ (nor Ctrl-C or SIGTERM during it): stop it here
            self.__exit__()
            raise
        return self

    def wait_until_healthy(self) -> None:
        """Return once `/health` answers 200; a ToolkitError quoting the server's last lines if it exits first or
        takes longer than the startup timeout."""
        deadline = time.monotonic() + self.startup_timeout
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(self.output().splitlines()[-20:])
                raise ToolkitError(f"`toolkit serve` did not come up (exit {self.process.returncode}):\n{tail}")
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop()
        self.log.close()

    def healthy(self) -> bool:
        """Whether `/health` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM (a graceful stop), then kill if it has not exited after `timeout` seconds; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        """Everything the server printed so far."""
        self.log.seek(0)
        return self.log.read()


# ---- the benchmark --------------------------------------------------------------------------------------------------
def run_serve_load(options: ServeLoadOptions, progress: bool = True) -> dict:
    """Offline, then served (and on Ray Serve), `repeat` times; returns the result dict (`serve_load_report` prints
    it): medians, and every repeat under `repeats`."""
    options.check()
    manifests = check_set(options.artifact, EMBEDDING, lambda found: "perf serve measures an embedding set")
    check_max_batch_tokens(options.max_batch_tokens, manifests[-1].seq_len, "--max-batch-tokens")
    texts = EMBEDDING.traffic(load_dataset(options.data)[2])[: options.limit]
    # it measures throughput, not admission: the server admits every request perf serve may have in flight (`clients`
    # at saturation, up to every sentence in the open loop), where its default 512 refused the clients past it (429)
    args = ["--embedding", options.artifact, "--max-wait-ms", options.max_wait_ms, "--max-batch-tokens",
            options.max_batch_tokens, "--instances", options.instances,
            "--max-concurrent-requests", max(options.clients, len(texts))]
    args += ["--threads", options.threads] if options.threads else []
    modes = [("uvicorn", args, 1)]
    if options.ray_replicas:
        modes.append((f"Ray Serve, {options.ray_replicas} replicas",
                      args + ["--ray", "--replicas", options.ray_replicas], options.ray_replicas))
    offline_run = partial(in_child, "the offline run", run_offline, options, texts, progress)
    repeats = []
    for _ in range(options.repeat):
        offline_s, reference, warmup, offline_slots = offline_run()
        offline = [len(texts) / offline_s]
        runs = []
        for name, server_args, replicas in modes:
            with ServerProcess(server_args) as server:
                runs.append(measure_server(name, server, texts, warmup * replicas, reference, options.clients,
                                           replicas))
                runs[-1]["exit_code"] = server.stop()
            offline.append(len(texts) / offline_run()[0])
            # against the offline runs just before and just after it: the machine drifts from run to run by more
            # than the gap being measured; no ratio where requests failed (the served run did less work)
            run, complete = runs[-1], runs[-1]["failed"] == 0
            run["offline_around"] = offline[-2:]
            run["vs_offline"] = run["sentences_per_s"] / float(np.mean(offline[-2:])) if complete else None
            run["token_slots_vs_offline"] = (run["token_slots"] / offline_slots
                                             if complete and run["token_slots"] is not None else None)
        repeats.append({"offline": {"sentences_per_s": median(offline), "runs": offline, "token_slots": offline_slots},
                        "runs": runs})
    return {"data": str(options.data), "sentences": len(texts), "clients": options.clients,
            "artifact": str(options.artifact), "repeat": options.repeat,
            "offline": {"sentences_per_s": median(r["offline"]["sentences_per_s"] for r in repeats),
                        "token_slots": repeats[0]["offline"]["token_slots"]},
            "runs": [median_run([r["runs"][k] for r in repeats]) for k in range(len(modes))], "repeats": repeats}


def in_child(what: str, fn, *args):
    """`fn(*args)` in a child process, which `what` names if it dies (the offline run, `run_offline`: its copy of the
    weights is gone, all of it, before a server loads its own). The child's warnings come back and are warned here,
    where the command line shows each as one line (the child would print Python's raw form, file and source line
    included), once however many children warned it; a child that dies (killed for memory, a crash) is a one-line
    error; one still running when perf serve is interrupted is stopped."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        try:
            result, caught = child.submit(recording_warnings, fn, *args).result()
        except BrokenProcessPool:
            raise ToolkitError(f"a child process of perf serve ({what}) died before it finished (killed "
                               "for lack of memory, or crashed); free memory (the kernel log names an out-of-memory "
                               "kill) and run perf serve again") from None
        except BaseException:  # Ctrl-C (SIGINT to perf serve alone) or SIGTERM: the child is stopped, not waited for
            # (the executor's exit would wait for its run, and the interpreter's exit for the idle child after it)
            for process in multiprocessing.active_children():
                process.terminate()
            raise
    for category, message in caught:
        warnings.warn(message, category)
    return result


def recording_warnings(fn, *args) -> tuple:
    """`fn(*args)` and the warnings it raised, as (category, message) pairs, recorded instead of printed."""
    with warnings.catch_warnings(record=True) as caught:
        result = fn(*args)
    return result, [(w.category, str(w.message)) for w in caught]


def median_run(runs: list[dict]) -> dict:
    """One mode's repeats as one run: the median of each figure (None if a repeat has none), the worst agreement,
    every failure counted."""
    latencies = [r["latency_ms"] for r in runs if r["latency_ms"]]
    agreements = [r["agreement"] for r in runs if "agreement" in r]
    figures = ("sentences_per_s", "vs_offline", "seconds", "half_load_rate", "token_slots", "token_slots_vs_offline")
    run = {"name": runs[0]["name"],
           **{key: None if any(r[key] is None for r in runs) else median(r[key] for r in runs) for key in figures},
           "failed": sum(r["failed"] for r in runs), "half_load_failed": sum(r["half_load_failed"] for r in runs),
           **{key: dict(sum((Counter(r[key]) for r in runs), Counter())) for key in ("failures", "half_load_failures")},
           "first_failure": next((r["first_failure"] for r in runs if r["first_failure"]), None),
           "latency_ms": {q: median(x[q] for x in latencies) for q in ("p50", "p99")} if latencies else None,
           "exit_code": max((r["exit_code"] for r in runs), key=abs)}
    if len(agreements) == len(runs):
        run["agreement"] = max(agreements, key=lambda a: EMBEDDING.shortfall(a[EMBEDDING.gate_key]))
    return run


def run_offline(options: ServeLoadOptions, texts: list[str],
                progress: bool) -> tuple[float, np.ndarray, list[str], int]:
    """Seconds `Embedder.encode_documents` takes over all the texts at once (after a warm-up), its vectors, the
    warm-up texts (spread over the lengths, so every bucket runs) and the token slots it computed (padding
    included)."""
    if options.threads:
        set_cpu_threads(options.threads)
    with Embedder.from_artifacts(options.artifact, instances=options.instances, truncation="truncate") as model:
        warmup = warmup_subset(texts, token_lengths(EMBEDDING, model.tokenizer, texts).clip(max=model.max_length))
        model.encode_documents(warmup)
        slots_before, started = model.runner.stats.computed_tokens, time.perf_counter()
        vectors = model.encode_documents(texts, progress=progress)
        return time.perf_counter() - started, vectors, warmup, model.runner.stats.computed_tokens - slots_before


def measure_server(name: str, server: ServerProcess, texts: list[str], warmup: list[str], reference: np.ndarray,
                   clients: int, replicas: int = 1) -> dict:
    """Saturation with `clients` closed-loop clients, then latency at half the throughput it reached. The token slots
    the saturated run computed are read from the server's `/metrics` (None on Ray: each replica counts its own)."""
    bodies = [embed_request(t) for t in texts]
    asyncio.run(closed_loop(server.base, "/embed", [embed_request(t) for t in warmup], clients))
    slots_before = computed_slots(server.base) if replicas == 1 else None
    answers, seconds = asyncio.run(closed_loop(server.base, "/embed", bodies, clients))
    slots = None if slots_before is None else computed_slots(server.base) - slots_before
    failed = [a for a in answers if a.status != 200]
    if len(failed) == len(answers):
        raise ToolkitError(f"the server ({name}) answered no request with 200; the first answer: {failure(answers[0])}")
    served = (len(answers) - len(failed)) / seconds  # the answered sentences: a failure's is not served
    vectors = np.array([a.body[0] for a in answers if a.status == 200])
    half = bodies[: max(clients, len(bodies) // 2)]
    timed = asyncio.run(open_loop(server.base, "/embed", half, served / 2))
    latency = [a.seconds * 1000 for a in timed if a.status == 200]
    half_failed = [a for a in timed if a.status != 200]
    run = {"name": name, "sentences_per_s": served, "seconds": seconds, "token_slots": slots,
           "failed": len(failed), "failures": by_status(failed), "half_load_rate": served / 2,
           "half_load_failed": len(half_failed), "half_load_failures": by_status(half_failed),
           "first_failure": next(map(failure, failed + half_failed), None),
           "latency_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99))}
           if latency else None}
    if len(vectors) == len(reference):
        run["agreement"] = EMBEDDING.agreement(reference, vectors)
    return run


def failure(answer: Answer) -> str:
    """A failed answer in one line: its status and the start of its body, or the client error."""
    if answer.status is None:
        return answer.error
    return f"{answer.status} {orjson.dumps(answer.body).decode()[:200]}"


def by_status(answers: list[Answer]) -> dict[str, int]:
    """How many answers had each status, a client error counted by its kind (`TimeoutError`, ...)."""
    return dict(Counter(str(a.status) if a.status is not None else a.error.split(":")[0] for a in answers))


def computed_slots(base: str) -> int | None:
    """Token slots the server's embedding batches have computed so far (real tokens plus padding), from `/metrics`;
    None if it does not report them."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=REQUEST_TIMEOUT_S) as response:
        text = response.read().decode()
    wanted = {"toolkit_batch_tokens_sum", "toolkit_padded_tokens_total"}
    found = [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
             if sample.name in wanted and sample.labels.get("model") == EMBEDDING.name]
    return int(sum(found)) if len(found) == len(wanted) else None


def embed_request(text: str) -> dict:
    """One sentence's `/embed` body, cut to the max input length as the offline run cuts it."""
    return {"inputs": text, "truncate": True}


def serve_load_report(result: dict) -> str:
    """The side-by-side table."""
    offline = result["offline"]
    rows = [["offline Embedder (all sentences in one call)", offline["sentences_per_s"], 1.0, offline["token_slots"],
             1.0, "-", "-", "-", "(reference)"]]
    for r in result["runs"]:
        latency = r["latency_ms"] or {"p50": "-", "p99": "-"}
        agreement = r.get("agreement")
        rows.append([f"served, {result['clients']} clients ({r['name']})",
                     *(("-" if r[key] is None else r[key]) for key in ("sentences_per_s", "vs_offline", "token_slots",
                                                                         "token_slots_vs_offline")),
                     latency["p50"], latency["p99"], r["failed"] + r["half_load_failed"],
                     agreement[EMBEDDING.gate_key] if agreement else "incomplete"])
    title = (f"{result['sentences']} single-sentence requests from {result['data']} on {result['artifact']}; "
             "latency at half the served throughput (open loop)"
             + (f"; medians of {result['repeat']} repeats" if result["repeat"] > 1 else ""))
    table = format_columns(["run", "sentences/s", "vs offline", "token slots", "slots vs offline", "p50 ms", "p99 ms",
                            "failed", f"{EMBEDDING.gate_key} vs offline"],
                           [None, ",.1f", ".3f", ",.0f", ".3f", ",.2f", ",.2f", ",d", EMBEDDING.agreement_format],
                           rows, title=title)
    return "\n".join([table, *(failures_line(result, r) for r in result["runs"] if r["first_failure"])])


def failures_line(result: dict, run: dict) -> str:
    """What failed in a run, by status, the first answer that says why, and what its figures then mean."""
    sent = result["sentences"] * result["repeat"]

    def counts(failures: dict) -> str:
        return ", ".join(f"{status}: {count:,}" for status, count in sorted(failures.items()))

    parts = [f"{run['failed']:,} of {sent:,} requests at saturation ({counts(run['failures'])})"] if run["failed"] \
        else []
    if run["half_load_failed"]:
        parts.append(f"{run['half_load_failed']:,} at half load ({counts(run['half_load_failures'])})")
    meaning = ("; sentences/s counts the answered ones, and no ratio to offline is given (the served run did less "
               "work)" if run["failed"] else "")
    kinds = {*run["failures"], *run["half_load_failures"]}
    overloaded = bool(kinds & {"429", "503"}) or not all(map(str.isdigit, kinds))  # refused, or no answer at all
    return (f"{run['name']}: {' and '.join(parts)} failed; the first: {run['first_failure']}{meaning}"
            + ("; the server was overloaded: run with fewer --clients" if overloaded else ""))
