"""Errors a user can act on.

Every expected mistake (bad file, bad parameter, empty region, ...) raises `EsegetaError` with a
one-line message that names the problem and what to do. Front ends (CLI, Slicer) print the message
without a traceback; anything else is an internal error.
"""


class EsegetaError(ValueError):
    """An expected, user-fixable problem. The message is one line: what is wrong, what to do."""


class EsegetaCancelled(RuntimeError):
    """Raised when the caller's cancel flag was set; nothing partial is returned or written."""


def is_cancelled(cancel) -> bool:
    """The cancel flag every long call takes: None, a threading.Event, or a zero-argument callable."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())
