"""What a local Ray's Serve runs in place of its HAProxy binary under `toolkit serve --ray` (ray_app.py points
`RAY_SERVE_HAPROXY_BINARY_PATH` at a script that runs this file with the real binary's path first).

Serve's HAProxy config always has a stats page (port 8404) and a Prometheus exporter (port 9101) bound on every
interface: a second server on the machine cannot start (HAProxy crashes on the taken ports), and both are open to the
network whatever `--host` says. Nothing in Serve reads them, so this drops both from the config before HAProxy reads
it. And HAProxy is a child of Serve's manager actor, which Ray can kill without stopping it (a stop during startup, a
controller that does not shut down in time): it would be left holding the serving port. A parent-death signal ends it
with the manager. Standard library only: it runs with `python -I -S` on every HAProxy start and reload.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

DROPPED_SECTIONS = ("listen stats", "frontend prometheus")
PR_SET_PDEATHSIG = 1


def without_listeners(config: str) -> str:
    """`config` without its stats and Prometheus sections (a section runs from an unindented line to the next)."""
    kept, dropping = [], False
    for line in config.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            dropping = " ".join(line.split()) in DROPPED_SECTIONS
        if not dropping:
            kept.append(line)
    return "".join(kept)


def main(binary: str, args: list[str]) -> None:
    """Edit the config that `args` name (`-f PATH`), arm the parent-death signal, become `binary` with `args`."""
    config_path = args[args.index("-f") + 1]
    with open(config_path) as f:
        config = f.read()
    if (edited := without_listeners(config)) != config:
        with open(config_path, "w") as f:
            f.write(edited)
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the manager died before the signal was armed
        sys.exit(1)
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
