"""The ``pyeffort`` command line. Each subcommand lives in a module exposing
``add_parser(subparsers)`` that registers it with ``set_defaults(func=...)``; add a module to
SUBCOMMANDS to add a command.

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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyeffort", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
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
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"pyeffort {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
