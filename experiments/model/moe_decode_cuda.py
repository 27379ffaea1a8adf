"""Decode tokens/s of a Mixtral-8x7B-shaped random model on the GPU (issue 23, item 5): a few
layers at the full layer shapes (dim 4096, 8 experts of hidden 14336, top-2, GQA 32/8, vocabulary
32000), batch 1, from a filled KV cache. The weights are generated on the GPU (fp16, std ~
1/sqrt(n_in) with log-normal per-input scales: bench/test_cuda_decode.py's trained-like init)
and the buckets built there (``pyeffort.cuda.build_buckets``, ``--values`` f16 or q8), with no
host copy. The effort model (CudaMatmuls) at each effort runs against the dense path of the same
weights: the same torch module with every matrix on cuBLAS fp16 (test_cuda_decode's
DenseMatmuls). Both route alike (the float32 router, top-2, read back per layer) and multiply
only the routed experts; a mixture of experts decodes eagerly (no CUDA graphs). The kinds are
interleaved (each round in a rotated order); medians are reported.

One JSON line (and ``--out``): the card, the shape, per kind tokens/s, the speed-up over dense,
the realised effort (the model's count: the routed experts' and the attention's multiplications),
the weight bytes read per token (CudaBuckets' count of the dispatched rows, as
``MatmulInfo.bytes_read``; dense: 2 per weight of the matrices multiplied, attention and routed
experts; the router and the LM head, alike on both paths, left out), the GB/s those bytes make,
and how often a (token, layer) routed the dense path's experts.

    python experiments/model/moe_decode_cuda.py --out moe_f16.json             # 2 layers, GPU
    python experiments/model/moe_decode_cuda.py --values q8 --out moe_q8.json
    python experiments/model/moe_decode_cuda.py --tiny   # CPU: the plumbing at a tiny shape

A layer holds 1.45 G weights: 2.9 GB dense fp16 plus 3.6 GB of f16 buckets (q8: 2.2 GB), so the
default 2 layers hold 13 GB (q8: 10 GB) of weights, plus about 1 GB of embeddings and heads and a
few GB of one matrix's build (``gpu_peak_gib`` in the JSON); an 80 GB card takes about 11 layers
(q8: 14). On the CPU (``--tiny``, or no GPU) the effort matrices run through
pyeffort.matmul (HostMatmuls) and the dense path through torch float32.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
from test_cuda_decode import QKV_CT, DenseMatmuls, ShapeOnly
from test_moe_decode_speed import bytes_read
from tp_decode import build, card, decode_args, timed, write

import pyeffort
from pyeffort.models import Model, config
from pyeffort.models import llama_torch as lt
from pyeffort.models.args import tensor_shape
from pyeffort.models.llama_torch import CudaMatmuls, HostMatmuls
from pyeffort.models.loaders import matrix_names, plain_names

TINY = {"dim": 256, "n_heads": 8, "n_kv_heads": 4, "head_dim": 32, "hidden_dim": 512,
        "vocab_size": 512, "n_layers": 2}  # fmt: skip
BUCKET_BYTES = {"f16": 2.5, "q8": 1.53}  # per weight, as reference.row_bytes (q8 with scales)


def model_args(a):
    return replace(config("Mixtral-8x7B-v0.1"), **(TINY if a.tiny else {"n_layers": a.layers}))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the weights


def random_weights(args, gen, device) -> list[torch.Tensor]:
    """fp16 (n_out, n_in) weights in Model.linears() order (matrix_names), trained-like scales
    (test_cuda_decode.random_linears' init, for any layer layout)."""
    out = []
    for name in matrix_names(args):
        n_in, n_out = tensor_shape(args, name)
        chan = torch.exp(0.5 * torch.randn(n_in, generator=gen, device=device))
        w = torch.randn((n_out, n_in), generator=gen, device=device) * (chan / n_in**0.5)
        out.append(w.half())
    return out


def plain_weights(args, seed: int = 0) -> dict:
    """Embedding N(0, 1) and LM head N(0, 1/dim) fp16, routers (dim, n_experts) N(0, 1/dim)
    and unit norms float32."""
    rng = np.random.default_rng(seed)
    w = {}
    for n in plain_names(args):
        shp = tensor_shape(args, n)
        if n == "embed":
            w[n] = rng.standard_normal(shp, np.float32).astype(np.float16)
        elif n == "lm_head" or n.endswith(".router"):  # (dim, vocab or n_experts)
            w[n] = rng.standard_normal(shp, np.float32) / shp[0] ** 0.5
            w[n] = w[n].astype(np.float16 if n == "lm_head" else np.float32)
        else:
            w[n] = np.ones(shp, np.float32)
    return w


def host_model(args, plain: dict, mats) -> Model:
    """The numpy Model over ``mats`` (CudaBuckets, host Buckets or ShapeOnly) in matrix_names
    order: what Transformer reads its shapes, norms, routers, embedding and head from."""
    return Model(args, {**plain, **dict(zip(matrix_names(args), mats, strict=True))})


class CountedDense(DenseMatmuls):
    """DenseMatmuls that also takes the MoE's ``routed`` call and counts the weight bytes of the
    matrices it multiplies (2 per weight)."""

    def __init__(self, weights, head):
        super().__init__(weights, head)
        self.sizes = [2 * w.numel() for w in weights]
        self.nbytes = 0

    def group(self, idx, x):
        self.nbytes += sum(self.sizes[i] for i in idx)
        return super().group(idx, x)

    def routed(self, mults: int) -> None:
        pass


def effort_matmuls(args, plain, ws, values: str, device):
    """The effort model's matrices built from ``ws``: CudaBuckets on the GPU (q/k/v in one
    column tile, as test_cuda_decode), host Buckets on the CPU."""
    if device.type == "cuda":
        from pyeffort import cuda

        mats = []
        for name, w in zip(matrix_names(args), ws, strict=True):
            qkv = name.rsplit(".", 1)[-1] in ("wq", "wk", "wv")
            mats.append(cuda.build_buckets(w.t(), values=values, ct=QKV_CT if qkv else None))
        model = host_model(args, plain, mats)
        return model, CudaMatmuls(model, device, torch.float16)
    mats = [pyeffort.build_buckets(w.t().numpy(), values=values) for w in ws]
    model = host_model(args, plain, mats)
    return model, HostMatmuls(model)


# ---------------------------------------------------------------- one untimed pass


def weight_bytes(net, run) -> int:
    """The matrices' weight bytes read by ``run()``: counted by the dense path, read from the
    CudaBuckets' row and record sums, or spied on pyeffort.matmul on the host."""
    mm = net.mm
    if isinstance(mm, CountedDense):
        mm.nbytes = 0
        run()
        return mm.nbytes
    if isinstance(mm, CudaMatmuls):
        for b in mm.mats:
            b._state[6:8].zero_()  # pe_cuda_state.info_rows, info_records
        run()
        sums = torch.stack([b._state[6:8] for b in mm.mats]).tolist()
        return sum(b.bytes_read(r, rec) for b, (r, rec) in zip(mm.mats, sums, strict=True))
    return bytes_read(mm.model, run, False)


def counted(net, step, effort: float, a) -> tuple[float, list]:
    """(weight bytes per token, the experts each (token, layer) was routed to) over a.steps
    tokens decoded as ``timed`` decodes them (token 7 + i at position a.ctx + i)."""
    net.mm.set_effort(effort)
    chosen, route = [], lt.route

    def spy(logits, k):
        idx, wts = route(logits, k)
        chosen.append(frozenset(idx[0].tolist()))
        return idx, wts

    def run():
        for i in range(a.steps):
            step(7 + i, a.ctx + i)

    lt.route = spy  # MoE.forward looks it up per call
    try:
        nbytes = weight_bytes(net, run)
    finally:
        lt.route = route
    return nbytes / a.steps, chosen


# ---------------------------------------------------------------- the run


def setup(a, args, dev):
    """{"dense": (net, step), "effort": (net, step)}, both with the same filled KV cache."""
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    ws = random_weights(args, torch.Generator(device=dev).manual_seed(0), dev)
    plain = plain_weights(args)
    one = SimpleNamespace(device=dev, reduce=lambda y: y)  # tp_decode.build's comm: one process
    head = torch.from_numpy(np.ascontiguousarray(plain["lm_head"].T)).to(dev, dtype)
    dense = CountedDense([w.to(dtype) for w in ws], head)
    model = host_model(args, plain, [ShapeOnly(w) for w in ws])
    nets = {"dense": build(model, dense, a, one, dtype, torch.Generator(dev).manual_seed(1))}
    log(f"dense weights {sum(dense.sizes) / 1e9:.2f} GB ({time.perf_counter() - t0:.1f} s)")
    model, mm = effort_matmuls(args, plain, ws, a.values, dev)
    nets["effort"] = build(model, mm, a, one, dtype, torch.Generator(dev).manual_seed(1))
    a.bucket_gb = sum(lin.buckets.nbytes for lin in model.linears()) / 1e9
    a.build_s = time.perf_counter() - t0
    log(f"{a.values} buckets {a.bucket_gb:.2f} GB (built by {a.build_s:.1f} s)")
    return nets


def run(a) -> dict:
    on_gpu = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    dev = torch.device("cuda" if on_gpu else "cpu")
    if a.threads:
        pyeffort.set_num_threads(a.threads)
        torch.set_num_threads(a.threads)
    args = model_args(a)
    per_layer = sum(np.prod(tensor_shape(args, n)) for n in matrix_names(args)) / args.n_layers
    need = args.n_layers * per_layer * (2 + BUCKET_BYTES[a.values])  # dense copy + buckets
    log(f"{args.n_layers} layers of {per_layer / 1e6:.1f} M weights: about {need / 1e9:.2f} GB "
        f"of weights on {dev}")  # fmt: skip
    nets = setup(a, args, dev)
    kinds = ["dense"] + [f"effort_{e}" for e in a.efforts]
    net_of = lambda k: nets["dense" if k == "dense" else "effort"]
    eff_of = lambda k: 1.0 if k == "dense" else float(k.split("_")[1])
    nbytes, chosen = {}, {}
    for k in kinds:  # a warm-up too
        nbytes[k], chosen[k] = counted(*net_of(k), eff_of(k), a)
    tps: dict[str, list[float]] = {k: [] for k in kinds}
    real = {}
    for r in range(a.rounds):
        for k in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
            speed, (done, total) = timed(*net_of(k), eff_of(k), a)
            tps[k].append(speed)
            real[k] = round(done / total, 4) if k != "dense" and total else None
        log(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in tps.items()))
    return report(a, args, dev, tps, real, nbytes, chosen)


