"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class ErasekitError(Exception):
    """Bad input or a refused operation; the message is a complete one-line explanation."""


class UnknownNameError(ErasekitError, KeyError):
    """A name (method, attack, detector, concept) that no registry knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (``default``, else its type name, when empty)."""
    text = str(e).strip()
    if text:
        return text.splitlines()[0]
    return type(e).__name__ if default is None else default


class DegenerateOutput(ErasekitError):
    """A model rendered non-finite or constant images: broken weights, not evidence."""


class UsageError(ErasekitError, ValueError, TypeError):
    """A Python API argument of the wrong type or value: the same one line the CLI prints
    (catch it as ``erasekit.UsageError``, ``ValueError`` or ``TypeError``)."""
