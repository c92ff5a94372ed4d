"""The one error type for problems a user can fix."""


class UsageError(Exception):
    """A config key, path, flag or run the command cannot work with.

    The message names the key or file and says what to do; the CLI prints it on one line
    (``flowmill: error: ...``) and exits with code 2.
    """
