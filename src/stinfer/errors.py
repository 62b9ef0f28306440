"""The one exception type for problems with what the user gave us.

Raise :class:`InputError` where a bad value enters (a file, a field, an argument) with the
file, the field and the fix in the message. The CLI prints these as one line and exits with
status 2, without a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """A user-facing error: bad file, bad field, bad argument. The message says how to fix it."""
