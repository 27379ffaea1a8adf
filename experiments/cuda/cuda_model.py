"""Whole-model decoding on the GPU: a Mistral-7B-shaped model (random weights of realistic
scale), batch 1, KV cache of 1k tokens, each step one CUDA graph. The effort model runs all
seven matrices of every layer through pyeffort (effort is a device tensor: one graph serves
every effort); the dense model runs the same fp16 weights through torch (cuBLAS).

    python experiments/cuda/cuda_model.py [--layers 32] [--steps 64] [--json out.json] [--libs A.so,B.so]

--libs times several kernel builds in this one process, two interleaved rounds (dense again
before each), so that builds compare without the drift between processes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyeffort import cuda


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    hidden: int = 14336
    vocab: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


MATS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


def shapes(a: ModelArgs) -> dict[str, tuple[int, int]]:
    """(n_in, n_out) of each matrix."""
    kv = a.n_kv_heads * a.head_dim
    return {
        "wq": (a.dim, a.dim),
        "wk": (a.dim, kv),
        "wv": (a.dim, kv),
        "wo": (a.dim, a.dim),
        "w1": (a.dim, a.hidden),
        "w3": (a.dim, a.hidden),
        "w2": (a.hidden, a.dim),
    }


def random_weights(a: ModelArgs, gen) -> list[dict[str, torch.Tensor]]:
    """Per layer: nn.Linear-layout fp16 weights (n_out, n_in), std ~ 1/sqrt(n_in) with
    per-input-channel scales spread like trained models' (log-normal)."""
    layers = []
    for _ in range(a.n_layers):
        lw = {}
        for name, (n_in, n_out) in shapes(a).items():
            chan = torch.exp(0.5 * torch.randn(n_in, generator=gen, device="cuda"))
            w = torch.randn((n_out, n_in), generator=gen, device="cuda") * chan
            lw[name] = (w * (1.0 / n_in**0.5)).half()
            del w
        layers.append(lw)
    return layers


