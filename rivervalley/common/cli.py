"""The one error scheme of this project's command-line tools (``rivervalley``, ``extramerge``).

Every way a command can fail ends in one line on stderr and a fixed exit status:

    PROG: error: MESSAGE      2    bad input: a usage error, a ValueError, a missing or unreadable
                                   path, or any error type the tool adds (e.g. extramerge's CheckpointError)
    PROG: error: MESSAGE      1    any other OSError (a full disk, an I/O error)
    PROG: terminated (SIG)    128 + signal number (SIGTERM/SIGHUP unwind like Ctrl-C, so staging folders
                                   are removed on the way out)
    PROG: interrupted         130  Ctrl-C
    (nothing)                 141  stdout closed early (``| head``)

Warnings print as ``PROG: warning: MESSAGE`` on one line. Messages have control characters escaped (a name
read from a file cannot drive the terminal) and are cut at 2000 characters.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from rivervalley.common.publish import Terminated, interruptible

__all__ = ["Parser", "UsageError", "USER_ERRORS", "oneline", "run"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


class UsageError(Exception):
    """A command-line usage error (unknown flag, bad value), reported as one line with exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`UsageError` instead of printing the usage and exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(message)


def oneline(e: BaseException, limit: int = 2000) -> str:
    """The message on one line, control characters escaped, at most ``limit`` characters."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.strerror}: {e.filename}"
    else:
        msg = str(e) or type(e).__name__
    msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(msg.split()))
    return msg if len(msg) <= limit else msg[:limit] + "..."


def run(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Parse ``argv`` with ``parser`` and call ``args.func(args)`` under the scheme above.

    ``errors`` adds the tool's own bad-input exception types to :data:`USER_ERRORS`.
    """

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        text = oneline(message if isinstance(message, Warning) else Warning(message))
        print(f"{prog}: warning: {text}", file=sys.stderr)

    def fail(e: BaseException, status: int) -> int:
        print(f"{prog}: error: {oneline(e)}", file=sys.stderr)
        return status

    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return fail(e, 2)
    func: Callable = args.func
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = show_warning
        try:
            with interruptible():  # SIGTERM/SIGHUP unwind like Ctrl-C: no staging folder is left behind
                return int(func(args) or 0)
        except Terminated as e:
            print(f"{prog}: terminated ({e})", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except (UsageError, *USER_ERRORS, *errors) as e:
            return fail(e, 2)
        except OSError as e:
            return fail(e, 1)
