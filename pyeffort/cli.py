"""The ``pyeffort`` command line. Each subcommand lives in a module exposing
``add_parser(subparsers)`` that registers it with ``set_defaults(func=...)``; add a module to
SUBCOMMANDS to add a command.

A user error (bad option, file or model; a missing optional extra) ends with one line
``pyeffort COMMAND: error: ...`` on stderr and exit code 2; anything else is a bug and keeps its
traceback.

pyeffort generate "The capital of France is" --effort 0.3 --max-tokens 100
pyeffort chat --effort 0.5          (/effort 0.2 between turns; keys + / - while it answers)
pyeffort convert SRC.gguf DST       pyeffort info DST       pyeffort bench
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = [
    "pyeffort.models.commands",  # generate, convert, info, bench
    "pyeffort.models.chat",  # chat
    "pyeffort.eval.cli",  # eval
]


# optional modules -> the extra that installs them
EXTRAS = {"gguf": "model", "tokenizers": "model", "sentencepiece": "model", "jinja2": "model",
          "matplotlib": "eval"}  # fmt: skip
USER_ERRORS = (ValueError, OSError)  # pyeffort's errors subclass ValueError (or TypeError)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (and exit code 2, as argparse)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="pyeffort", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an optional part that is not installed
            if exc.name is None or not name.startswith(exc.name):
                raise
            continue
        module.add_parser(sub)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if getattr(args, "func", None) is None:
        p.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. piped into head
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except Exception as exc:
        msg = user_error(exc)
        if msg is None:
            raise
        print(f"pyeffort {args.command}: error: {msg}", file=sys.stderr)
        return 2


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix; None for a bug."""
    from pyeffort.errors import PyEffortError

    if isinstance(exc, ModuleNotFoundError):
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            return None
        return f"{exc.name} is not installed: pip install 'pyeffort[{extra}]'"
    if not isinstance(exc, (PyEffortError, *USER_ERRORS)):
        return None
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
