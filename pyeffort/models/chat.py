"""``pyeffort chat``: a conversation with the model's chat template. Between turns ``/effort X``
sets the effort; during a reply the keys + and - change it for the very next token."""

from __future__ import annotations

import os
import sys

from pyeffort.models.commands import (
    EFFORT_KEYS,
    SAMPLING,
    TextStream,
    add_model_args,
    add_sampling_args,
    sampling_kwargs,
    text_arg,
)
from pyeffort.models.keys import MIN_EFFORT

HELP = f"commands: /effort X ({MIN_EFFORT} <= X <= 1), /reset (forget the conversation), /quit"
CONTEXT = ("a reply stops at the end of the model's context (max_seq_len); "
           "a turn that does not fit is refused: /reset starts afresh")  # fmt: skip


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with the model",
                              epilog=f"{HELP}; {EFFORT_KEYS}; {CONTEXT}; {SAMPLING}")  # fmt: skip
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system-prompt", "--system", dest="system", type=text_arg, default=None,
                   help="a system message")  # fmt: skip
    p.set_defaults(func=run, max_tokens=512)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Chat:
    """The conversation and the tokens already in the model's KV cache."""

    def __init__(self, model, system: str | None = None):
        self.model, self.system = model, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []  # tokens whose keys and values are in the cache
        self.model.reset()

    def reply(self, text: str, dial, args, out=None):
        """Answer ``text``, streaming to ``out``; -> (reply text, Stats). ContextError (and the
        conversation unchanged) when the conversation leaves no room in the model's context."""
        from pyeffort.models.generate import Stats, fit_context, generate

        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.model.tokenizer.chat_prompt(self.messages)
            n = fit_context(self.model, len(ids), args.max_tokens)
        except ValueError:  # the template refused, or no room: the conversation stays as it was
            self.messages.pop()
            raise
        start = min(common_prefix(self.cached, ids), len(ids) - 1)  # reuse the cache
        st, stream = Stats(), TextStream(self.model.tokenizer, out)
        with dial:
            for t in generate(self.model, ids[start:], start_pos=start,
                              max_tokens=n, effort=dial, stats=st,
                              **sampling_kwargs(args)):  # fmt: skip
                stream.add(t)
        self.cached = ids + stream.ids[:-1]  # the last token was never fed
        answer = stream.text.strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer, st


def run(args) -> int:
    from pyeffort.models.commands import load_model, prepare, summary
    from pyeffort.models.generate import ContextError
    from pyeffort.models.keys import EffortDial
    from pyeffort.models.tokenizer import ChatTemplateError

    dial = EffortDial(args.effort, keys=not args.no_keys and args.tp == 1)  # ranks agree
    chat = Chat(load_model(args), args.system)
    comm = getattr(chat.model, "comm", None)  # --tp: rank 0 reads, every rank gets the line
    read = input if comm is None else comm.read_line
    if comm is not None and comm.rank != 0:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (rank 0 reports for the group)
    chat.model.tokenizer.check_chat_template()  # jinja2 there, the template compiles
    prepare(chat.model, progress=args.progress)
    if not args.quiet:
        print(f"effort {dial.value:.2f}. {HELP}; {EFFORT_KEYS}.", file=sys.stderr)
    while True:
        try:
            line = read("> ")
            line.encode("utf-8")  # undecodable bytes arrive as surrogate escapes
        except EOFError:
            if not args.quiet:
                print(file=sys.stderr)
            return 0
        except UnicodeError:
            print("[that line is not valid UTF-8 text]", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                chat.reset()
                print("[conversation cleared]", file=sys.stderr)
            elif cmd == "/effort":
                try:
                    dial.set(float(arg))
                    print(f"[effort {dial.value:.2f}]", file=sys.stderr)
                except ValueError as exc:
                    print(f"[{exc}; e.g. /effort 0.3]", file=sys.stderr)
            else:
                print(f"[unknown command {cmd}; {HELP}]", file=sys.stderr)
            continue
        try:
            _, st = chat.reply(line, dial, args)
        except (ContextError, ChatTemplateError) as exc:
            print(f"[{exc}; /reset starts afresh]", file=sys.stderr)
            continue
        print(flush=True)
        if not args.quiet:
            print(summary(st), file=sys.stderr, flush=True)
