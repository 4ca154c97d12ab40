"""The entry point of the ``xlab`` command (:func:`main`): runs the Typer app
(:mod:`xlab.commands.app`) and turns every way a command can end into one line and an exit code."""

from __future__ import annotations

import os
import sys

import typer

from xlab.errors import Terminated, XLabError, first_line

# What Ctrl-C or SIGTERM leaves is resumable: a data stage by the same command, a training run by
# --resume, which finds the run's own saved configuration.
RESUME_HINT = "rerun the same command to resume (xlab train: --run-name NAME --resume, once it has saved a checkpoint)"
INTERRUPTED = f"interrupted; {RESUME_HINT}"


def _terminate(signum, frame) -> None:
    raise Terminated


def wide_logs(stream=None, environ=None) -> None:
    """Give output redirected to a file or a pipe 120 columns: rich lays it out in 80 and cuts wider
    table cells to "1,816,9…". A ``COLUMNS`` of the user's own wins; rich reads it at every print."""
    stream = sys.stdout if stream is None else stream
    environ = os.environ if environ is None else environ
    if not stream.isatty() and "COLUMNS" not in environ:
        environ["COLUMNS"] = "120"


def main() -> None:
    """Entry point of the installed ``xlab`` command: every error is one line on stderr.

    Exit codes: 0 done, 1 ``xlab data validate`` found problems, 2 bad input (an XLabError, a bad
    command or option, an unusable path), 130 Ctrl-C, 143 SIGTERM.
    """
    import signal

    # SIGTERM stops a stage the way Ctrl-C does (cleanly, so a rerun resumes); training saves first.
    signal.signal(signal.SIGTERM, _terminate)
    wide_logs()
    try:
        from xlab.commands.app import app

        code = app(prog_name="xlab", standalone_mode=False)
    except Terminated:
        print(f"terminated (SIGTERM); {RESUME_HINT}", file=sys.stderr)
        sys.exit(143)
    except XLabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort) as e:
        if isinstance(e.__cause__, EOFError):  # Click turns an EOFError into Abort: a cut input, not Ctrl-C
            print(f"error: a file or stream ended before its end ({first_line(e.__cause__) or 'EOFError'})",
                  file=sys.stderr)  # fmt: skip
            sys.exit(2)
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        # A path the user pointed at (or a folder a stage writes to) that cannot be used: a file where a
        # folder should be, a read-only folder, a full disk. Every stage writes atomically, so what an
        # earlier run wrote is intact; the message names the path.
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or first_line(e)}{where}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise  # a bug: its traceback is what the report needs
        # A command-line usage error (Typer's Click): an unknown command or option, a missing
        # argument, a value of the wrong type; or no arguments at all, which shows the help.
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ != "NoArgsIsHelpError":  # (Typer has printed the help for that one)
            hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            print(f"error: {e.format_message().splitlines()[0].rstrip('.')}{hint}", file=sys.stderr)
        sys.exit(2)
    code = code if isinstance(code, int) else 0
    if code == 130:  # Typer turns Ctrl-C into exit code 130 before it reaches the handler above
        print(INTERRUPTED, file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