class Decoder:
    """One decode step over a KV cache; ``lin(name, layer, x)`` is the only difference between
    the dense and the effort model."""

    def __init__(self, a: ModelArgs, lin, gen, max_len: int, streams: bool = False, group=None):
        self.a, self.lin, self.max_len = a, lin, max_len
        self.group = group  # group(names, layer, x) -> outputs: one call for q/k/v, w1/w3
        # streams: k, v (and w3) on side streams, forked and joined inside the graph
        self.side = [torch.cuda.Stream(), torch.cuda.Stream()] if streams else None
        self.keep = []  # side-stream outputs stay referenced until the capture ends
        dev, hd = "cuda", a.head_dim
        self.emb = (torch.randn((a.vocab, a.dim), generator=gen, device=dev)).half()
        self.head = (torch.randn((a.vocab, a.dim), generator=gen, device=dev) * a.dim**-0.5).half()
        kv_shape = (a.n_layers, a.n_kv_heads, max_len, hd)
        self.k_cache = torch.randn(kv_shape, generator=gen, device=dev).half()
        self.v_cache = torch.randn(kv_shape, generator=gen, device=dev).half()
        inv = 1.0 / a.rope_theta ** (torch.arange(0, hd, 2, device=dev).float() / hd)
        ang = torch.arange(max_len, device=dev).float()[:, None] * inv[None, :]
        self.freqs = torch.polar(torch.ones_like(ang), ang)  # (max_len, hd/2) complex64
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = None

    def rope(self, x, f):  # x (heads, hd), f (1, hd/2) complex at self.pos
        xc = torch.view_as_complex(x.float().view(x.shape[0], -1, 2))
        return torch.view_as_real(xc * f).flatten(1).half()

    def norm(self, x):
        return F.rms_norm(x, (self.a.dim,), eps=self.a.norm_eps)

    def fork(self, *fns):
        """fns[0] on the current stream, the others on side streams (when enabled)."""
        if not self.side:
            return [fn() for fn in fns]
        cur = torch.cuda.current_stream()
        out = [None] * len(fns)
        for i, fn in enumerate(fns[1:]):
            self.side[i].wait_stream(cur)
            with torch.cuda.stream(self.side[i]):
                out[i + 1] = fn()
        out[0] = fns[0]()
        for i in range(len(fns) - 1):
            cur.wait_stream(self.side[i])
        self.keep += out[1:]
        return out

    def attention(self, layer, x, f, bias):
        a, hd = self.a, self.a.head_dim
        if self.group is not None:
            q, k, v = self.group(("wq", "wk", "wv"), layer, x)
            q = self.rope(q.view(a.n_heads, hd), f)
            k = self.rope(k.view(a.n_kv_heads, hd), f)
            v = v.view(a.n_kv_heads, hd)
        else:
            q, k, v = self.fork(
                lambda: self.rope(self.lin("wq", layer, x).view(a.n_heads, hd), f),
                lambda: self.rope(self.lin("wk", layer, x).view(a.n_kv_heads, hd), f),
                lambda: self.lin("wv", layer, x).view(a.n_kv_heads, hd),
            )
        kc, vc = self.k_cache[layer], self.v_cache[layer]  # (kv, max_len, hd)
        kc.index_copy_(1, self.pos, k[:, None])
        vc.index_copy_(1, self.pos, v[:, None])
        qg = q.view(a.n_kv_heads, a.n_heads // a.n_kv_heads, hd)
        scores = torch.baddbmm(bias, qg, kc.transpose(1, 2), alpha=hd**-0.5)  # (kv, rep, len)
        o = torch.bmm(torch.softmax(scores, -1), vc).reshape(a.dim)
        return self.lin("wo", layer, o)

    def mlp(self, layer, m):
        if self.group is not None:
            g1, g3 = self.group(("w1", "w3"), layer, m)
        else:
            g1, g3 = self.fork(lambda: self.lin("w1", layer, m), lambda: self.lin("w3", layer, m))
        return self.lin("w2", layer, F.silu(g1) * g3)

    def step(self):
        h = self.emb.index_select(0, self.token)[0]
        f = self.freqs.index_select(0, self.pos)
        ar = torch.arange(self.max_len, device="cuda")
        bias = (
            torch.where(ar > self.pos, float("-inf"), 0.0)
            .half()
            .expand(self.a.n_kv_heads, self.a.n_heads // self.a.n_kv_heads, -1)
        )
        for layer in range(self.a.n_layers):
            h = h + self.attention(layer, self.norm(h), f, bias)
            m = self.norm(h)
            h = h + self.mlp(layer, m)
        self.logits = F.linear(self.norm(h)[None], self.head)[0]
        self.token.copy_(self.logits.argmax()[None])
        self.pos.add_(1)


def capture(dec: Decoder) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dec.step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dec.step()
    dec.keep.clear()
    return g


def tokens_per_s(dec: Decoder, g, start: int, steps: int) -> float:
    dec.pos.fill_(start)
    for _ in range(3):
        g.replay()
    dec.pos.fill_(start)
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(steps):
        g.replay()
    t1.record()
    torch.cuda.synchronize()
    return steps / (t0.elapsed_time(t1) * 1e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--streams", action="store_true", help="k/v and w1/w3 on parallel streams")
    ap.add_argument(
        "--no-groups", action="store_true", help="effort model: q/k/v and w1/w3 as separate calls"
    )
    ap.add_argument(
        "--libs", help="comma-separated kernel builds, each timed in this process (interleaved)"
    )
    ap.add_argument(
        "--splits",
        help="';'-separated row-split settings timed in this process (with --libs: each build"
        " x each setting), e.g. 'qkv=12,wo=32;qkv=8' (names qkv, wo, w13, w2; 0 or absent:"
        " the default); an empty setting is the default",
    )
    ap.add_argument("--ct-w13", type=int, help="tile width of w1 and w3 (default: by width, 128)")
    ap.add_argument("--json")
    args = ap.parse_args()
    a = ModelArgs(n_layers=args.layers)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    t0 = time.time()
    weights = random_weights(a, gen)
    torch.cuda.synchronize()
    t_gen = time.time() - t0
    t0 = time.time()
    ct = {"wq": 64, "wk": 64, "wv": 64}  # one tile width per group; the others by default
    if args.ct_w13:
        ct.update(w1=args.ct_w13, w3=args.ct_w13)
    buckets = [{n: cuda.build_buckets(lw[n].t(), ct=ct.get(n)) for n in MATS} for lw in weights]
    groups = [
        {
            ("wq", "wk", "wv"): cuda.CudaGroup([lb["wq"], lb["wk"], lb["wv"]]),
            ("w1", "w3"): cuda.CudaGroup([lb["w1"], lb["w3"]]),
        }
        for lb in buckets
    ]
    torch.cuda.synchronize()
    t_build = time.time() - t0
    eff = torch.tensor([1.0], dtype=torch.float64, device="cuda")

    def dense_lin(name, layer, x):
        return F.linear(x[None], weights[layer][name])[0]

    def effort_lin(name, layer, x):
        return cuda.matmul(x, buckets[layer][name], eff, out_dtype=torch.float16)

    def effort_group(names, layer, x):
        return cuda.matmul_group(x, groups[layer][names], eff, out_dtype=torch.float16)

    max_len = args.ctx + args.steps + 8
    res = {
        "ct_w13": args.ct_w13,
        "streams": args.streams,
        "groups": not args.no_groups,
        "layers": a.n_layers,
        "ctx": args.ctx,
        "steps": args.steps,
        "gen_s": round(t_gen, 1),
        "build_s": round(t_build, 1),
        "device": torch.cuda.get_device_name(),
    }
    g_gen = torch.Generator(device="cuda")
    g_gen.manual_seed(1)
    dense = Decoder(a, dense_lin, g_gen, max_len, args.streams)
    g_gen.manual_seed(1)
    grp = None if args.no_groups else effort_group
    ours = Decoder(a, effort_lin, g_gen, max_len, args.streams, grp)  # same embeddings, head, cache
    gd, ge = capture(dense), capture(ours)
    w_bytes = sum(w.numel() * 2 for lw in weights for w in lw.values()) + dense.head.numel() * 2

    def measure(out):
        out["dense_tok_s"] = round(tokens_per_s(dense, gd, args.ctx, args.steps), 1)
        out["dense_weight_gbps"] = round(out["dense_tok_s"] * w_bytes / 1e9, 1)
        for e in (1.0, 0.5, 0.25):
            eff.fill_(e)
            for d in (dense, ours):  # one step from the same state: how close are the logits?
                d.pos.fill_(args.ctx)
                d.token.fill_(7)
            gd.replay()
            ge.replay()
            torch.cuda.synchronize()
            cos = F.cosine_similarity(dense.logits.float(), ours.logits.float(), dim=0).item()
            tps = tokens_per_s(ours, ge, args.ctx, args.steps)
            out[f"effort_{e}"] = {
                "tok_s": round(tps, 1),
                "vs_dense": round(tps / out["dense_tok_s"], 3),
                "logits_cos": round(cos, 4),
            }

    def set_splits(spec: str) -> None:
        """Row splits of every layer's calls (a setting of --splits): new groups, new scratch."""
        sp = {k: int(v) or None for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
        for lb, lg in zip(buckets, groups):
            lg[("wq", "wk", "wv")] = cuda.CudaGroup(
                [lb["wq"], lb["wk"], lb["wv"]], splits=sp.get("qkv")
            )
            lg[("w1", "w3")] = cuda.CudaGroup([lb["w1"], lb["w3"]], splits=sp.get("w13"))
            for n in ("wo", "w2"):
                lb[n]._alone = cuda.CudaGroup([lb[n]], splits=sp.get(n))

    if not args.libs and args.splits is None:
        measure(res)
    else:  # each build (x each split setting): fresh meeting counters and scratch, a new
        # capture, then the same timing
        res["libs"] = {}
        libs = args.libs.split(",") if args.libs else [os.environ.get("PYEFFORT_CUDA_LIB", "")]
        specs = args.splits.split(";") if args.splits is not None else [""]
        configs = [(lib, spec) for lib in libs for spec in specs]
        for rnd in range(2):
            for lib, spec in configs:
                if lib:
                    os.environ["PYEFFORT_CUDA_LIB"] = lib
                cuda._lib_handle = None
                cuda._lib()
                torch.cuda.synchronize()
                del ge
                set_splits(spec)
                for lb in buckets:
                    for b in lb.values():
                        for t in (b._state, b._hist, *b._alone._scratch):
                            t.zero_()
                for lg in groups:
                    for gr in lg.values():
                        for t in gr._scratch:
                            t.zero_()
                ge = capture(ours)
                out = {}
                measure(out)
                name = pathlib.Path(lib).stem + (f" {spec}" if spec else "")
                res["libs"].setdefault(name, []).append(out)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
