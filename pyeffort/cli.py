"""The ``pyeffort`` command line. Each subcommand lives in a module exposing
``add_parser(subparsers)`` that registers it with ``set_defaults(func=...)``; add a module to
SUBCOMMANDS to add a command.

A user error (bad option, file or model; a missing optional extra) ends with one line
``pyeffort COMMAND: error: ...`` on stderr and exit code 2; anything else is a bug and keeps its
traceback.

Every command takes --quiet (no progress bars or stats lines; warnings and errors stay) and
--no-progress; progress bars are drawn only on a terminal.

pyeffort generate "What is the capital of France?" --effort 0.3   (the chat template applied)
pyeffort generate "The capital of France is" --raw --max-tokens 20
echo "Tell me a story" | pyeffort generate - --json
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


def version() -> str:
    """pyeffort's version from the installed package's metadata (the source's, uninstalled)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("pyeffort")
    except PackageNotFoundError:
        from pyeffort import __version__

        return __version__


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--quiet and --no-progress on a command (one it defines itself is kept)."""
    options = [(("-q", "--quiet"), "no progress bars, notes or stats lines"),
               (("--no-progress",), "no progress bars (drawn only on a terminal)")]  # fmt: skip
    for flags, text in options:
        try:
            p.add_argument(*flags, action="store_true", help=text)
        except argparse.ArgumentError:  # the command has it already
            pass


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="pyeffort", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--version", action="version", version=f"pyeffort {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an optional part that is not installed
            if exc.name is None or not name.startswith(exc.name):
                raise
            continue
        module.add_parser(sub)
    for command in sub.choices.values():
        add_output_args(command)
    return p


def wants_progress(args) -> bool:
    """Progress bars (``\\r`` frames) only on a terminal, and not when asked for none."""
    if args.quiet or args.no_progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if getattr(args, "func", None) is None:
        p.print_help()
        return 2
    args.progress = wants_progress(args)
    args.no_progress = not args.progress  # what eval reads
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
