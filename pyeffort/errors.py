"""Exceptions raised by pyeffort. Each subclasses a built-in so callers can catch broadly."""


class PyEffortError(Exception):
    """Base class of every pyeffort error."""


class ShapeError(PyEffortError, ValueError):
    """An array has the wrong shape or number of dimensions, or does not match the Buckets."""


class DTypeError(PyEffortError, TypeError):
    """An array has a dtype pyeffort does not accept."""


class LayoutError(PyEffortError, ValueError):
    """An array is not C-contiguous (pyeffort never copies silently on the fast path)."""


class NonFiniteError(PyEffortError, ValueError):
    """An input holds NaN or Inf: the selection of what to skip is undefined for them."""


class EffortError(PyEffortError, ValueError):
    """The effort is not a number in [0, 1]."""


class FormatError(PyEffortError, ValueError):
    """A file is not a valid pyeffort file: foreign, truncated, malformed or of an unknown version."""


class BackendError(PyEffortError, RuntimeError):
    """A backend failed for a reason that is not the caller's input (out of memory, ...)."""
