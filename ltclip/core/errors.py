"""The one project error type: a user-facing, one-line message."""


class LtclipError(Exception):
    """A problem the user can fix; the CLI prints ``str(err)`` on one line and exits non-zero.

    ``exit_code`` is 2 for bad input (options, manifests, caches) and 1 for failed checks.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
