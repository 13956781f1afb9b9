"""Errors a user can cause and fix (bad config, missing data).

Entry points print their message alone, without a traceback; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error whose message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value that is refused before any training starts."""

    def __init__(self, key: str, value: object, why: str) -> None:
        self.key = key
        self.value = value
        super().__init__(f"config {key}={value!r}: {why}")


class DataError(UserError, RuntimeError):
    """Data that is missing, truncated or corrupt; the message names the file or folder."""
