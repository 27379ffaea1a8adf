"""Tensor-parallel decoding at effort over torch.distributed (gloo on CPUs, nccl with CUDA).

Megatron-style: rank r of N holds the heads ``[r*H/N, (r+1)*H/N)`` of q and of k/v (their
columns of wq/wk/wv and biases, their rows of wo) and the columns ``[r*F/N, (r+1)*F/N)`` of
gate/up with those rows of down (F = hidden_dim). Dense weights are sharded *before* bucketing,
so each shard is a normal converted model of a narrower config (``shard_args``: n_heads/N,
n_kv_heads/N, hidden_dim/N, same head_dim) that maps only its own bytes, partial loading
included. A rank runs its shard's layers locally (norms, RoPE, attention over its heads, its KV
cache), selecting inside its own matrices at the model's effort; the outputs of wo and down
are partial sums, all-reduced (2 per layer). Embedding, norms and LM head are replicated.

The forward is the numpy Model's on the CPU (its wo and down ``ReducedLinear``s, sums over gloo)
or the torch one (llama_torch.TorchModel, ``reduce=Comm.reduce``: each block's attention and
feed-forward outputs summed in place in the activations' dtype): on the rank's GPU over nccl,
each decoded token one CUDA graph holding its collectives, or on the CPU over gloo.

    pyeffort convert SRC DST --tp 2
    torchrun --nproc-per-node 2 -m pyeffort generate "Hello" --model DST --tp 2 [--device cuda]
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np

from pyeffort import buckets as bk
from pyeffort import fileformat
from pyeffort.errors import BackendError, FormatError
from pyeffort.models.args import ConfigError, ModelArgs
from pyeffort.models.effort_linear import EffortLinear

TIMEOUT_ENV = "PYEFFORT_TP_TIMEOUT"  # seconds a collective waits for the other ranks
TIMEOUT_S = 300.0
GROUP = 16  # columns of a bucket group: a shard of columns holds whole groups


class ParallelError(BackendError):
    """A tensor-parallel collective failed: another rank stopped, or did not answer in time."""


# ------------------------------------------------------------------------ sharding


def shard_args(args: ModelArgs, n: int) -> ModelArgs:
    """The config of one of ``n`` shards; ConfigError when ``n`` does not split the heads, the
    kv heads, or the feed-forward into whole groups of 16 columns."""
    if n < 1:
        raise ConfigError(f"--tp must be at least 1, got {n}")
    if args.n_experts:
        raise ConfigError("tensor parallelism does not split a mixture of experts yet")
    for name, count in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
        if count % n:
            raise ConfigError(
                f"--tp {n} does not divide {name}={count}: each rank owns whole heads"
            )
    kv_cols, ffn_cols = args.n_kv_heads // n * args.head_dim, args.hidden_dim / n
    if kv_cols % GROUP or ffn_cols % GROUP:
        raise ConfigError(f"--tp {n}: a shard's columns (k/v {kv_cols}, feed-forward "
                          f"{ffn_cols:g}) must be whole groups of {GROUP}")  # fmt: skip
    return replace(args, n_heads=args.n_heads // n, n_kv_heads=args.n_kv_heads // n,
                   hidden_dim=args.hidden_dim // n, head_dim=args.head_dim)  # fmt: skip


def shard_slice(args: ModelArgs, n: int, rank: int, name: str) -> tuple[int, slice] | None:
    """(axis, slice) of tensor ``name`` that rank ``rank`` of ``n`` holds; None: all of it."""
    hd, kind = args.head_dim, name.rsplit(".", 1)[-1]
    per = {
        "q": args.n_heads // n * hd,
        "kv": args.n_kv_heads // n * hd,
        "ffn": args.hidden_dim // n,
    }
    part = {"wq": (1, "q"), "bq": (0, "q"), "wk": (1, "kv"), "wv": (1, "kv"), "bk": (0, "kv"),
            "bv": (0, "kv"), "wo": (0, "q"), "w1": (1, "ffn"), "w3": (1, "ffn"),
            "w2": (0, "ffn")}.get(kind)  # fmt: skip
    if part is None or not name.startswith("layers."):
        return None
    axis, size = part[0], per[part[1]]
    return axis, slice(rank * size, (rank + 1) * size)


class ShardSource:
    """A weight source (pyeffort.models.loaders) seen as rank ``rank`` of ``n``."""

    def __init__(self, src, n: int, rank: int):
        self.src, self.n, self.rank = src, n, rank
        self.args = shard_args(src.args, n)
        self.tokenizer = src.tokenizer

    def get(self, name: str) -> np.ndarray:
        a = self.src.get(name)
        cut = shard_slice(self.src.args, self.n, self.rank, name)
        if cut is None:
            return a
        axis, s = cut
        return np.ascontiguousarray(a[s] if axis == 0 else a[:, s])

    def out_weights(self, weights: dict) -> dict:
        """Per-output weights of the shard's matrices: columns split like the matrix."""
        out = {}
        for name, a in weights.items():
            cut = shard_slice(self.src.args, self.n, self.rank, name)
            out[name] = a if cut is None or cut[0] == 0 else np.asarray(a)[cut[1]]
        return out


