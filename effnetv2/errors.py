"""The error a user fixes by changing a flag or argument (train.py prints its message alone)."""


class UsageError(ValueError):
    """A flag's or argument's value that cannot work; the message names it and says what to give."""
