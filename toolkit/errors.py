"""User-facing errors: the CLI prints their message (which names the fix) instead of a stack trace."""


class ToolkitError(Exception):
    """An error the user can fix; the message says how."""