def convert_tp(
    src_path, dst, n: int, *, progress=True, overwrite=False, out_weights="auto", values="f16"
) -> Path:
    """``pyeffort convert --tp n``: ``dst/rank{r}`` for r < n, each a normal converted folder
    of its shard (manifest key ``tp``), the whole written beside ``dst`` and renamed (the
    arguments as ``pyeffort.models.convert.convert``'s)."""
    from pyeffort.models.convert import _replace_dir, out_weights_for, write_model
    from pyeffort.models.loaders import open_source

    values, dst = bk.check_values(values), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (use overwrite)")
    src = open_source(src_path)
    shard_args(src.args, n)  # refuse before writing anything
    weights = out_weights_for(src_path, src.args, out_weights)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fileformat.remove_stale_temporaries(dst.parent)
    tmp = fileformat.temp_path(dst)
    os.mkdir(tmp, 0o777)
    try:
        for r in range(n):
            shard = ShardSource(src, n, r)
            tp = {"rank": r, "size": n, "n_heads": src.args.n_heads,
                  "n_kv_heads": src.args.n_kv_heads, "hidden_dim": src.args.hidden_dim}  # fmt: skip
            write_model(shard, Path(src_path).name, tmp / f"rank{r}",
                        shard.out_weights(weights), values, progress, tp)  # fmt: skip
        fileformat.fsync_dir(tmp)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ------------------------------------------------------------------------ the process group


def timeout_from_env() -> float:
    """Seconds a collective waits: $PYEFFORT_TP_TIMEOUT (default 300), checked."""
    text = os.environ.get(TIMEOUT_ENV, str(TIMEOUT_S))
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < 1e7:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: give a number of seconds > 0")
    return v


class Comm:
    """The tensor-parallel group of this process: sums torch tensors (``reduce``) or numpy
    arrays (``all_reduce``) over the ranks. ``cuda``: over nccl, on this rank's GPU
    (``LOCAL_RANK``, made torch's current device); else over gloo, on the CPU."""

    def __init__(self, n: int, timeout_s: float | None = None, cuda: bool = False):
        import torch
        import torch.distributed as dist

        self.dist, self.torch = dist, torch
        self.rank, self.size = int(os.environ["RANK"]), n
        self.timeout_s = timeout_s or timeout_from_env()
        self.device = rank_gpu(self.rank) if cuda else None  # nccl reduces GPU tensors
        backend = "gloo" if self.device is None else "nccl"
        try:
            dist.init_process_group(backend, rank=self.rank, world_size=n,
                                    timeout=timedelta(seconds=self.timeout_s))  # fmt: skip
        except (RuntimeError, ValueError) as exc:
            raise self._error("could not form the group", exc) from None
        self.backend = backend
        self.failed = False  # a collective failed: a peer is gone
        atexit.register(self.close)

    def close(self) -> None:
        """At exit: the group shut down after a clean run (its threads joined: left to the
        interpreter's teardown they can abort it); after a failed collective the process
        ends at once instead, its error already printed (a shutdown could wait on the dead
        peer)."""
        if self.failed:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    def reduce(self, t):
        """t (a contiguous torch tensor on the group's device: the rank's GPU with nccl, the
        CPU with gloo) summed over the ranks, in place, in its own dtype; returns t."""
        try:
            self.dist.all_reduce(t)
        except RuntimeError as exc:
            raise self._error("a collective failed", exc) from None
        return t

    def all_reduce(self, y: np.ndarray) -> np.ndarray:
        """y (any shape, float32 or float64, C-contiguous) summed over the ranks, in place."""
        t = self.torch.from_numpy(y)
        if self.device is None:
            self.reduce(t)
        else:
            t.copy_(self.reduce(t.to(self.device)).cpu())
        return y

    def broadcast(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        return int(self.all_reduce(np.array([value if self.rank == 0 else 0], np.float64))[0])

    def read_line(self, prompt: str) -> str:
        """``input(prompt)`` on rank 0, the same line on every rank (EOFError on all at its end)."""
        line = None
        if self.rank == 0:
            try:
                line = input(prompt)
            except EOFError:
                pass
        box = [line]
        try:
            self.dist.broadcast_object_list(box, src=0)
        except RuntimeError as exc:
            raise self._error("a collective failed", exc) from None
        if box[0] is None:
            raise EOFError
        return box[0]

    def _error(self, what: str, exc: BaseException) -> ParallelError:
        self.failed = True
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return ParallelError(f"tensor-parallel rank {self.rank} of {self.size}: {what}: another "
                             f"rank stopped or did not answer within {self.timeout_s:g} s "
                             f"({TIMEOUT_ENV}) ({first})")  # fmt: skip


class ReducedLinear(EffortLinear):
    """An EffortLinear holding a shard of rows (wo, down): its partial products are summed
    over the ranks (``comm``)."""

    comm: Comm

    def __call__(self, x: np.ndarray, effort: float) -> np.ndarray:
        y = np.ascontiguousarray(super().__call__(x, effort), dtype=np.float32)
        return self.comm.all_reduce(y)


class ParallelModel:
    """A rank's shard as the whole model: the same forward, generate() and linears();
    ``realised_effort()`` is summed over the ranks (a collective: every rank calls it, as
    generate() does once per token). ``model``: the shard's numpy Model (pyeffort.models.llama:
    its wo and down become ReducedLinears) or a TorchModel built with ``reduce=comm.reduce``."""

    def __init__(self, model, comm: Comm):
        self.model, self.comm = model, comm
        if not hasattr(model, "net"):  # the numpy forward
            for b in model.layers:
                for lin in (b.attn.wo, b.ffn.w2):
                    lin.__class__, lin.comm = ReducedLinear, comm

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, tokens, start_pos: int = 0, effort: float = 1.0, *, last_only=False):
        return self.model.forward(tokens, start_pos, effort, last_only=last_only)

    __call__ = forward

    def counts(self) -> tuple[int, int]:
        """This rank's (multiplications done, those of a dense pass) since reset."""
        if hasattr(self.model, "net"):  # a TorchModel: counted where its matrices are
            return self.model.mm.counts()
        lins = list(self.model.linears())
        return sum(lin.mults for lin in lins), sum(lin.total for lin in lins)

    def realised_effort(self) -> float:
        done = self.comm.all_reduce(np.array(self.counts(), np.float64))
        return done[0] / done[1] if done[1] else float("nan")


