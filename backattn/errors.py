"""The errors backattn raises on bad input: one family, each message naming the argument, the value and the fix.

They subclass the built-in ``ValueError`` and ``TypeError``, so code written against those keeps working.
"""


class BackattnError(Exception):
    """Base of every error backattn raises on bad input or a damaged file."""


class BackattnValueError(BackattnError, ValueError):
    """A value that cannot be used: out of range, not finite, inconsistent with the base model."""


class BackattnTypeError(BackattnError, TypeError):
    """An argument of the wrong type."""


class HeadFileError(BackattnValueError):
    """A head directory that cannot be read or written as asked: damaged, mismatched, foreign files, locked."""


class RunDirectoryError(BackattnValueError):
    """An output directory that holds an earlier run, or cannot be written."""