def report(a, args, dev, tps, real, nbytes, chosen) -> dict:
    """The JSON: medians over the rounds, speed-ups, bytes, routing agreement, the run's size."""
    kinds, on_gpu = list(tps), dev.type == "cuda"
    med = {k: statistics.median(v) for k, v in tps.items()}
    same = {k: round(float(np.mean([x == y for x, y in zip(chosen[k], chosen["dense"],
                                                             strict=True)])), 3)
            for k in kinds[1:]}  # fmt: skip
    return {
        "card": card(dev), "values": a.values, "dtype": "float16" if on_gpu else "float32",
        "cuda_graphs": False,
        "shape": {k: getattr(args, k) for k in ("n_layers", "dim", "hidden_dim", "n_heads",
                  "n_kv_heads", "n_experts", "n_experts_per_tok", "vocab_size")},
        "ctx": a.ctx, "steps": a.steps, "rounds": a.rounds,
        "tokens_per_s": {k: round(v, 2) for k, v in med.items()},
        "speedup_over_dense": {k: round(med[k] / med["dense"], 3) for k in kinds[1:]},
        "realised_effort": {k: real[k] for k in kinds[1:]},
        "weight_mb_per_token": {k: round(v / 1e6, 2) for k, v in nbytes.items()},
        "weight_gb_per_s": {k: round(nbytes[k] * med[k] / 1e9, 1) for k in kinds},
        "routing_same_as_dense": same,
        "tokens_per_s_rounds": {k: [round(x, 2) for x in v] for k, v in tps.items()},
        "build_s": round(a.build_s, 1), "bucket_gb": round(a.bucket_gb, 2),
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if on_gpu else None,
    }  # fmt: skip


def main() -> None:
    ap = decode_args(__doc__, 2, "Mixtral-8x7B layers (it has 32)", TINY, 5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0: default")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    for name in ("layers", "ctx", "steps", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if not all(0 < e <= 1 for e in a.efforts):
        ap.error("--efforts must lie in (0, 1]")
    if a.tiny:
        a.ctx, a.steps = min(a.ctx, 64), min(a.steps, 8)
    a.eager = True  # tp_decode.build: a mixture of experts is never captured
    res = run(a)
    print(json.dumps(res), flush=True)
    if a.out:
        write(a.out, res)


if __name__ == "__main__":
    main()
