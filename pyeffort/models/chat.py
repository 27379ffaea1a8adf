"""``pyeffort chat``: a conversation with the model's chat template. Between turns ``/effort X``
sets the effort; during a reply the keys + and - change it for the very next token."""

from __future__ import annotations

import sys

from pyeffort.models.commands import EFFORT_KEYS, TextStream, add_model_args, add_sampling_args

HELP = "commands: /effort X (0 < X <= 1), /reset (forget the conversation), /quit"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with the model", epilog=f"{HELP}; {EFFORT_KEYS}")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system message")
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
        """Answer ``text``, streaming to ``out``; -> (reply text, Stats)."""
        from pyeffort.models.generate import Stats, generate

        self.messages.append({"role": "user", "content": text})
        ids = self.model.tokenizer.chat_prompt(self.messages)
        start = min(common_prefix(self.cached, ids), len(ids) - 1)  # reuse the cache
        st, stream = Stats(), TextStream(self.model.tokenizer, out)
        with dial:
            for t in generate(self.model, ids[start:], start_pos=start,
                              max_tokens=args.max_tokens, effort=dial,
                              prefill_effort=args.prefill_effort, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, stats=st):  # fmt: skip
                stream.add(t)
        self.cached = ids + stream.ids[:-1]  # the last token was never fed
        answer = stream.text.strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer, st


def run(args) -> int:
    from pyeffort.models.commands import load_model, summary
    from pyeffort.models.keys import EffortDial

    dial = EffortDial(args.effort, keys=not args.no_keys)
    chat = Chat(load_model(args), args.system)
    print(f"effort {dial.value:.2f}. {HELP}; {EFFORT_KEYS}.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
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
        _, st = chat.reply(line, dial, args)
        print(flush=True)
        print(summary(st), file=sys.stderr, flush=True)
