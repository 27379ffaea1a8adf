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


# ---------------------------------------------------------------- C status codes

# The status codes every compiled backend returns (src/cpu/pyeffort.h's pe_status; the CUDA
# library returns the same codes, and above STATUS_DEVICE a CUDA runtime error number).
STATUS_OK, STATUS_ALLOC, STATUS_NONFINITE, STATUS_ARG, STATUS_THREAD, STATUS_FORMAT = range(6)
STATUS_DEVICE = 1000  # status - STATUS_DEVICE: the device runtime's own error number

_STATUS = {
    STATUS_ALLOC: (MemoryError, "out of memory"),
    STATUS_NONFINITE: (NonFiniteError, "an input holds NaN or Inf"),
    STATUS_ARG: (ShapeError, "inconsistent sizes reached the compiled core"),
    STATUS_THREAD: (BackendError, "could not start a worker thread"),
    STATUS_FORMAT: (FormatError, "the matrix data is damaged"),
}


def status_error(status: int, where: str, detail: str = "") -> Exception:
    """The exception for a non-zero status from a compiled backend (``where``: which one, e.g.
    "pyeffort C core"; ``detail``: the backend's own message, if any). The one mapping from
    status codes to exceptions, shared by every backend.

    >>> status_error(STATUS_NONFINITE, "pyeffort C core")
    NonFiniteError('pyeffort C core: an input holds NaN or Inf')
    """
    cls, msg = _STATUS.get(status, (BackendError, f"status {status}"))
    return cls(f"{where}: {detail or msg}")
