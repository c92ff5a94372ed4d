"""The one error type for problems a user can fix, and how any error is said in one line."""

# torch's DataLoader re-raises a worker process's error with this line and the worker's traceback in its message
WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class UsageError(Exception):
    """A config key, path, flag or run the command cannot work with.

    The message names the key or file and says what to do; the CLI prints it on one line
    (``flowmill: error: ...``) and exits with code 2.
    """


def one_line(text: str) -> str:
    """An error as ``"Type: message"`` (``text``) on one line. An error a worker process raised and
    torch's DataLoader re-raised, its message holding the worker's traceback, is said as the worker
    said it: the last line, without the module path of its type."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if WORKER_TRACEBACK in lines:
        name, _, message = lines[-1].partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message}"
    return " ".join(lines)
