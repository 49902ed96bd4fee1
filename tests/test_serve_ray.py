"""`toolkit serve --ray --replicas 2` on a local Ray head that the test starts on loopback (and stops after): both
replicas serve, each with its own engines and core budget, the answers are the offline API's, SIGTERM exits 0; a bad
`--ray-address` is a one-line error naming the fix."""
import http.server
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

import httpx
import numpy as np
import pytest
from serving import TIMEOUT, bucket_sets, serve_process, wait_for

from toolkit.api import Embedder
from toolkit.errors import ToolkitError
from toolkit.perf.serve_load import free_port
from toolkit.serve.ray_app import RAY_SERVE_ENVIRONMENT, ray_driver

TEXTS = ["What is the capital of China?", "北京是中国的首都。", "short", "a somewhat longer sentence " * 4]


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs; its address. Its processes share the fate of the blocking
    `ray start`, so terminating that stops this cluster only (`ray stop` would stop every cluster on the machine)."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # a token that another cluster left in ~/.ray would switch this head, but not the server's driver, to token
    # authentication; the head and the server both inherit this
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # what the README tells a cluster's nodes to run with, and what `toolkit serve --ray` sets for a local Ray:
    # Serve's HAProxy ingress, replicas serving HTTP behind it
    for name, value in RAY_SERVE_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    # its own temp dir (short: Ray puts unix sockets in it): the machine's /tmp/ray keeps no record of this cluster,
    # which a later plain `ray.init()` would try to join after it is gone
    temp_dir = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")
    log = open(tmp_path / "ray.log", "w")
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: head.poll() is None and accepts_connections(port), 120)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        head.wait(TIMEOUT)
        log.close()
        wait_for(lambda: not accepts_connections(port))
        shutil.rmtree(temp_dir, ignore_errors=True)


def accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_two_ray_serve_replicas_answer_as_the_offline_api(onnx_artifacts, ray_head):
    embedding_set = bucket_sets(onnx_artifacts)["embedding"]
    with Embedder.from_artifacts(embedding_set) as offline:
        want = offline.encode_documents(TEXTS)
    with serve_process("--embedding", embedding_set, "--ray", "--replicas", 2, "--ray-address", ray_head,
                       startup_timeout=240) as (base, server), httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        replicas = set()

        def both_replicas_answered() -> bool:
            info = http.get("/info").json()
            replicas.add((info["process"], info["compute_threads"]))
            return len(replicas) >= 2

        # Serve's proxy learns of a replica shortly after it is up: poll rather than expect it in the first answers
        wait_for(both_replicas_answered, 120)
        assert len(replicas) == 2, replicas  # two replica processes, each with its own engines
        assert {threads for _, threads in replicas} == {1}  # and its own share of the two cores
        for _ in range(8):
            vectors = http.post("/embed", json={"inputs": TEXTS}).json()
            assert np.max(np.abs(np.array(vectors) - want)) <= 1e-6
        data = http.post("/v1/embeddings", json={"input": TEXTS, "model": "m"}).json()["data"]
        assert np.max(np.abs(np.array([d["embedding"] for d in data]) - want)) <= 1e-6
        too_many = http.post("/embed", json={"inputs": TEXTS * 10})
        assert too_many.status_code == 413 and "max client batch size" in too_many.json()["error"]
        server.terminate()
        assert server.wait(TIMEOUT) == 0


def test_sigterm_exits_0_when_the_ray_shutdown_outlasts_rays_abort_alarm(ray_head):
    """Ray's own SIGTERM handler aborts the driver (exit 134) 3 s after the signal; removing the replicas can take
    longer. The driver's shutdown here lasts 4 s: it must still end in exit 0."""
    driver = textwrap.dedent(f"""
        import os, signal, time
        from toolkit.serve.ray_app import ray_driver
        with ray_driver("{ray_head}"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(TIMEOUT)
            finally:
                time.sleep(4)
    """).replace("TIMEOUT", str(TIMEOUT))
    assert subprocess.run([sys.executable, "-c", driver], timeout=2 * TIMEOUT).returncode == 0


@pytest.mark.parametrize("address, reason", [("127.0.0.1:1", "nothing answers there"),
                                             ("nonsense", "Invalid address format")])
def test_a_bad_ray_address_is_a_one_line_error_naming_the_fix(address, reason):
    """Refused at once, not after ray.init's minutes of retries."""
    with pytest.raises(ToolkitError) as error:
        with ray_driver(address):
            pass
    message = str(error.value)
    assert message.startswith(f"--ray-address {address}: ") and reason in message and "ray start --head" in message
    assert "\n" not in message


def test_a_ray_address_where_another_server_listens_is_refused_at_once(monkeypatch):
    """A port that accepts connections but is not Ray's (here an HTTP/1 server) would keep ray.init retrying: it is
    refused before ray.init is called."""
    import toolkit.serve.ray_app as ray_app

    monkeypatch.setattr(ray_app.ray, "init", lambda *a, **k: pytest.fail("ray.init was called: it retries for minutes"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ToolkitError, match=f"^--ray-address {address}: the server there does not speak gRPC, so "
                                               "it is not a Ray head; start one with `ray start --head`"):
            with ray_driver(address):
                pass
    finally:
        server.shutdown()
