"""The one error type the data layer raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and line) and what is wrong.

    Raised while a source is built, so a run fails before its first step rather than mid-training.
    """
