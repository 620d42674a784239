"""User-facing errors: the CLI prints ``fastp2p: error: <message>`` on one line and exits non-zero; tracebacks are kept
for bugs."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag value, checkpoint/architecture mismatch). The message must name
    the culprit (file or flag) and say what to do."""


class DataError(UserError):
    """Bad input data: a corrupt or truncated image, an odd-width aligned pair, mismatched A/B sizes, an empty folder,
    a missing counterpart. The message names the file."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to ``limit`` characters: how
    a library error is quoted inside a one-line ``UserError``."""
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]
