"""`toolkit serve --ray --replicas 2` on a local Ray head that the test starts on loopback (and stops after): both
replicas serve, each with its own engines and core budget, the answers are the offline API's, SIGTERM exits 0; a bad
`--ray-address` is a one-line error naming the fix. On a Ray instance of its own, SIGTERM lets a request in flight
finish, and leaves no process behind, while Ray starts too; its HAProxy listens on the serving port only."""
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

import httpx
import numpy as np
import psutil
import pytest
from serving import TIMEOUT, bucket_sets, serve_process, wait_for

import toolkit.serve.ray_app as ray_app
from toolkit.api import Embedder
from toolkit.errors import ToolkitError
from toolkit.perf.serve_load import free_port
from toolkit.serve.metrics import ServiceMetrics
from toolkit.serve.ray_app import RAY_SERVE_ENVIRONMENT, local_haproxy, ray_driver

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
                                             ("127.0.0.1:99999", "99999 is not a port (1-65535)"),
                                             ("nonsense", "Invalid address format")])
def test_a_bad_ray_address_is_a_one_line_error_naming_the_fix(address, reason):
    """Refused at once, not after ray.init's minutes of retries."""
    with pytest.raises(ToolkitError) as error:
        with ray_driver(address):
            pass
    message = str(error.value)
    assert message.startswith(f"--ray-address {address}: ") and reason in message and "HOST:PORT" in message
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


def test_a_local_ray_server_answers_requests_in_flight_after_sigterm_and_leaves_no_haproxy(onnx_artifacts):
    """A request of one row waits 5 s for a fuller batch when SIGTERM comes: it is answered (Serve's shutdown used to
    stop the ingress at once) and the server exits 0. Serve's HAProxy listened on the serving port only (not on its
    stats and metrics ports, on every interface, which kept a second server from starting), and is gone after."""
    embedding_set = bucket_sets(onnx_artifacts)["embedding"]
    with serve_process("--embedding", embedding_set, "--ray", "--max-wait-ms", 5000,
                       startup_timeout=240) as (base, server):
        haproxies = [p for p in psutil.Process(server.pid).children(recursive=True) if p.name() == "haproxy"]
        assert haproxies
        listening = {c.laddr for p in haproxies for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", int(base.rsplit(":", 1)[1]))}
        answer = {}
        request = threading.Thread(target=lambda: answer.update(
            r=httpx.post(f"{base}/embed", json={"inputs": TEXTS[:1]}, timeout=TIMEOUT)))
        request.start()
        wait_for(lambda: 'toolkit_queue_rows{model="embedding"' in queued_rows(base))
        server.send_signal(signal.SIGTERM)
        request.join(TIMEOUT)
        assert server.wait(TIMEOUT) == 0
    assert answer["r"].status_code == 200
    assert not [p for p in haproxies if p.is_running()]


def queued_rows(base: str) -> str:
    """The /metrics lines of rows waiting for a batch, where there are some."""
    return "\n".join(line for line in httpx.get(f"{base}/metrics").text.splitlines()
                     if line.startswith("toolkit_queue_rows") and not line.endswith(" 0.0"))


def test_sigterm_while_ray_starts_exits_0_and_leaves_no_process(onnx_artifacts, tmp_path):
    """SIGTERM once Ray's processes are up but before Serve is: exit 0 without a traceback (Ray's handlers used to take
    it: SystemExit 15, or a minute's wait for a GCS that had gone), and nothing the server started is left."""
    embedding_set = bucket_sets(onnx_artifacts)["embedding"]
    with open(tmp_path / "log", "w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", "--embedding", str(embedding_set),
                                   "--ray", "--port", str(free_port())], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: "raylet" in {p.name() for p in psutil.Process(server.pid).children(recursive=True)})
        descendants = psutil.Process(server.pid).children(recursive=True)
        server.send_signal(signal.SIGTERM)
        assert server.wait(TIMEOUT) == 0
        log.seek(0)
        assert "Traceback" not in log.read()
    wait_for(lambda: not [p for p in descendants if p.is_running()], 10)


def test_the_local_haproxy_runs_without_its_stats_and_metrics_listeners(tmp_path, monkeypatch):
    """Serve's own config for the node, through the script `toolkit serve --ray` points Serve at: the real binary gets
    the same arguments, and the config has the serving frontend but not the stats page (port 8404) and Prometheus
    exporter (port 9101), both bound on every interface whatever the host."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    config = tmp_path / "haproxy.cfg"
    HAProxyApi(HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=8000),
                             socket_path=str(tmp_path / "admin.sock"), server_state_base=str(tmp_path),
                             server_state_file=str(tmp_path / "state"),
                             metrics_socket_path=str(tmp_path / "metrics.sock")),
               config_file_path=str(config))._generate_config_file_internal()
    assert "listen stats" in config.read_text() and "frontend prometheus" in config.read_text()
    binary = tmp_path / "haproxy"
    binary.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\n")
    binary.chmod(0o755)
    monkeypatch.setattr(ray_app, "_resolve_haproxy_binary", lambda: str(binary))
    with local_haproxy():
        script = os.environ[ray_app.HAPROXY_BINARY_VARIABLE]
        subprocess.run([script, "-db", "-f", str(config), "-dR"], check=True, timeout=TIMEOUT)
    assert not os.path.exists(script)
    assert (tmp_path / "args").read_text().split() == ["-db", "-f", str(config), "-dR"]
    edited = config.read_text()
    assert "frontend http_frontend" in edited and "bind 127.0.0.1:8000" in edited
    assert "stats" not in edited.replace("stats socket", "").replace("stats timeout", "")
    assert "prometheus" not in edited and ":8404" not in edited and ":9101" not in edited


def test_metrics_carry_the_replica_label_under_ray():
    """Each /metrics scrape under --ray reaches one replica: every series names it."""
    metrics = ServiceMetrics()
    metrics.constant_labels = {"replica": "r1"}
    metrics.answered("/embed", 200, 0.1)
    text = metrics.render().decode()
    assert 'toolkit_http_requests_total{replica="r1",route="/embed",status="200"} 1.0' in text
    assert 'toolkit_http_request_seconds_count{replica="r1",route="/embed",status_class="2xx"} 1.0' in text
