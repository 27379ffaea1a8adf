"""Subcommands ``generate``, ``convert``, ``info`` and ``bench`` of the ``pyeffort`` CLI."""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

from pyeffort.models.keys import MIN_EFFORT

EFFORT_KEYS = "keys + / - change the effort while it generates (on a terminal)"
SAMPLING = ("sampling (temperature > 0): --top-k, then --top-p, then --min-p cut the model's "
            "probabilities, then the temperature applies to what is left "
            "(the order of llama.cpp and mlx_lm)")  # fmt: skip
CONTEXT = ("the prompt plus --max-tokens must fit the model's context (max_seq_len): "
           "--max-tokens is shortened to fit, with a warning")  # fmt: skip


# ------------------------------------------------------------ option types (checked at parse)


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def effort_arg(text: str) -> float:
    v = _number(text)
    if not MIN_EFFORT <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [{MIN_EFFORT}, 1], got {text}")
    return v


def efforts_arg(text: str) -> list[float]:
    return [effort_arg(t) for t in text.split(",")]


def fraction_arg(text: str) -> float:
    v = _number(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return v


def unit_arg(text: str) -> float:
    v = _number(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return v


def temperature_arg(text: str) -> float:
    v = _number(text)
    if v < 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def count_arg(low: int):
    def count(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    count.__name__ = f"integer >= {low}"
    return count


def text_arg(text: str) -> str:
    """Text from the command line: undecodable bytes (surrogate escapes in sys.argv) refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="converted folder, GGUF file or HF folder "
                   "(default: SmolLM2-135M-Instruct, converted into $PYEFFORT_CACHE once)")  # fmt: skip
    p.add_argument("--load-fraction", type=fraction_arg, default=1.0,
                   help="map only this fraction of every matrix, (0, 1] (converted models)")  # fmt: skip
    p.add_argument("--threads", type=count_arg(1), default=None, help="CPU threads for the kernels")
    p.add_argument("--effort-head", action="store_true",
                   help="the LM head at effort too (default: dense)")  # fmt: skip
    p.add_argument("--tp", type=count_arg(1), default=1, metavar="N",
                   help="tensor-parallel over N ranks: torchrun --nproc-per-node N -m pyeffort "
                   "... --model DST --tp N, DST from pyeffort convert --tp N")  # fmt: skip
    add_device_arg(p)


DEVICES = ("auto", "cpu", "cuda", "metal")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: cuda when torch sees an NVIDIA GPU, else cpu")  # fmt: skip


def resolve_device(name: str) -> str:
    """--device -> "cpu", "cuda" or "metal"; BackendError for a device this machine cannot use."""
    import importlib.util

    from pyeffort.errors import BackendError

    if name == "metal":
        from pyeffort import metal

        metal.require()  # off macOS / without a Metal device: says why
        return "metal"
    if name == "cpu" or (name == "auto" and importlib.util.find_spec("torch") is None):
        return "cpu"
    try:
        import torch
    except ImportError as exc:
        raise BackendError(f"--device cuda needs torch with CUDA ({exc})") from None
    if torch.cuda.is_available():
        return "cuda"
    if name == "auto":
        return "cpu"
    raise BackendError("--device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--effort", type=effort_arg, default=1.0,
                   help=f"fraction of multiplications, [{MIN_EFFORT}, 1]")  # fmt: skip
    p.add_argument("--prefill-effort", type=effort_arg, default=1.0,
                   help=f"effort for the prompt, [{MIN_EFFORT}, 1]")  # fmt: skip
    p.add_argument("--max-tokens", type=count_arg(1), default=100, help=CONTEXT)
    p.add_argument("--temperature", type=temperature_arg, default=0.0, help=">= 0; 0: greedy")
    p.add_argument("--top-k", type=count_arg(0), default=0, help="the k most likely; 0: no cut")
    p.add_argument("--top-p", type=fraction_arg, default=1.0, help="(0, 1]; 1: no cut")
    p.add_argument("--min-p", type=unit_arg, default=0.0,
                   help="[0, 1]: tokens at least MIN_P x the top one's p; 0: no cut")  # fmt: skip
    p.add_argument("--seed", type=count_arg(0), default=None)
    p.add_argument("--no-keys", action="store_true", help="do not read +/- keys")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", type=text_arg, default=None,
                   help="the prompt; '-': read it from stdin")  # fmt: skip
    p.add_argument("-f", "--prompt-file", metavar="PATH", default=None,
                   help="the prompt from a UTF-8 file (a final newline dropped, as llama-cli)")  # fmt: skip
    p.add_argument("--raw", "--ignore-chat-template", action="store_true",
                   help="the prompt as is (default: in the model's chat template, if any)")  # fmt: skip
    p.add_argument("--system-prompt", type=text_arg, default=None, help="a system message")
    p.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens")
    p.add_argument("--json", action="store_true", help="print the text and its stats as JSON")


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text from a prompt",
                              epilog=f"{SAMPLING}; {EFFORT_KEYS}")  # fmt: skip
    add_prompt_args(g)
    add_model_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser("convert", help="convert a GGUF file or HF folder to pyeffort")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--values", choices=["f16", "q8"], default="f16",
                   help="bucket values: f16 (2.5 bytes per multiplication) or q8 (int8 with a "
                   "fp16 scale per 16 values, 1.625 bytes); default f16")  # fmt: skip
    c.add_argument("--tp", type=count_arg(1), default=1, metavar="N",
                   help="N tensor-parallel shards: DST/rank0 .. DST/rank{N-1}")  # fmt: skip
    c.set_defaults(func=cmd_convert)

    i = subparsers.add_parser("info", help="config, format, size and matrices of a model")
    i.add_argument("path", nargs="?", default=None, help="default: the default model")
    i.set_defaults(func=cmd_info)

    b = subparsers.add_parser("bench", help="decode tokens/s at several efforts")
    add_model_args(b)
    b.add_argument("--efforts", type=efforts_arg, default=[1.0, 0.5, 0.25],
                   help=f"comma-separated, each in [{MIN_EFFORT}, 1] (default: 1.0,0.5,0.25)")  # fmt: skip
    b.add_argument("--tokens", type=count_arg(1), default=64,
                   help="decoded tokens per effort and round")  # fmt: skip
    b.add_argument("--rounds", type=count_arg(1), default=3,
                   help="rounds over all efforts, each in a rotated order; medians are reported")  # fmt: skip
    b.add_argument("--prompt", type=text_arg, default="The history of the city began")
    b.add_argument("--json", action="store_true", help="print the rows as JSON")
    b.set_defaults(func=cmd_bench)


def load_model(args):
    """The model the options name (its kernels not yet prepared: see ``prepare``)."""
    import pyeffort
    from pyeffort import models

    if args.threads is not None:
        pyeffort.set_num_threads(args.threads)
    if args.tp > 1:
        return load_parallel(args)
    from pyeffort.models.tensor_parallel import refuse_shards

    refuse_shards(args.model)
    device = resolve_device(args.device)
    model = models.load(args.model, fraction=args.load_fraction, progress=args.progress)
    if args.effort_head:
        model.effort_head(True)
    if device == "cuda":
        from pyeffort.models.llama_torch import TorchModel

        return TorchModel(model, "cuda")  # a decoded token one CUDA graph (MoE: eager)
    if device == "metal":
        return matrices_to(model, "metal")
    return model


def load_parallel(args):
    """This rank's shard (``--tp N``): on CUDA the torch forward on GPU ``LOCAL_RANK``, its sums
    over nccl; on the CPU the numpy forward, over gloo. Rank 0 alone prints; all ranks sample
    alike (rank 0's seed) at the asked effort (no keys)."""
    import numpy as np

    from pyeffort.models import tensor_parallel as tp

    if args.device == "metal" or args.effort_head:
        drop = "--effort-head" if args.effort_head else "--device metal"
        raise ValueError(f"--tp runs on cpu or cuda with a dense LM head: drop {drop}")
    device = resolve_device(args.device)
    tp.quiet_unless_first(tp.world(args.tp), args)
    model = tp.load(args.model, args.tp, fraction=args.load_fraction, progress=args.progress,
                    device="cuda" if device == "cuda" else None)  # fmt: skip
    if getattr(args, "temperature", 0.0) > 0 and args.seed is None:
        args.seed = model.comm.broadcast(int(np.random.SeedSequence().entropy % 2**52))
    return model


def matrices_to(model, device: str):
    """The model with every effort matrix on ``device`` (Metal: unified memory, no copies);
    attention, norms and the LM head stay on the CPU; the prefill runs the device's kernels
    at 1.0 (no dense host copy)."""
    for lin in model.linears():
        lin.buckets = lin.buckets.to(device)
        lin.prefill_dense = False
    return model


def prepare(model, progress: bool = False) -> None:
    """Builds now, with a progress bar, what the first tokens would otherwise build: what the
    CPU kernels read for every matrix, and the dense copies the prefill multiplies by."""
    from tqdm import tqdm

    import pyeffort

    if getattr(model, "device", None) is not None:  # a TorchModel: its matrices are on the GPU
        return
    lins = [lin for lin in model.linears() if isinstance(lin.buckets, pyeffort.Buckets)]
    for lin in tqdm(lins, desc="preparing kernels", unit="matrix", disable=not progress,
                    leave=False):  # fmt: skip  (a device's matrices need nothing here)
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
    d = stats_dict(st)
    asked, real = (float("nan") if v is None else v for v in (d["effort"], d["realised_effort"]))
    return (
        f"[{st.generated} tokens; prefill {st.prompt_tokens} tokens in {st.prefill_s:.2f} s; "
        f"decode {st.decode_tps:.1f} tokens/s; effort asked {asked:.3f}, realised {real:.3f}]"
    )


def stats_dict(st) -> dict:
    """The stats of one generation (NaN, as with a single token, -> None: JSON has no NaN)."""
    d = {"prompt_tokens": st.prompt_tokens, "tokens": st.generated, "prefill_s": st.prefill_s,
         "decode_tokens_per_s": st.decode_tps,
         "effort": sum(st.efforts) / len(st.efforts) if st.efforts else None,
         "realised_effort": st.realised}  # fmt: skip
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


def sampling_kwargs(args) -> dict:
    """generate()'s sampling arguments from the options of add_sampling_args."""
    return {"prefill_effort": args.prefill_effort, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed}  # fmt: skip


def read_prompt(args) -> str:
    """The prompt: the argument, stdin ('-') or --prompt-file (one final newline dropped)."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give a prompt: as an argument, '-' (stdin) or --prompt-file PATH, "
                         "one of them")  # fmt: skip
    if args.prompt_file is not None:
        where = f"--prompt-file {args.prompt_file}"
        try:
            data = Path(args.prompt_file).read_bytes()
        except OSError as exc:
            raise OSError(f"{where}: {exc.strerror or exc}") from None
    elif args.prompt == "-":
        where, data = "the prompt on stdin", sys.stdin.buffer.read()
    else:
        return args.prompt
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not valid UTF-8 text") from None
    return text.removesuffix("\n")


def prompt_ids(args, tok) -> list[int]:
    """Token ids of the prompt: in the model's chat template unless --raw or the model has none."""
    if args.system_prompt is not None and (args.raw or not tok.chat_template):
        why = "--raw sends the prompt as is" if args.raw else "the model has no chat template"
        raise ValueError(f"--system-prompt needs the chat template: {why}")
    text = read_prompt(args)
    if args.raw or not tok.chat_template:
        return tok.encode(text)
    messages = [{"role": "user", "content": text}]
    if args.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": args.system_prompt})
    return tok.chat_prompt(messages)


def cmd_generate(args) -> int:
    from pyeffort.models.generate import Stats, fit_context, generate
    from pyeffort.models.keys import EffortDial

    dial = EffortDial(args.effort, keys=not args.no_keys and args.tp == 1)  # ranks agree
    model = load_model(args)
    tok = model.tokenizer
    ids = prompt_ids(args, tok)
    n = fit_context(model, len(ids), args.max_tokens)
    if n < args.max_tokens:
        warn(f"{len(ids)} prompt tokens + --max-tokens {args.max_tokens} exceed the model's "
             f"context of {model.args.max_seq_len} tokens: at most {n} tokens")  # fmt: skip
    prepare(model, progress=args.progress)
    stop = [] if args.ignore_eos else tok.eos_ids
    st, stream = Stats(), TextStream(tok, io.StringIO() if args.json else None)
    with dial:
        for t in generate(model, ids, max_tokens=n, effort=dial, stop=stop, stats=st,
                          **sampling_kwargs(args)):  # fmt: skip
            stream.add(t)
    if args.json:
        finish = "stop" if stream.ids and stream.ids[-1] in stop else "length"
        print(json.dumps({"text": stream.text, "finish_reason": finish, **stats_dict(st)}))
        return 0
    print(file=sys.stdout, flush=True)
    if not args.quiet:
        print(summary(st), file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from pyeffort.models.convert import convert
    from pyeffort.models.tensor_parallel import convert_tp

    kw = {"progress": args.progress, "overwrite": args.overwrite, "values": args.values}
    if args.tp > 1:
        dst = convert_tp(args.src, args.dst, args.tp, **kw)
    else:
        dst = convert(args.src, args.dst, **kw)
    print(f"wrote {dst} ({_size(dst) / 2**20:.1f} MiB, {args.values} values)")
    return 0


def cmd_info(args) -> int:
    from pyeffort.models.convert import is_converted, read_manifest, values_kind
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
    held = mults = 0
    for fname in m["files"]:
        lines, b, n = _file_info(path / fname)
        print("\n".join(lines))
        held, mults = held + b, mults + n
    per = f"{held / mults:.3f}" if mults else "-"
    print(f"values {values_kind(path, m)}: {per} bytes per multiplication at effort 1.0 "
          f"({held / 2**20:.1f} MiB of buckets)")  # fmt: skip
    return 0


def _file_info(path: Path) -> tuple[list[str], int, int]:
    """The lines ``info`` prints for one model file, its bucket bytes and multiplications."""
    from pyeffort import fileformat

    lines, held, mults = [], 0, 0
    with fileformat.Reader(path) as r:
        for key in sorted(k for k in r.metadata if k.endswith(".n_in")):
            p = key[: -len("n_in")]
            n_in, n_out = int(r.metadata[key]), int(r.metadata[p + "n_out"])
            kind = r.metadata.get(p + "values", "f16")
            b = sum(t.nbytes for name, t in r.tensors.items()
                    if name in (p + "values", p + "positions", p + "scales"))  # fmt: skip
            held, mults = held + b, mults + n_in * n_out
            lines.append(f"  {p[:-1]:24s} ({n_in}, {n_out}) buckets, {kind} values, "
                         f"{b / (n_in * n_out):.3f} bytes per multiplication")  # fmt: skip
        for name, t in r.tensors.items():
            if name.count(".") < 3:
                lines.append(f"  {name:24s} {tuple(t.shape)} {t.dtype}")
    return lines, held, mults


def cmd_bench(args) -> int:
    import pyeffort
    from pyeffort.models.generate import ContextError, fit_context

    model = load_model(args)
    ids = model.tokenizer.encode(args.prompt)
    if fit_context(model, len(ids), args.tokens + 1) <= args.tokens:
        raise ContextError(f"{len(ids)} prompt tokens + --tokens {args.tokens} exceed the "
                           f"model's context of {model.args.max_seq_len} tokens")  # fmt: skip
    prepare(model, progress=args.progress)
    rt = pyeffort.runtime_info()
    where = f"kernel {rt['kernel']}, {rt['threads']} threads"
    head = {"kernel": rt["kernel"], "threads": rt["threads"], "tokens": args.tokens,
            "rounds": args.rounds}  # fmt: skip
    if getattr(model, "device", None) is not None:
        import torch

        where = head["device"] = f"{torch.cuda.get_device_name(model.device)}, CUDA graphs"
    if getattr(model, "comm", None) is not None:  # --tp
        head["tp"] = model.comm.size
        where += f", {model.comm.size} tensor-parallel ranks over {model.comm.backend}"
    if not args.json:
        print(f"{where}, {args.tokens} tokens per effort, median of {args.rounds} rounds "
              "(efforts in a rotated order each round)")  # fmt: skip
        print(f"{'effort':>7} {'realised':>9} {'tokens/s':>9} {'ms/token':>9} {'range tok/s':>13}")
    rows = bench_rows(model, ids, args.efforts, args.tokens, args.rounds)
    if args.json:
        print(json.dumps({**head, "rows": rows}))
        return 0
    for r in rows:
        span = f"{r['min_tokens_per_s']:.1f}-{r['max_tokens_per_s']:.1f}"
        print(f"{r['effort']:7.2f} {r['realised_effort']:9.3f} {r['tokens_per_s']:9.1f} "
              f"{r['ms_per_token']:9.2f} {span:>13}")  # fmt: skip
    return 0


def bench_rows(model, ids, efforts, tokens: int, rounds: int) -> list[dict]:
    """Decode tokens/s at each effort: the median over ``rounds``, each effort once a round."""
    import statistics

    from pyeffort.models.generate import Stats, generate

    list(generate(model, ids, max_tokens=4, stop=[]))  # warm up (dense copies, caches)
    tps: dict[float, list[float]] = {e: [] for e in efforts}
    real: dict[float, float] = {}
    for r in range(rounds):  # a machine's slow drifts then hit every effort alike
        for e in efforts[r % len(efforts) :] + efforts[: r % len(efforts)]:
            st = Stats()
            list(generate(model, ids, max_tokens=tokens + 1, effort=e, stop=[], stats=st))
            tps[e].append(st.decode_tps)
            real[e] = st.realised
    rows = []
    for e in efforts:
        med = statistics.median(tps[e])
        rows.append({"effort": e, "realised_effort": real[e], "tokens_per_s": med,
                     "ms_per_token": 1e3 / med, "min_tokens_per_s": min(tps[e]),
                     "max_tokens_per_s": max(tps[e])})  # fmt: skip
    return rows


def warn(msg: str) -> None:
    print(f"pyeffort: warning: {msg}", file=sys.stderr)


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
