"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class ErasekitError(Exception):
    """Bad input or a refused operation; the message is a complete one-line explanation."""


class UnknownNameError(ErasekitError, KeyError):
    """A name (method, attack, detector, concept) that no registry knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
