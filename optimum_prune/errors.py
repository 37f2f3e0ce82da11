"""The one exception type users see for bad input.

Every check that can be blamed on the caller (configuration, data, model, output folder) raises
`PruningError` with a single line that says what to change. The CLI turns it into exit code 2.
"""


class PruningError(ValueError):
    """Invalid input to optimum-prune; the message names the fix."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is the operating system saying the disk (or the user's quota) is full: an
    `OSError`, or a writer's own error that wraps it (safetensors: "... (os error 28)")."""
    import errno

    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(f"(os error {code})" in str(err) for code in (errno.ENOSPC, errno.EDQUOT))


def format_bytes(nbytes: int) -> str:
    """A byte count for a message: '8.69 MiB', '706.2 KiB'."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or of its cause's), for one-line error reports."""
    cause = err.__cause__ or err
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def check_choice(value, name: str, choices: tuple) -> None:
    if value not in choices:
        raise PruningError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")


def check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise PruningError(f"{name} must be true or false, got {value!r}.")


def check_positive_int(value, name: str) -> None:
    check_int(value, name, minimum=1, what="a positive integer")


def check_int(value, name: str, minimum: int = 0, what: str | None = None, maximum: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        expected = f"an integer in [{minimum}, {maximum}]" if maximum is not None else f"an integer >= {minimum}"
        raise PruningError(f"{name} must be {what or expected}, got {value!r}.")


def check_positive_number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise PruningError(f"{name} must be a positive number, got {value!r}.")
