"""Running the service: options checked before any model loads, then uvicorn in this process, or Ray Serve replicas.

SIGTERM is a graceful stop: uvicorn stops accepting connections, the scheduler stops waiting for fuller batches,
uvicorn finishes the requests in flight, the app's shutdown closes the engines, and the process exits 0.
"""
from __future__ import annotations

import errno
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

import uvicorn

from toolkit.errors import ToolkitError, check_int
from toolkit.runtime import AUTO_INSTANCES, CORES, check_threads
from toolkit.serve.service import Limits
from toolkit.tasks import EMBEDDING, RERANKER

GRACEFUL_SHUTDOWN_S = 30  # the longest uvicorn waits for requests in flight after SIGTERM


@dataclass(frozen=True)
class ServeOptions:
    """What `toolkit serve` runs: bucket-set directories (either may be None), where it listens, its limits, engine
    instances per bucket, compute threads (per process, or per replica with Ray), and Ray Serve's scale-out."""

    embedding: str | Path | None = None
    reranker: str | Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    limits: Limits = field(default_factory=Limits)
    instances: int | str = AUTO_INSTANCES
    threads: int | None = None
    ray: bool = False
    replicas: int = 1
    ray_address: str | None = None

    def check(self) -> "ServeOptions":
        """Raise ToolkitError naming the flag of the first invalid option; return self."""
        if self.embedding is None and self.reranker is None:
            raise ToolkitError("give at least one model: --embedding SET_DIR and/or --reranker SET_DIR")
        for flag, path in (("--embedding", self.embedding), ("--reranker", self.reranker)):
            if path is not None and not Path(path).is_dir():
                raise ToolkitError(f"{flag} {path}: no such directory; pass a bucket set such as "
                                   "WORKSPACE/NAME/onnx (what `toolkit compile` printed, without /seqN)")
        checks = (("--port", self.port, 0), ("--replicas", self.replicas, 1),
                  ("--instances", 1 if self.instances == AUTO_INSTANCES else self.instances, 1),
                  ("--threads", 1 if self.threads is None else self.threads, 1))
        for flag, value, minimum in checks:
            check_int(value, flag, minimum)
        if self.port > 65535:
            raise ToolkitError(f"--port must be at most 65535, got {self.port}")
        if not self.ray and (self.replicas != 1 or self.ray_address is not None):
            raise ToolkitError("--replicas and --ray-address need --ray")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ToolkitError("--ray-address is empty; pass a head's HOST:PORT, or omit it for a local Ray instance")
        if not self.ray_address:  # a Ray cluster's replicas run on its nodes' cores, not this machine's
            check_threads(self.threads, self.replicas if self.ray else 1)
        self.limits.check()
        return self

    @property
    def threads_per_engine_set(self) -> int:
        """Compute threads of one process's engines (one replica's with Ray): --threads, or its share of the
        cores."""
        return self.threads or max(1, CORES // (self.replicas if self.ray else 1))


def build_app(options: ServeOptions):
    """Load the models (with this process's compute budget) and build the app around them."""
    from toolkit.runtime import set_cpu_threads
    from toolkit.serve.app import create_app
    from toolkit.serve.service import load_models

    set_cpu_threads(options.threads_per_engine_set)
    models = load_models(options.embedding, options.reranker, options.limits, options.instances)
    try:
        return create_app(models.get(EMBEDDING.name), models.get(RERANKER.name), options.limits)
    except BaseException:
        for model in models.values():
            model.close()
        raise


def serve(options: ServeOptions, echo: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM or Ctrl-C: on uvicorn here, or (`ray`) as Ray Serve replicas."""
    options.check()
    if options.ray:
        with signals_deferred():  # importing Ray takes seconds; interrupted, an import fails with a traceback
            from toolkit.serve.ray_app import serve_on_ray

        return serve_on_ray(options, echo)
    with bound_socket(options.host, options.port) as sock:
        app = build_app(options)
        for model in app.state.services.loaded():
            echo(engines_line(model.describe()))
        host, port = sock.getsockname()[:2]
        echo(f"serving on http://{f'[{host}]' if ':' in host else host}:{port} (SIGTERM: finish requests in flight, "
             "then exit)")
        server = DrainingServer(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S),
                                app.state.services.drain)
        # uvicorn drains, then restores these handlers and raises the signal again: exit 0 after SIGTERM, 130 after ^C
        with exit_on_signals():
            server.run(sockets=[sock])


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, which on SIGTERM or Ctrl-C also calls `drain`: uvicorn waits for the requests in flight
    before the app's shutdown runs the queue, so a request waiting for a fuller batch would otherwise wait its whole
    max wait (past the graceful timeout at --max-wait-ms 40000: a 500)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame) -> None:
        """uvicorn's signal handler: stop, and drain in another thread (this one may be inside the scheduler's
        lock, where the signal interrupted it)."""
        super().handle_exit(sig, frame)
        threading.Thread(target=self.drain, name="drain", daemon=True).start()


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), before any model loads: a host that is not this machine's or a port in use
    is a one-line error naming its flag, and --port 0 gets a free port, whose number the socket knows."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            raise ToolkitError(f"--host {host}: {e.strerror}; pass an address of this machine (127.0.0.1, 0.0.0.0, "
                               "::) or a name that resolves to one") from None
        raise ToolkitError(f"cannot listen on {host}:{port} ({e.strerror}); pass a free --port (0: any free one)") \
            from None
    return sock


def engines_line(model: dict) -> str:
    """What runs a served model, from its `/info` entry: `embedding: int8 tvm, 10 buckets (SEQ 8..60), 2 instances
    x 1 thread per bucket`."""
    seqs = [b["seq"] for b in model["buckets"]]
    return (f"{model['task']}: {model['dtype']} {model['backend']}, {len(seqs)} bucket(s) (SEQ {seqs[0]}..{seqs[-1]}), "
            f"{model['instances']} instance(s) x {model['threads_per_instance']} thread(s) per bucket")


# a server's: SIGTERM is the stop asked for, Ctrl-C exits as shells give it
SERVER_EXIT_STATUSES = MappingProxyType({signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT})


@contextmanager
def exit_on_signals(received: list[int] | None = None, statuses: Mapping[int, int] = SERVER_EXIT_STATUSES):
    """Within the block, each signal of `statuses` exits with its status, as a SystemExit raised where the signal
    interrupts: no traceback, and the `finally` blocks and context managers on the way out run (children stopped,
    files closed). The previous handlers come back after. Yields the list of the signals received (`received`, if
    given, is appended to)."""
    received = [] if received is None else received

    def exit_with_status(signum, frame):
        received.append(signum)
        raise SystemExit(statuses[signum])

    with signal_handler(exit_with_status, tuple(statuses)):
        yield received


@contextmanager
def signals_deferred():
    """Within the block, SIGTERM and SIGINT are held (for code that must not be interrupted, such as an import); after
    it, the first one exits as under `exit_on_signals`."""
    received = []
    with signal_handler(lambda signum, frame: received.append(signum)):
        yield
    if received:
        raise SystemExit(exit_status(received[0]))


@contextmanager
def signal_handler(handler, signals: tuple[int, ...] = tuple(SERVER_EXIT_STATUSES)):
    """`handler` (or SIG_IGN) for `signals` (SIGTERM and SIGINT) within the block; the previous handlers come back
    after."""
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, previous_handler in previous.items():
            signal.signal(sig, previous_handler)


def exit_status(signum: int) -> int:
    """A server's exit status after a stop by `signum` (`SERVER_EXIT_STATUSES`)."""
    return SERVER_EXIT_STATUSES[signum]
