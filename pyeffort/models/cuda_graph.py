"""One decoded token as one CUDA graph replay (llama_torch.Transformer on a CUDA device).

The graph reads its token and position from two static device tensors and its efforts from the
matrices' float64 device tensor (llama_torch.CudaMatmuls.eff), so a new token, position or
effort needs no re-capture: only a new KV cache size does (the cache doubles, rarely). It is
captured once, after a warm-up on a side stream (the kernels compile and allocate there), by
the first decoded token; the prefill runs outside it. The warm-up steps write the same token's
keys and values at the same position as the replay that follows, and the multiplication
counters they add to are put back, so the realised effort counts replays only.
"""

from __future__ import annotations

import torch

from pyeffort.errors import BackendError

WARMUP = 2  # eager steps on a side stream before the capture


class GraphDecoder:
    """``decoder(token, pos) -> logits (1, vocab)`` float32, a static tensor overwritten by the
    next call. ``captures`` counts the captures so far."""

    def __init__(self, net):
        if net.args.n_experts:
            raise BackendError("a mixture of experts decodes eagerly: its routing, read back "
                               "per layer, cannot be captured in a CUDA graph")  # fmt: skip
        self.net = net  # llama_torch.Transformer on a CUDA device
        dev = net.device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)  # static inputs
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.capacity = None  # the KV cache length the graph was captured with
        self.captures = 0

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        self.token.fill_(token)
        self.pos.fill_(pos)
        if self.graph is None or self.capacity != self.net.capacity:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        self.graph = self.logits = None  # frees the old graph's memory pool first
        counters = self.net.mm.info()
        saved = [t.clone() for t in counters]
        side = torch.cuda.Stream(self.net.device)
        side.wait_stream(torch.cuda.current_stream(self.net.device))
        with torch.no_grad():
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    self.net(self.token, self.pos, last_only=True)
            torch.cuda.current_stream(self.net.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.net(self.token, self.pos, last_only=True)
        for t, v in zip(counters, saved):
            t.copy_(v)
        self.graph, self.capacity = graph, self.net.capacity
        self.captures += 1
