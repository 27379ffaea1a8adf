"""Teacher-forced evaluation of selection rules against the exact model.

For each (rule, effort) every linear layer of the model runs the rule through its ``hook``; per
window and token we compare the logits with the exact model's (fp16 weights, dense products):
KL(exact || approximate) in nats, top-1 agreement, perplexity of the next token, the mean cosine
similarity of each matmul's output with the exact product of the same input, the realised effort
(multiplications done over all n_in * n_out of every hooked matrix) and the weight bytes read.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from pyeffort.eval import rules as R
from pyeffort.models.profiles.allocation import Allocation, matrix_type


@dataclass
class Result:
    rule: str
    effort: float  # asked
    realised: float  # multiplications done / all multiplications of the hooked matrices
    kl: float  # mean KL(exact || approx) per token, nats
    top1: float  # fraction of tokens whose argmax matches the exact model's
    ppl: float  # perplexity of the next token
    cosine: float  # mean per-matmul cosine similarity (over tokens and matrices)
    bytes_per_token: float  # weight bytes read per token
    seconds: float
    cos_by_type: dict = field(default_factory=dict)

    def as_dict(self):
        return asdict(self)


def weight_of(lin) -> np.ndarray:
    """The float16 (n_in, n_out) weight of a model linear, whatever it stores."""
    if callable(getattr(lin, "dense", None)):
        return np.asarray(lin.dense(), dtype=np.float16)
    for attr in ("w16", "weight16", "w"):
        w = getattr(lin, attr, None)
        if isinstance(w, np.ndarray) and w.ndim == 2:
            return w.astype(np.float16, copy=False)
    return lin.buckets.to_dense()


def windows(ids, n_windows: int, length: int, start: int = 0) -> np.ndarray:
    """(n_windows, length) int64: consecutive non-overlapping windows from token ``start`` on."""
    ids = np.asarray(ids, dtype=np.int64)
    need = start + n_windows * length
    if need > len(ids):
        raise ValueError(
            f"{n_windows} windows of {length} from {start} need {need} tokens; "
            f"the text has {len(ids)}"
        )
    return ids[start:need].reshape(n_windows, length)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class Harness:
    """Holds the model, the windows and the exact model's log-probabilities."""

    def __init__(
        self,
        model,
        windows: np.ndarray,
        allocation_profile: dict | None = None,
        progress: bool = True,
    ):
        self.model = model
        self.windows = np.asarray(windows)
        self.linears = list(model.linears())
        self.states = {
            lin.name: R.MatrixState(weight_of(lin), lambda lin=lin: lin.buckets, lin.name)
            for lin in self.linears
        }
        names = [lin.name for lin in self.linears]
        sizes = [self.states[n].size for n in names]
        self.uniform = Allocation(names, sizes, None)
        self.allocation = Allocation(names, sizes, allocation_profile)
        self.progress = progress
        self._exact = None

    # ------------------------------------------------------------ running

    def _forward_all(self, hook, effort: float, desc: str):
        for lin in self.linears:
            lin.hook = hook
        try:
            out = []
            it = range(len(self.windows))
            if self.progress:
                from tqdm import tqdm

                it = tqdm(it, desc=desc, leave=False)
            for w in it:
                out.append(log_softmax(self.model.forward(self.windows[w], 0, effort)))
            return out
        finally:
            for lin in self.linears:
                lin.hook = None

    def exact(self) -> list[np.ndarray]:
        if self._exact is None:

            def hook(lin, x, effort):
                x2 = np.asarray(x, dtype=np.float32).reshape(-1, self.states[lin.name].n_in)
                y = x2 @ self.states[lin.name].w32
                return y.reshape(*np.shape(x)[:-1], -1)

            self._exact = self._forward_all(hook, 1.0, "exact")
        return self._exact

    def run(self, rule: str, effort: float, allocate: bool | None = None) -> Result:
        """One rule at one user effort; ``allocate`` splits the effort by the profile (default:
        only for the default rule and its twin)."""
        fn = R.RULES[rule]
        if allocate is None:
            allocate = rule in R.SPLIT_RULES
        alloc = (self.allocation if allocate else self.uniform).efforts(effort)
        exact = self.exact()
        acc = {"mults": 0, "bytes": 0, "size": 0, "cos": [], "types": {}}

        def hook(lin, x, user_effort):
            st = self.states[lin.name]
            x2 = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, st.n_in))
            y, mults, nbytes = fn(x2, st, alloc[lin.name])
            ex = x2 @ st.w32
            num = (y * ex).sum(1)
            den = np.linalg.norm(y, axis=1) * np.linalg.norm(ex, axis=1)
            cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
            acc["mults"] += mults
            acc["bytes"] += nbytes
            acc["size"] += st.size * x2.shape[0]
            acc["cos"].append(cos.mean())
            acc["types"].setdefault(matrix_type(lin.name), []).append(cos.mean())
            return y.astype(np.float32).reshape(*np.shape(x)[:-1], -1)

        t0 = time.perf_counter()
        approx = self._forward_all(hook, effort, f"{rule} {effort:g}")
        secs = time.perf_counter() - t0
        kl, agree, nll, n_tok, n_nll = 0.0, 0, 0.0, 0, 0
        for w, (p, q) in enumerate(zip(exact, approx)):
            kl += float((np.exp(p) * (p - q)).sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            tgt = self.windows[w][1:]
            nll -= float(q[np.arange(len(tgt)), tgt].sum())
            n_tok += p.shape[0]
            n_nll += len(tgt)
        tokens = self.windows.size
        return Result(
            rule=rule,
            effort=float(effort),
            realised=acc["mults"] / max(acc["size"], 1),
            kl=kl / n_tok,
            top1=agree / n_tok,
            ppl=float(np.exp(nll / max(n_nll, 1))),
            cosine=float(np.mean(acc["cos"])),
            bytes_per_token=acc["bytes"] / tokens,
            seconds=secs,
            cos_by_type={k: float(np.mean(v)) for k, v in acc["types"].items()},
        )

    def capture(self, windows) -> dict[str, np.ndarray]:
        """name -> (tokens, n_in) float32 inputs of that linear in the exact model."""
        xs: dict[str, list] = {}

        def hook(lin, x, effort):
            st = self.states[lin.name]
            x2 = np.asarray(x, dtype=np.float32).reshape(-1, st.n_in)
            xs.setdefault(lin.name, []).append(x2.copy())
            return (x2 @ st.w32).reshape(*np.shape(x)[:-1], -1)

        for lin in self.linears:
            lin.hook = hook
        try:
            for w in windows:
                self.model.forward(np.asarray(w), 0, 1.0)
        finally:
            for lin in self.linears:
                lin.hook = None
        return {k: np.concatenate(v) for k, v in xs.items()}

    def exact_ppl(self) -> float:
        nll, n = 0.0, 0
        for w, p in enumerate(self.exact()):
            tgt = self.windows[w][1:]
            nll -= float(p[np.arange(len(tgt)), tgt].sum())
            n += len(tgt)
        return float(np.exp(nll / n))
