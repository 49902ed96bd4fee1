"""The same app as a Ray Serve deployment: `toolkit serve --ray --replicas N`.

Each replica is a Ray actor that loads its own engines under its own compute budget (`--threads`, default: the
cores / replicas) and serves the FastAPI app of `toolkit serve` through Ray Serve's HTTP proxy; Ray reserves that
many CPUs per replica, so on a cluster the replicas spread over the nodes that have them. Without `--ray-address` a
local Ray instance is started; with it, the replicas go to that cluster (`ray start --head`, then
`ray start --address HEAD:6379` on every other node).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext, suppress
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
# Ray's C++ failure handler would take SIGTERM from ours while ray.init runs (a stack dump, and an abort 3 s later).
# Off in this process only: Ray reads it when imported, and the processes a local Ray starts keep their crash dumps.
_FAILURE_HANDLER = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
_failure_handler_set = _FAILURE_HANDLER in os.environ
os.environ.setdefault(_FAILURE_HANDLER, "1")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private.constants import RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_HAPROXY_CONFIG_FILE_LOC  # noqa: E402
from ray.serve._private.haproxy import _resolve_haproxy_binary  # noqa: E402
from ray.serve.config import BackpressureConfig  # noqa: E402

from toolkit.errors import ToolkitError  # noqa: E402
from toolkit.serve import haproxy_launcher  # noqa: E402
from toolkit.serve.app import RETRY_AFTER_S  # noqa: E402
from toolkit.serve.server import (  # noqa: E402
    GRACEFUL_SHUTDOWN_S,
    ServeOptions,
    bound_socket,
    build_app,
    exit_on_signals,
    exit_status,
    signal_handler,
)
from toolkit.serve.service import first_line, model_sets  # noqa: E402

if not _failure_handler_set:
    del os.environ[_FAILURE_HANDLER]

APP_NAME = "toolkit"
# ray.init retries an address that does not answer for minutes (20 tries of ~40 s in Ray 2.60) before it fails
REACHABLE_TIMEOUT_S = 10
HAPROXY_BINARY_VARIABLE = "RAY_SERVE_HAPROXY_BINARY_PATH"
HAPROXY_REAP_S = 5  # the longest the driver keeps killing a local node's HAProxy after Ray has stopped
START_A_CLUSTER = "start one with `ray start --head` on the head node and pass its HOST:PORT (port 6379 by default)"


@serve.deployment
@serve.ingress()
class ToolkitReplica:
    """One replica: its own engines, behind the app `toolkit serve` runs on uvicorn."""

    def __init__(self, options: ServeOptions):
        self.service_app = build_app(options)
        # each /metrics scrape reaches one replica (HAProxy picks it): its series say which
        self.service_app.state.services.metrics.constant_labels = {
            "replica": serve.get_replica_context().replica_id.unique_id}

    def __serve_build_asgi_app__(self):
        """The app Ray Serve routes this replica's HTTP requests to (built in the constructor, with the engines)."""
        return self.service_app


