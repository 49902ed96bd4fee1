"""User-facing errors: the CLI prints their message (which names the fix) instead of a stack trace; and the checks
every option of the CLI and the API makes."""
import numbers
import os


class ToolkitError(Exception):
    """An error the user can fix; the message says how."""


def is_integer(value) -> bool:
    """Whether `value` is an integral number (int, numpy's integers), never a bool (True would pass as 1): what every
    count, size and length option takes."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_threads(threads, replicas: int = 1, replicas_flag: str = "--replicas") -> None:
    """Raise ToolkitError naming the flag to change unless `threads` compute threads in each of `replicas` processes
    (None: the cores shared between them, at least one each) fit in this machine's cores, as the runtime's budget
    keeps them (`runtime.ComputeBudget`): TVM's thread pool spins, so threads beyond the cores crawl."""
    if threads is not None and (not is_integer(threads) or threads < 1):
        raise ToolkitError(f"--threads must be an integer >= 1, got {threads!r}")
    cores = os.cpu_count() or 1
    if replicas > cores:
        raise ToolkitError(f"{replicas_flag} {replicas} is more than this machine's {cores} cores (every replica "
                           f"computes with at least one thread); pass {replicas_flag} {cores} or fewer")
    if threads is not None and threads * replicas > cores:
        what, default = (f"--threads {threads}", "all cores") if replicas == 1 else \
            (f"--threads {threads} per replica x {replicas} replicas is {threads * replicas} compute threads, which",
             "the cores divided between the replicas")
        raise ToolkitError(f"{what} is more than this machine's {cores} cores: compute threads beyond the cores crawl "
                           f"(TVM's thread pool spins); pass --threads {cores // replicas} or fewer, or leave it out "
                           f"({default})")
