"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class XLabError(Exception):
    """A user-facing error: bad input, a missing earlier stage, a bad option value.

    The message is one line that says what is wrong and, where it helps, which command fixes it.
    The CLI prints it as ``error: <message>`` and exits with code 2, without a traceback.
    """


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, at most ``limit`` characters, or the
    exception's type name when the message is empty; for one-line errors built from library
    exceptions (SentencePiece, pyarrow and torch append log text or tracebacks to theirs)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(e).__name__


class Terminated(BaseException):
    """SIGTERM (a scheduler's time limit or preemption, or ``kill``), handled like Ctrl-C: training
    saves ``last.pt`` first. The CLI exits with code 143 (128 + SIGTERM) instead of Ctrl-C's 130.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""
