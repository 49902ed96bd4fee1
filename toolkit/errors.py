"""User-facing errors: the CLI prints their message (which names the fix) instead of a stack trace; and the integer
check every count, size and length option of the CLI and the API makes."""
import numbers

MAX_QUOTED_CHARS = 200  # the most of a value a message repeats: a service answers these messages to its clients


class ToolkitError(Exception):
    """An error the user can fix; the message says how."""


def clipped(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text`, or its first `limit` characters and how many it leaves out: a message naming a value (a client's
    instruction) does not grow with it."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def is_integer(value) -> bool:
    """Whether `value` is an integral number (int, numpy's integers), never a bool (True would pass as 1): what every
    count, size and length option takes."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value, name: str, minimum: int) -> None:
    """Raise ToolkitError naming `name` (a flag such as `--threads`, or an argument) unless `value` is an integer
    >= `minimum`."""
    if not is_integer(value) or value < minimum:
        raise ToolkitError(f"{name} must be an integer >= {minimum}, got {value!r}")
