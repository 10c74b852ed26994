"""The configuration error: which dotted key is wrong, and why."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or wrong.

    ``key`` is the full dotted key (``"listener[0].tls"``), ``message`` says what is
    wrong and what is allowed; ``str()`` gives ``"<key>: <message>"`` so operators see
    both on one line.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"
