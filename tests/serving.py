"""Helpers for the service tests: the tiny bucket sets; an app served in-process, or `toolkit serve` as a process, on
a free loopback port."""
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from toolkit.perf.serve_load import ServerProcess

TIMEOUT = 60  # seconds: every wait in the service tests is bounded


def bucket_sets(onnx_artifacts) -> dict:
    """The conftest's tiny artifacts as bucket-set directories, by task."""
    return {task: artifacts[0].parent for task, artifacts in onnx_artifacts.items()}


@contextmanager
def served(app, server: uvicorn.Server | None = None):
    """Serve `app` with uvicorn (or `server`, made for it) on a thread; yields its base URL; stops it gracefully (the
    app closes its models)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = server or uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


@contextmanager
def serve_process(*args, startup_timeout: float = TIMEOUT):
    """`toolkit serve ARGS` as a process; yields (base URL, process) once /health answers 200; stopped with SIGTERM
    after. Fails if the server printed a traceback."""
    with ServerProcess(list(args), startup_timeout) as server:
        yield server.base, server.process
        server.stop()
        output = server.output()  # before the exit closes the log
    assert "Traceback" not in output, output


def wait_for(condition, timeout: float = TIMEOUT) -> None:
    """Poll `condition` (a connection error counts as not yet) until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