def serve_on_ray(options: ServeOptions, echo: Callable[[str], None] = print) -> None:
    """Deploy `options.replicas` replicas and serve until SIGTERM or Ctrl-C; then let them finish the requests in flight
    and remove them."""
    model_sets(options.embedding, options.reranker, options.limits)  # a user's mistake fails here, not in a replica
    with bound_socket(options.host, options.port) as sock:  # a taken port or a wrong host: one line, before Ray starts
        port = sock.getsockname()[1]
    with ray_driver(options.ray_address) as driver:
        # Serve's driver-side lines repeat ours or are noise ("Connecting to existing Serve app": serve.run after
        # serve.start, which is what sets the HTTP options); its warnings stay
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(http_options={"host": options.host, "port": port})
        threads = options.threads_per_engine_set
        # Behind Serve's HAProxy each replica admits up to max_ongoing_requests and queues max_queued_requests more
        # (by default without bound). With twice the app's limit (per model), the app answers the excess itself at
        # once, with its own 429; past as many again queued, Ray refuses with a bare 429 and the same Retry-After (a
        # queue of 1 refused bursts well under the limit: Serve counts a request queued until it gets its slot).
        # A stopping replica is killed after its graceful timeout (Ray's default: 20 s): uvicorn's, plus what a
        # request may wait in the scheduler for a fuller batch
        deployment = ToolkitReplica.options(num_replicas=options.replicas,
                                            max_ongoing_requests=2 * options.limits.max_concurrent_requests,
                                            max_queued_requests=options.limits.max_concurrent_requests,
                                            backpressure_config=BackpressureConfig(status_code=429,
                                                                                   retry_after_s=RETRY_AFTER_S),
                                            graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S
                                            + options.limits.max_wait_ms / 1000,
                                            ray_actor_options={"num_cpus": threads})
        try:
            serve.run(deployment.bind(options), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise ToolkitError(f"Ray Serve could not start the replicas ({e}); the replica errors are above") from None
        driver.serving = True
        echo(f"serving on http://{options.host}:{port} with {options.replicas} Ray Serve replicas of "
             f"{threads} thread(s) each (SIGTERM: finish requests in flight, then exit)")
        while True:
            signal.pause()


class Driver:
    """What the stop needs to know: whether the app is serving (then its replicas drain before Ray goes)."""

    serving = False


@contextmanager
def ray_driver(address: str | None):
    """This process as the driver of the Ray cluster at `address` (None: a fresh local instance) until the block ends,
    by SIGTERM (exit 0), Ctrl-C (exit 130) or an error; then the app's replicas finish their requests in flight
    (behind the ingress, still up), and Serve and the driver are shut down. A local instance's HAProxy goes too."""
    if address is not None:
        check_reachable(address)
    driver = Driver()
    local = address is None and RAY_SERVE_ENABLE_HA_PROXY
    with local_haproxy() if local else nullcontext() as haproxy, exit_on_signals() as stops:
        try:
            with running_ray(address):
                if haproxy is not None:
                    haproxy.node_id = ray.get_runtime_context().get_node_id()
                # should Ray have been imported before this module, its C++ failure handler took SIGTERM in ray.init
                # (it arms a 3 s alarm that aborts the process before forwarding the signal): ours again
                with exit_on_signals(stops):
                    try:
                        yield driver
                    finally:
                        stop_serve(driver, local=address is None)
        except BaseException:
            # a stop inside a Ray call (starting Serve, deploying) comes out of it as SystemExit(1) or another error
            if stops:
                raise SystemExit(exit_status(stops[0])) from None
            raise
        finally:
            if haproxy is not None:
                with signal_handler(signal.SIG_IGN):
                    haproxy.reap()


@contextmanager
def running_ray(address: str | None):
    """ray.init, in a thread of its own, which waits until the block ends and Ray is shut down (Ray's node processes
    die with the thread that started them). In the main thread ray.init installs Ray's SIGTERM handlers for its
    duration: SystemExit 15 with a traceback, or a stop half-way that leaves the driver waiting a minute for a GCS
    that is gone. Ours stay: a stop while Ray starts (SystemExit out of the wait) lets ray.init finish, then the block
    ends Ray."""
    failure, started, done = [], threading.Event(), threading.Event()

    def init():
        try:
            # without an address, a fresh local instance: plain ray.init() would attach to whatever cluster
            # `ray start` last recorded on this machine, even one that has died since
            ray.init(address=address or "local", include_dashboard=False, logging_level="warning")
        except BaseException as e:
            failure.append(e)
            return
        started.set()
        done.wait()

    thread = threading.Thread(target=init, name="ray", daemon=True)
    worker_logger = logging.getLogger("ray._private.worker")
    worker_logger.addFilter(no_sigterm_handler_warning)
    thread.start()
    try:
        try:
            while thread.is_alive() and not started.wait(0.1):
                pass
        finally:  # after a stop too: Ray finishes starting, then goes
            with signal_handler(signal.SIG_IGN):
                while thread.is_alive() and not started.wait(0.1):
                    pass
            worker_logger.removeFilter(no_sigterm_handler_warning)
        if failure:
            e = failure[0]
            if address is None or not isinstance(e, (ConnectionError, RuntimeError, ValueError)):
                raise e
            raise ToolkitError(f"--ray-address {address}: no Ray cluster to join there ({first_line(e)}); "
                               f"{START_A_CLUSTER}") from None
        yield
    finally:
        with signal_handler(signal.SIG_IGN):  # a second signal must not leave Ray running
            ray.shutdown()
            done.set()
            thread.join()


def no_sigterm_handler_warning(record: logging.LogRecord) -> bool:
    """A logging filter: ray.init's warning that, outside the main thread, it leaves SIGTERM alone (as we want)."""
    return "SIGTERM handler is not set" not in record.getMessage()


def stop_serve(driver: Driver, local: bool) -> None:
    """Delete the app, waiting until its replicas have answered the requests in flight (Serve keeps the ingress up
    meanwhile: serve.shutdown alone stops it at once, and the replicas' clients get their connections closed). A local
    instance then goes with ray.shutdown; a cluster's Serve is shut down."""
    if driver.serving:
        try:
            serve.delete(APP_NAME)
        except TimeoutError:  # Serve waits 60 s; a replica past its graceful timeout is killed anyway
            pass
    if not local:
        serve.shutdown()


class LocalHAProxy:
    """The HAProxy that Serve starts on a local instance: through `haproxy_launcher` (no stats or metrics listener,
    killed with its manager), and killed after Ray if still there, found by its config path, which names the node."""

    node_id: str | None = None

    @property
    def config_path(self) -> str:
        """Where Serve writes this node's HAProxy config (what its command line names)."""
        directory, name = os.path.split(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC)
        return os.path.join(directory, self.node_id, name)

    def pids(self) -> list[int]:
        """This user's processes with this node's HAProxy config in their command line."""
        wanted, found = self.config_path.encode(), []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == os.getuid():
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if wanted in f.read().split(b"\0"):
                            found.append(int(entry))
            except OSError:  # gone meanwhile
                pass
        return found

    def reap(self) -> None:
        """Kill what is left of this node's HAProxy (a manager dying while it spawns one can leave a last one), and
        remove its directory, which Serve leaves behind."""
        if self.node_id is None:
            return
        deadline = time.monotonic() + HAPROXY_REAP_S
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        shutil.rmtree(os.path.dirname(self.config_path), ignore_errors=True)


@contextmanager
def local_haproxy():
    """Within the block, a local Ray's Serve starts HAProxy through `haproxy_launcher` (the processes Ray starts
    inherit the environment); after it, the script is removed."""
    script_dir = tempfile.mkdtemp(prefix="toolkit-haproxy-")
    script = os.path.join(script_dir, "haproxy")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S {shlex.quote(haproxy_launcher.__file__)} "
                f"{shlex.quote(_resolve_haproxy_binary())} \"$@\"\n")
    os.chmod(script, 0o755)
    previous = os.environ.get(HAPROXY_BINARY_VARIABLE)
    os.environ[HAPROXY_BINARY_VARIABLE] = script
    try:
        yield LocalHAProxy()
    finally:
        if previous is None:
            os.environ.pop(HAPROXY_BINARY_VARIABLE, None)
        else:
            os.environ[HAPROXY_BINARY_VARIABLE] = previous
        shutil.rmtree(script_dir, ignore_errors=True)


def check_reachable(address: str) -> None:
    """Raise ToolkitError naming `--ray-address` unless a gRPC server (what a Ray head's GCS and client ports are)
    answers at a HOST:PORT `address` (`ray://HOST:PORT` too); other forms (`auto`) are left to ray.init, which would
    otherwise retry for minutes against a port that accepts connections but is not Ray's."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    if not 0 < int(port) < 65536:
        raise ToolkitError(f"--ray-address {address}: {port} is not a port (1-65535); pass the "
                           "head's HOST:PORT (port 6379 by default)")
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
