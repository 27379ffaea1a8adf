"""Subcommands ``generate``, ``convert``, ``info`` and ``bench`` of the ``pyeffort`` CLI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EFFORT_KEYS = "keys + / - change the effort while it generates (on a terminal)"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="converted folder, GGUF file or HF folder "
                   "(default: SmolLM2-135M-Instruct, converted into $PYEFFORT_CACHE once)")  # fmt: skip
    p.add_argument("--load-fraction", type=float, default=1.0,
                   help="map only this fraction of every matrix (converted models)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the kernels")
    p.add_argument("--effort-head", action="store_true",
                   help="the LM head at effort too (default: dense)")  # fmt: skip


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--effort", type=float, default=1.0, help="fraction of multiplications, (0, 1]")
    p.add_argument("--prefill-effort", type=float, default=1.0, help="effort for the prompt")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-keys", action="store_true", help="do not read +/- keys")


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text from a prompt", epilog=EFFORT_KEYS)
    g.add_argument("prompt")
    add_model_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser("convert", help="convert a GGUF file or HF folder to pyeffort")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_convert)

    i = subparsers.add_parser("info", help="config, format, size and matrices of a model")
    i.add_argument("path", nargs="?", default=None, help="default: the default model")
    i.set_defaults(func=cmd_info)

    b = subparsers.add_parser("bench", help="decode tokens/s at several efforts")
    add_model_args(b)
    b.add_argument("--efforts", default="1.0,0.5,0.25")
    b.add_argument("--tokens", type=int, default=64, help="decoded tokens per effort and round")
    b.add_argument("--rounds", type=int, default=3,
                   help="rounds over all efforts, each in a rotated order; medians are reported")  # fmt: skip
    b.add_argument("--prompt", default="The history of the city began")
    b.set_defaults(func=cmd_bench)


def load_model(args):
    import pyeffort
    from pyeffort import models

    if args.threads is not None:
        pyeffort.set_num_threads(args.threads)
    model = models.load(args.model, fraction=args.load_fraction, progress=True)
    if args.effort_head:
        model.effort_head(True)
    prepare(model, progress=True)
    return model


def prepare(model, progress: bool = False) -> None:
    """Builds now, with a progress bar, what the first tokens would otherwise build: what the
    CPU kernels read for every matrix, and the dense copies the prefill multiplies by."""
    from tqdm import tqdm

    import pyeffort

    for lin in tqdm(list(model.linears()), desc="preparing kernels", unit="matrix",
                    disable=not progress, leave=False):  # fmt: skip
        pyeffort.prepare(lin.buckets)
        if lin.prefill_dense:
            lin.dense()


class TextStream:
    """Prints the text of a growing token list as it comes (whole characters only)."""

    def __init__(self, tokenizer, out=None):
        self.tok, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.shown = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # an incomplete UTF-8 character: wait for the next token
        self.out.write(text[self.shown :])
        self.out.flush()
        self.shown = len(text)

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids)


def summary(st) -> str:
    asked = sum(st.efforts) / len(st.efforts) if st.efforts else float("nan")
    return (
        f"[{st.generated} tokens; prefill {st.prompt_tokens} tokens in {st.prefill_s:.2f} s; "
        f"decode {st.decode_tps:.1f} tokens/s; effort asked {asked:.3f}, "
        f"realised {st.realised:.3f}]"
    )


def cmd_generate(args) -> int:
    from pyeffort.models.generate import Stats, generate
    from pyeffort.models.keys import EffortDial

    dial = EffortDial(args.effort, keys=not args.no_keys)
    model = load_model(args)
    tok = model.tokenizer
    st, stream = Stats(), TextStream(tok)
    ids = tok.encode(args.prompt)
    with dial:
        for t in generate(model, ids, max_tokens=args.max_tokens, effort=dial,
                          prefill_effort=args.prefill_effort, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, stats=st):  # fmt: skip
            stream.add(t)
    print(file=sys.stdout, flush=True)
    print(summary(st), file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from pyeffort.models.convert import convert

    dst = convert(args.src, args.dst, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote {dst} ({_size(dst) / 2**20:.1f} MiB)")
    return 0


def cmd_info(args) -> int:
    from pyeffort import fileformat
    from pyeffort.models.convert import is_converted, read_manifest
    from pyeffort.models.default import default_model_path

    path = Path(args.path) if args.path else default_model_path()
    if not is_converted(path):
        from pyeffort.models.loaders import open_source

        src = open_source(path)
        print(f"{path}: a source model (not converted), {_size(path) / 2**20:.1f} MiB")
        print(json.dumps(src.args.__dict__, indent=1))
        return 0
    m = read_manifest(path)
    print(f"{path}: pyeffort model, format version {m['version']}, "
          f"{_size(path) / 2**20:.1f} MiB, converted from {m.get('source')}")  # fmt: skip
    print("config:", json.dumps(m["config"], indent=1))
    for fname in m["files"]:
        r = fileformat.Reader(path / fname)
        for key in sorted(k for k in r.metadata if k.endswith(".n_in")):
            p = key[: -len("n_in")]
            print(f"  {p[:-1]:24s} ({r.metadata[key]}, {r.metadata[p + 'n_out']}) buckets")
        for name, t in r.tensors.items():
            if name.count(".") < 3:
                print(f"  {name:24s} {tuple(t.shape)} {t.dtype}")
    return 0


def cmd_bench(args) -> int:
    import statistics

    import pyeffort
    from pyeffort.models.generate import Stats, generate

    if args.rounds < 1 or args.tokens < 1:
        raise ValueError("--rounds and --tokens must be at least 1")
    model = load_model(args)
    ids = model.tokenizer.encode(args.prompt)
    efforts = [float(e) for e in args.efforts.split(",")]
    rt = pyeffort.runtime_info()
    print(f"kernel {rt['kernel']}, {rt['threads']} threads, {args.tokens} tokens per effort, "
          f"median of {args.rounds} rounds (efforts in a rotated order each round)")  # fmt: skip
    print(f"{'effort':>7} {'realised':>9} {'tokens/s':>9} {'ms/token':>9} {'range tok/s':>13}")
    list(generate(model, ids, max_tokens=4, stop=[]))  # warm up (dense copies, caches)
    tps: dict[float, list[float]] = {e: [] for e in efforts}
    real: dict[float, float] = {}
    for r in range(args.rounds):  # a machine's slow drifts then hit every effort alike
        for e in efforts[r % len(efforts) :] + efforts[: r % len(efforts)]:
            st = Stats()
            list(generate(model, ids, max_tokens=args.tokens + 1, effort=e, stop=[], stats=st))
            tps[e].append(st.decode_tps)
            real[e] = st.realised
    for e in efforts:
        med = statistics.median(tps[e])
        span = f"{min(tps[e]):.1f}-{max(tps[e]):.1f}"
        print(f"{e:7.2f} {real[e]:9.3f} {med:9.1f} {1e3 / med:9.2f} {span:>13}")
    return 0


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
