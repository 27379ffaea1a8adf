"""Screening bucket-row statistics with the torch twin on CPU (issue 6, row statistic ideas).

Every matrix keeps the default rule's exact cutoff and the shipped budget split; only the score
``abs(x_i) * stat(k, i)`` changes. A variant is a name:

- ``rms`` (the default), ``mean`` (L1), ``l3``, ``l4``, ``max``, ``top4`` (mean of the 4 largest
  abs entries of the row): other norms of the row's values;
- ``pow:B``: ``rms ** B`` (the same as ranking by ``abs(x_i) ** (1/B) * rms``; the order inside a
  rank is unchanged, so only the stored statistic changes);
- ``rank:A``: ``rms * (1 + k) ** -A`` (rank-aware: rank k's rows discounted, monotone for A >= 0);
- ``ffnw``: gate/up/v rows scored by an output-weighted RMS, ranks inside a group by
  ``abs(a_j w_j)``, ``a_j`` from calibration windows (see ``output_weights``).

python experiments/quality/quality_stat.py --sets hold --efforts 0.25,0.5 --variants rms,l4,pow:1.2
Sets: ``eval`` (4 x 256 from token 0), ``cal`` (24 x 256, the calibration windows of
experiments/README.md), ``calN`` (every N-th of them), ``hold`` (the 4 held-out windows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch_search as S
from torch_twin import GROUP, TwinLlama, exact_hook, kl_per_token

from pyeffort.models.profiles import allocation as A


def sorted_abs(m) -> torch.Tensor:
    """(16, n_in, G) float64: abs of the rank-k weight of each group, rank-major."""
    w = m.w32.double().abs().reshape(m.n_in, -1, GROUP)
    return torch.sort(w, dim=-1, descending=True).values.permute(2, 0, 1)


def row_stat(v: torch.Tensor, kind: str) -> torch.Tensor:
    """v (16, n_in, G) abs values -> (16, n_in) statistic."""
    if kind == "rms":
        return v.pow(2).mean(-1).sqrt()
    if kind == "mean":
        return v.mean(-1)
    if kind in ("l3", "l4", "l6"):
        p = int(kind[1:])
        return v.pow(p).mean(-1).pow(1.0 / p)
    if kind == "max":
        return v.amax(-1)
    if kind.startswith("top"):
        k = int(kind[3:])
        return torch.topk(v, k, dim=-1).values.mean(-1)
    raise ValueError(kind)


class Variant:
    """Installs a statistic (and, for output weighting, ranks) on every matrix of the twin."""

    def __init__(self, model: TwinLlama, name: str, out_w: dict | None = None):
        self.name = name
        for mname, m in model.mats.items():
            if not hasattr(m, "rank0"):
                m.rank0, m.stats0 = m.rank, m.stats
            m.rank = m.rank0
            if name.startswith("pow:"):
                m.stats = m.stats0.double().pow(float(name[4:])).float()
            elif name.startswith("rank:"):
                a = float(name[5:])
                f = (1.0 + torch.arange(GROUP, dtype=torch.float64)) ** -a
                m.stats = (m.stats0.double() * f[:, None]).float()
            elif name.startswith(("ffnw", "fisher")):
                a = (out_w or {}).get(mname)
                if a is None:
                    m.stats = m.stats0
                else:
                    weighted_ranks(m, a)
            else:
                m.stats = row_stat(sorted_abs(m), name).float()


def weighted_ranks(m, a: torch.Tensor) -> None:
    """Ranks inside each group by abs(a_j w_ij), statistic the RMS of a_j w_ij over the row."""
    we = (m.w32.double() * a.double()[None, :]).abs().reshape(m.n_in, -1, GROUP)
    order = torch.sort(we, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order.indices)
    idx = torch.arange(GROUP).expand_as(order.indices).contiguous()
    rank.scatter_(-1, order.indices, idx)
    m.rank = rank.reshape(m.n_in, m.n_out).to(torch.uint8)
    m.stats = order.values.permute(2, 0, 1).pow(2).mean(-1).sqrt().float()


def product(m, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sum over inputs i of x_i times the weights of row i with rank < k[:, i] (no stored
    stack: W_k made per rank, ranks no token keeps skipped)."""
    y = torch.zeros(x.shape[0], m.n_out)
    top = int(k.max())
    r = m.rank
    for kk in range(top):
        wk = torch.where(r == kk, m.w32, 0.0)
        y += torch.where(k > kk, x, 0.0) @ wk
    return y


def twin_call(m, x, effort):
    if effort >= 1.0:
        return x @ m.w32, x.shape[0] * m.size
    k = m.keep(x, effort)
    return product(m, x, k), int(k.sum()) * m.mults_per_row


