"""Mixtral's sparse mixture-of-experts block, in place of the dense SwiGLU of a Llama block.

A dense float32 router scores the experts of each token; the token goes to its ``k`` best
(softmax over all experts, the k largest probabilities renormalised to sum to 1, as
transformers' MixtralSparseMoeBlock), and its output is the weighted sum of theirs. Each expert
is a SwiGLU ``FeedForward`` whose three matrices are EffortLinear buckets at the model's effort.
An expert no token is routed to is never called: it does no multiplication, reads no byte and
is not counted in the realised effort (``Model.realised_effort``: done / those of the routed
experts' products and the attention matrices).

Weights (our names, see pyeffort.models.llama): ``layers.{i}.router`` (dim, n_experts) float32,
and per expert e ``layers.{i}.ffn.experts.{e}.{w1,w3,w2}`` (gate, up, down).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from pyeffort.models.args import ModelArgs
from pyeffort.models.effort_linear import EffortLinear


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Router logits (T, n_experts) -> the k experts of each token (T, k) int64, most probable
    first, and their weights (T, k) float32: softmax, the k largest, renormalised to sum 1."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]  # ties: the lower expert, as torch.topk
    top = np.take_along_axis(p, idx, -1)
    return idx, (top / top.sum(-1, keepdims=True)).astype(np.float32)


class MoE:
    """``(x (T, dim), effort) -> (T, dim)``; ``expert(layer, w, prefix=...)`` builds one expert
    (the Llama block passes its FeedForward)."""

    def __init__(self, args: ModelArgs, layer: int, w: Mapping, expert):
        p = f"layers.{layer}."
        self.router = np.ascontiguousarray(w[p + "router"], dtype=np.float32)  # (dim, n_experts)
        self.k = args.n_experts_per_tok
        self.experts = [expert(layer, w, prefix=f"{p}ffn.experts.{e}.")
                        for e in range(args.n_experts)]  # fmt: skip

    def linears(self) -> Iterator[EffortLinear]:
        """Every expert's matrices, expert by expert: w1 w3 w2."""
        for f in self.experts:
            yield from f.linears()

    def __call__(self, x: np.ndarray, effort: float) -> np.ndarray:
        idx, wts = route(x @ self.router, self.k)  # (T, k) each
        out = np.zeros(x.shape, np.float32)
        for e in np.unique(idx):  # each routed expert once, on its tokens (decoding: k experts)
            rows, slot = np.nonzero(idx == e)
            out[rows] += wts[rows, slot, None] * self.experts[e](x[rows], effort)
        return out