def rank_folder(path, n: int, rank: int) -> Path:
    """``path/rank{rank}``, checked: a converted shard of rank ``rank`` of ``n``."""
    from pyeffort.models.convert import is_converted, read_manifest

    if path is None:
        raise ValueError(f"--tp {n} needs --model: a folder written by pyeffort convert --tp {n}")
    folder = Path(path) / f"rank{rank}"
    if not is_converted(folder):
        raise FormatError(f"{path}: no converted shard {folder.name}: run "
                          f"pyeffort convert SRC {path} --tp {n}")  # fmt: skip
    tp = read_manifest(folder).get("tp")
    if not isinstance(tp, dict) or tp.get("rank") != rank or tp.get("size") != n:
        raise FormatError(f"{folder}: not shard {rank} of a --tp {n} conversion (tp={tp!r})")
    return folder


def world(n: int) -> int:
    """This process's rank, checked against torchrun's environment and ``--tp n``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--tp {n} runs one process per rank: torchrun --nproc-per-node {n} "
                         "-m pyeffort ... --tp {n}".replace("{n}", str(n)))  # fmt: skip
    size = int(os.environ["WORLD_SIZE"])
    if size != n:
        raise ValueError(f"--tp {n} but torchrun started {size} processes (--nproc-per-node)")
    return int(os.environ["RANK"])


def rank_gpu(rank: int):
    """This rank's GPU, ``cuda:LOCAL_RANK``, made torch's current device; BackendError when
    torch sees no such GPU."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", rank))
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local >= seen:
        raise BackendError(f"tensor-parallel rank {rank} (LOCAL_RANK {local}) has no GPU: torch "
                           f"sees {seen} (one GPU per rank: --nproc-per-node <= GPUs)")  # fmt: skip
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    return dev


def load(
    path,
    n: int,
    *,
    fraction: float = 1.0,
    progress: bool = False,
    device: str | None = None,
    **torch_kw,
) -> ParallelModel:
    """This rank's shard of the converted folder ``path`` (``convert --tp n``), in its group.
    ``device``: None, the numpy forward on the CPU over gloo; "cpu", the torch forward
    (llama_torch.TorchModel on HostMatmuls) over gloo; "cuda", the torch forward on the rank's
    GPU (CudaMatmuls, a decoded token one CUDA graph) over nccl. ``torch_kw``: TorchModel's
    (dtype, graphs, capacity)."""
    from pyeffort import models

    if device not in (None, "cpu", "cuda"):
        raise BackendError(f"--tp runs on cpu or cuda, not {device}")
    rank = world(n)
    folder = rank_folder(path, n, rank)  # before joining: a missing shard fails at once
    model = models.load(folder, fraction=fraction, progress=progress and rank == 0)
    comm = Comm(n, cuda=device == "cuda")
    if device is not None:
        from pyeffort.models.llama_torch import TorchModel

        model = TorchModel(model, comm.device or "cpu", reduce=comm.reduce, **torch_kw)
    return ParallelModel(model, comm)


def refuse_shards(path) -> None:
    """ValueError when ``path`` holds tensor-parallel shards (run without --tp)."""
    if path is not None and (Path(path) / "rank0").is_dir():
        n = len(list(Path(path).glob("rank*")))
        raise ValueError(f"{path} holds tensor-parallel shards: run torchrun --nproc-per-node "
                         f"{n} -m pyeffort ... --tp {n}")  # fmt: skip


def quiet_unless_first(rank: int, args) -> None:
    """Ranks other than 0 print nothing on stdout, and no progress, notes or stats."""
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        args.quiet, args.progress = True, False