def output_weights(model: TwinLlama, tokens: torch.Tensor) -> dict:
    """Static output weights from calibration windows (exact model):
    up  a_j = RMS_t(silu(g_j)) * norm(W2_j,:)   (an error in u_j reaches the residual so)
    gate a_j = RMS_t(u_j * silu'(g_j)) * norm(W2_j,:)
    v   a_j = norm of the o-projection rows fed by output j (attention mixes tokens linearly)."""
    acts = {}

    def hook(name, mat, x):
        y = x @ mat.w32
        if name.endswith(("ffn.w1", "ffn.w3")):
            acts[name] = y
        return y

    model.forward(tokens, hook)
    out = {}
    for i in range(model.n_layers):
        p = f"layers.{i}."
        g, u = acts[p + "ffn.w1"].double(), acts[p + "ffn.w3"].double()
        w2n = model.mats[p + "ffn.w2"].w32.double().norm(dim=1)  # (hidden,)
        sg = torch.sigmoid(g)
        dsilu = sg * (1 + g * (1 - sg))
        out[p + "ffn.w3"] = (torch.nn.functional.silu(g).pow(2).mean(0).sqrt() * w2n).float()
        out[p + "ffn.w1"] = ((u * dsilu).pow(2).mean(0).sqrt() * w2n).float()
        wo = model.mats[p + "attn.wo"].w32.double()  # (dim, dim): input = heads x hd
        hd = model.dim // model.n_heads
        rep = model.n_heads // model.n_kv
        von = torch.zeros(model.n_kv * hd, dtype=torch.float64)
        for h in range(model.n_heads):
            kv = h // rep
            von[kv * hd : (kv + 1) * hd] += wo[h * hd : (h + 1) * hd].pow(2).sum(1)
        out[p + "attn.wv"] = von.sqrt().float()
    return {k: v / v.mean() for k, v in out.items()}


def fisher_weights(model: TwinLlama, tokens: torch.Tensor, samples: int = 4, seed: int = 0):
    """Output weights from the diagonal Fisher of each matrix's output on calibration windows:
    a_j = sqrt(mean over tokens of (d log q(y) / d out_j)^2), y sampled from the exact model."""
    fwd = TwinLlama.forward.__wrapped__
    tokens = tokens.to(model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    acc: dict = {}
    for _ in range(samples):
        outs = {}

        def hook(name, mat, x, outs=outs):
            y = x @ mat.w32
            if not y.requires_grad:  # the first matrix: its input is the embedding
                y.requires_grad_()
            y.retain_grad()
            outs[name] = y
            return y

        with torch.enable_grad():
            logits = fwd(model, tokens, hook)
            logp = torch.log_softmax(logits.double(), -1)
            flat = logp.reshape(-1, logp.shape[-1])
            y = torch.multinomial(flat.detach().exp().float(), 1, generator=gen)
            loss = -flat.gather(1, y).sum()
            loss.backward()
        for n, t in outs.items():
            acc[n] = acc.get(n, 0.0) + t.grad.double().pow(2).mean(0)
    out = {n: (v / samples).sqrt() for n, v in acc.items()}
    return {n: (v / v.mean()).float() for n, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="rms")
    p.add_argument("--efforts", default="0.25,0.5")
    p.add_argument("--sets", default="hold")
    p.add_argument("--profile", default="shipped", help="'shipped', 'uniform' or a JSON path")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pyeffort.models.default import default_gguf

    gguf = default_gguf()
    model = TwinLlama(gguf, "cpu")
    ids = np.load(Path.home() / ".cache/pyeffort/botchan_ids.npy")
    sets, _, _ = S.windows(ids, 24, 4, 256)
    want = args.sets.split(",")
    chosen = {}
    for s in want:
        if s.startswith("cal") and s != "cal":
            chosen[s] = sets["cal"][:: int(s[3:])]
        else:
            chosen[s] = sets[s]
    chosen = {k: torch.from_numpy(np.asarray(v)) for k, v in chosen.items()}
    exact = {
        k: torch.log_softmax(model.forward(t, exact_hook).double(), -1) for k, t in chosen.items()
    }
    prof = None
    if args.profile == "shipped":
        prof = A.load(A.shipped("SmolLM2-135M-Instruct.Q4_1.gguf"))
    elif args.profile != "uniform":
        prof = A.load(args.profile)
    out_w = None
    for vname in args.variants.split(","):
        if vname.startswith(("ffnw", "fisher")) and out_w is None:
            Variant(model, "rms")
            cal_t = torch.from_numpy(np.asarray(sets["cal"][::3]))
            if vname.startswith("fisher"):
                out_w = fisher_weights(model, cal_t)
            else:
                out_w = output_weights(model, cal_t)
            if ":" in vname:  # ffnw:TYPES restricts the weighting to those types
                keep = vname.split(":")[1].split("+")
                out_w = {k: v for k, v in out_w.items() if any(k.endswith(t) for t in keep)}
        Variant(model, vname, out_w)
        for e in [float(v) for v in args.efforts.split(",")]:
            eff = S.profile_efforts(model, prof, e)
            acc = {"mults": 0, "size": 0}

            def hook(name, mat, x, eff=eff, acc=acc):
                y, mults = twin_call(mat, x, eff.get(name, 1.0))
                acc["mults"] += mults
                acc["size"] += x.shape[0] * mat.size
                return y

            while Path("/tmp/pause_cpu").exists():  # the lead is timing: wait
                time.sleep(10)
            row = {"variant": vname, "effort": e, "profile": args.profile}
            t0 = time.time()
            for k, t in chosen.items():
                row[k] = float(kl_per_token(exact[k], model.forward(t, hook)).mean())
            row["realised"] = acc["mults"] / max(acc["size"], 1)
            row["s"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if vname.startswith(("ffnw", "fisher")):
            out_w = None


if __name__ == "__main__":
    main()
