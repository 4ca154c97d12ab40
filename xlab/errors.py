"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class XLabError(Exception):
    """A user-facing error: bad input, a missing earlier stage, a bad option value.

    The message is one line that says what is wrong and, where it helps, which command fixes it.
    The CLI prints it as ``error: <message>`` and exits with code 2, without a traceback.
    """
