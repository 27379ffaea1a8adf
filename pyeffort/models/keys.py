"""The effort dial from the keyboard: ``+`` / ``-`` pressed during generation change the effort
for the very next token (read non-blockingly from a tty with termios/select)."""

from __future__ import annotations

import os
import select
import sys

STEP = 0.05
LOW = 0.05  # the keys go no lower
MIN_EFFORT = 0.01  # the command line refuses less: below it a matrix keeps almost nothing


class EffortDial:
    """A callable giving the current effort; each call first applies any keys pressed."""

    def __init__(self, effort: float, keys: bool = True, stream=None, fd: int | None = None):
        self.value = check_effort(effort)
        self.stream = stream or sys.stderr
        if fd is None and keys and _isatty(sys.stdin):
            fd = sys.stdin.fileno()
        self.fd = fd if keys else None  # a terminal to read keys from
        self._saved = None

    def __enter__(self):
        if self.fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd, termios.TCSANOW)  # keys one by one, no echo, keep type-ahead
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def set(self, effort: float) -> None:
        self.value = check_effort(effort)

    def press(self, key: str) -> None:
        old = self.value
        if key in "+=":
            self.value = min(1.0, round(self.value + STEP, 4))
        elif key in "-_":
            self.value = max(LOW, round(self.value - STEP, 4))
        if self.value != old:
            self.stream.write(f" [effort {self.value:.2f}] ")
            self.stream.flush()

    def __call__(self) -> float:
        if self._saved is not None:
            while select.select([self.fd], [], [], 0)[0]:
                data = os.read(self.fd, 64)
                if not data:
                    break
                for ch in data.decode("utf-8", "ignore"):
                    self.press(ch)
        return self.value


def check_effort(e) -> float:
    """``e`` as a float in [MIN_EFFORT, 1] (ValueError otherwise, NaN included)."""
    e = float(e)
    if not MIN_EFFORT <= e <= 1.0:
        raise ValueError(f"effort must lie in [{MIN_EFFORT}, 1], got {e}")
    return e


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False
