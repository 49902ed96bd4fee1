"""Shared click plumbing for the `toolkit` and `perf` commands."""
import errno
import os
import signal
import sys
import warnings
from pathlib import Path

import click
from click.exceptions import NoArgsIsHelpError
from typing_extensions import override

from toolkit.errors import ToolkitError, is_integer
from toolkit.runtime import AUTO_INSTANCES

# Ctrl-C's exit status, as shells give it (128 + SIGINT) and `toolkit serve` exits with
INTERRUPTED = 128 + signal.SIGINT


class ToolkitGroup(click.Group):
    """Turns ToolkitError (a mistake the user can fix) into one clear line and exit code 2, not a traceback; so too a
    file system error on a path (a directory that cannot be made or written, a full disk), and click's own refusals
    of the command line (an unknown option, a bad value: click prints its usage block). Ctrl-C exits 130 (click's
    `Aborted!` exits 1, a failure's status to a script), after the command's own cleanup has run."""

    @override
    def make_context(self, info_name, args, parent=None, **extra):
        try:  # the group's own options (`toolkit --bogus`): parsed here, before `invoke`
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            exit_on_usage_error(e)

    @override
    def invoke(self, ctx):
        warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a command's options, an unknown command
            exit_on_usage_error(e)
        except KeyboardInterrupt:
            click.echo(err=True)  # the terminal's `^C` echo stays on a line of its own
            click.secho(f"interrupted: exit {INTERRUPTED}", fg="red", err=True)
            sys.exit(INTERRUPTED)
        except ToolkitError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except OSError as e:
            if e.filename is None and e.errno != errno.ENOSPC:
                raise
            where = f" {e.filename}" if e.filename is not None else ""
            click.secho(f"error: cannot use{where}: {e.strerror or e}; check the path, its permissions and the free "
                        "disk space", fg="red", err=True)
            sys.exit(2)


def exit_on_usage_error(e: click.UsageError) -> None:
    """Print click's refusal of a command line as one `error:` line naming the command's help, and exit with click's
    status for it (2). A group called with no command shows its help, as click does."""
    if isinstance(e, NoArgsIsHelpError):
        raise e
    where = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
    click.secho(f"error: {e.format_message().rstrip('.')}{where}", fg="red", err=True)
    sys.exit(e.exit_code)


class InstancesParam(click.ParamType):
    """`--instances`: a count >= 1, or "auto" (toolkit.runtime.resolve_instances)."""

    name = "N|auto"

    @override
    def convert(self, value, param, ctx):
        if value == AUTO_INSTANCES or is_integer(value):
            return value
        if str(value).isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is neither an integer >= 1 nor {AUTO_INSTANCES!r}", param, ctx)


INSTANCES = InstancesParam()


class OutputFile(click.ParamType):
    """A file a command writes its results to (`--json`, `--trace`): checked before the work starts, so a path that
    cannot be written is a one-line error now, not after a long run."""

    name = "FILE"

    @override
    def convert(self, value, param, ctx):
        if not str(value).strip():
            self.fail("the file name is empty; name a file to write to, or leave the option out", param, ctx)
        if str(value) == "-":  # not standard output here: the tables go there
            self.fail("'-' is not standard output here (the tables go there); name a file, /dev/stdout to print the "
                      "JSON after the tables, or ./- for a file named '-'", param, ctx)
        path = Path(value).expanduser()
        if path.is_dir():
            self.fail(f"{value} is a directory; name a file in it", param, ctx)
        existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())  # where mkdir would start
        if not existing.is_dir():
            self.fail(f"cannot write {value}: {existing} is a file, not a directory", param, ctx)
        if not os.access(existing, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            self.fail(f"cannot write {value}: permission denied; name a writable path", param, ctx)
        if existing == path.parent and not path.exists():  # what the system refuses beyond that (`/proc/x.json`, a
            try:  # read-only mount): created and removed now; an existing file is left as it is (`/dev/stdout`)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                path.unlink()
            except OSError as e:
                self.fail(f"cannot write {value}: {e.strerror or e}; name a file in a writable directory", param, ctx)
        return str(path)

