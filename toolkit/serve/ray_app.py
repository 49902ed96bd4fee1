"""The same app as a Ray Serve deployment: `toolkit serve --ray --replicas N`.

Each replica is a Ray actor that loads its own engines under its own compute budget (`--threads`, default: the
cores / replicas) and serves the FastAPI app of `toolkit serve` through Ray Serve's HTTP proxy; Ray reserves that
many CPUs per replica, so on a cluster the replicas spread over the nodes that have them. Without `--ray-address` a
local Ray instance is started; with it, the replicas go to that cluster (`ray start --head`, then
`ray start --address HEAD:6379` on every other node).
"""
from __future__ import annotations

import os
import signal
import socket
from contextlib import contextmanager
from typing import Callable

# Ray Serve's HAProxy ingress (C) in place of its Python proxy actor, with its throughput options (replicas serve
# HTTP themselves behind it): 2 replicas on 2 cores served 0.86-0.90 of offline with them, 0.72 without. A replica
# that stops drains for at least 30 s by default, for outside load balancers to notice; ours is the only one, and
# SIGTERM took 32 s. Serve's controller loop (every 0.1 s) and each replica's metrics export (every 0.1 s) kept
# Ray's processes at 12% of a core while idle, taken from the replicas on a small machine; at 1 s each, 9%, and 2
# replicas on 2 cores served 23.6 sentences/s against 22.7 (4 runs each, AMD EPYC); Serve notices changes later
# (ready in 19 s, not 15; SIGTERM 8.5 s, not 6.3). Serve reads these when imported, here and in the processes a
# local Ray starts; a cluster's nodes take them from their own environment (README). A user's own setting wins.
RAY_SERVE_ENVIRONMENT = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                         "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                         "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}
for _name, _value in RAY_SERVE_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

import ray  # noqa: E402
from ray import serve  # noqa: E402

from toolkit.errors import ToolkitError  # noqa: E402
from toolkit.serve.server import GRACEFUL_SHUTDOWN_S, ServeOptions, build_app, exit_on_signals  # noqa: E402
from toolkit.serve.service import first_line, model_sets  # noqa: E402

APP_NAME = "toolkit"
# ray.init retries an address that does not answer for minutes (20 tries of ~40 s in Ray 2.60) before it fails
REACHABLE_TIMEOUT_S = 10
START_A_CLUSTER = "start one with `ray start --head` on the head node and pass its HOST:PORT (port 6379 by default)"


@serve.deployment
@serve.ingress()
class ToolkitReplica:
    """One replica: its own engines, behind the app `toolkit serve` runs on uvicorn."""

    def __init__(self, options: ServeOptions):
        self.service_app = build_app(options)

    def __serve_build_asgi_app__(self):
        """The app Ray Serve routes this replica's HTTP requests to (built in the constructor, with the engines)."""
        return self.service_app


def serve_on_ray(options: ServeOptions, echo: Callable[[str], None] = print) -> None:
    """Deploy `options.replicas` replicas and serve until SIGTERM or Ctrl-C; then remove them."""
    model_sets(options.embedding, options.reranker, options.limits)  # a user's mistake fails here, not in a replica
    with ray_driver(options.ray_address):
        serve.start(http_options={"host": options.host, "port": options.port})
        threads = options.threads_per_engine_set
        # Ray may send a replica more requests than the app admits, so overload gets the app's 429 (with
        # Retry-After) instead of waiting in Ray's queue. A stopping replica is killed after its graceful timeout
        # (Ray's default: 20 s): uvicorn's, plus what a request may wait in the scheduler for a fuller batch
        deployment = ToolkitReplica.options(num_replicas=options.replicas,
                                            max_ongoing_requests=2 * options.limits.max_concurrent_requests,
                                            graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S
                                            + options.limits.max_wait_ms / 1000,
                                            ray_actor_options={"num_cpus": threads})
        try:
            serve.run(deployment.bind(options), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise ToolkitError(f"Ray Serve could not start the replicas ({e}); the replica errors are above") from None
        echo(f"serving on http://{options.host}:{options.port} with {options.replicas} Ray Serve replicas of "
             f"{threads} thread(s) each (SIGTERM: stop)")
        while True:
            signal.pause()


@contextmanager
def ray_driver(address: str | None):
    """This process as the driver of the Ray cluster at `address` (None: a fresh local instance) until the block ends,
    by SIGTERM (exit 0), Ctrl-C (exit 130) or an error; then Serve's apps and the driver are shut down."""
    if address is not None:
        check_reachable(address)
    try:
        # without an address, a fresh local instance: plain ray.init() would attach to whatever cluster `ray start`
        # last recorded on this machine, even one that has died since
        ray.init(address=address or "local", include_dashboard=False, logging_level="warning")
    except (ConnectionError, RuntimeError, ValueError) as e:
        if address is None:
            raise
        raise ToolkitError(f"--ray-address {address}: no Ray cluster to join there ({first_line(e)}); "
                           f"{START_A_CLUSTER}") from None
    # ray.init leaves SIGTERM to Ray's C++ failure handler, which arms a 3 s alarm that aborts the process (SIGABRT,
    # exit 134) before forwarding the signal: removing the replicas takes longer. Our handlers replace it.
    with exit_on_signals():
        try:
            yield
        finally:
            serve.shutdown()
            ray.shutdown()


def check_reachable(address: str) -> None:
    """Raise ToolkitError naming `--ray-address` unless a gRPC server (what a Ray head's GCS and client ports are)
    answers at a HOST:PORT `address` (`ray://HOST:PORT` too); other forms (`auto`) are left to ray.init, which would
    otherwise retry for minutes against a port that accepts connections but is not Ray's."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=REACHABLE_TIMEOUT_S) as connection:
            answer = http2_answer(connection)
    except OSError as e:
        raise ToolkitError(f"--ray-address {address}: nothing answers there ({e.strerror or e}); "
                           f"{START_A_CLUSTER}") from None
    if not answer:
        raise ToolkitError(f"--ray-address {address}: the server there does not speak gRPC, so it is not a Ray head; "
                           f"{START_A_CLUSTER}")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # then empty SETTINGS


def http2_answer(connection: socket.socket) -> bool:
    """Whether the server on `connection` answers HTTP/2's client preface with its SETTINGS frame (as gRPC does)."""
    connection.sendall(HTTP2_PREFACE)
    header = b""
    while len(header) < 9 and (chunk := connection.recv(9 - len(header))):
        header += chunk
    return len(header) == 9 and header[3] == 4  # a frame header: length (3 bytes), type 4 = SETTINGS
