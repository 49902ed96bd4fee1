"""Shared click plumbing for the `toolkit` and `perf` commands."""
import sys
import warnings

import click
from typing_extensions import override

from toolkit.errors import ToolkitError


class ToolkitGroup(click.Group):
    """Turns ToolkitError (a mistake the user can fix) into one clear line and exit code 2, not a traceback."""

    @override
    def invoke(self, ctx):
        warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
        try:
            return super().invoke(ctx)
        except ToolkitError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
