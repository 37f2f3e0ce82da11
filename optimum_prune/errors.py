"""The one exception type users see for bad input.

Every check that can be blamed on the caller (configuration, data, model, output folder) raises
`PruningError` with a single line that says what to change. The CLI turns it into exit code 2.
"""


class PruningError(ValueError):
    """Invalid input to optimum-prune; the message names the fix."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or of its cause's), for one-line error reports."""
    cause = err.__cause__ or err
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__
