"""The one exception the tool raises for bad input: its message is the whole story."""


class EvitError(Exception):
    """Bad input or an environment problem. The message says what was wrong and what to do."""
