"""generate(): a generator of tokens; the caller decides what to do with each one.

Effort may change while it runs: pass a callable and it is read before every decoded token.
The context is enforced: the prompt (after ``start_pos`` cached positions) plus ``max_tokens``
must fit the model's ``max_seq_len`` (``fit_context`` shortens ``max_tokens`` to fit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pyeffort.errors import PyEffortError
from pyeffort.models.llama import Model


class ContextError(PyEffortError, ValueError):
    """The prompt and the tokens asked for do not fit the model's context (max_seq_len)."""


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated: int = 0  # tokens yielded
    prefill_s: float = 0.0
    decoded: int = 0  # tokens produced by decode forwards (the first token comes from prefill)
    decode_s: float = 0.0
    efforts: list = field(default_factory=list)  # effort asked per decode step
    realised: float = float("nan")  # multiplications done / dense, over decode steps

    @property
    def decode_tps(self) -> float:
        return self.decoded / self.decode_s if self.decode_s > 0 else float("nan")


def context_length(model) -> int | None:
    args = getattr(model, "args", None)
    return getattr(args, "max_seq_len", None)


def fit_context(model, used: int, max_tokens: int) -> int:
    """``max_tokens`` shortened so that ``used`` positions (cache and prompt) plus the tokens
    generated fit the model's context; ContextError when not even one token fits."""
    ctx = context_length(model)
    if ctx is None:
        return max_tokens
    if used >= ctx:
        raise ContextError(f"the prompt is {used} tokens long: the model's context is {ctx} "
                           "tokens (max_seq_len), leaving no room to generate")  # fmt: skip
    return min(max_tokens, ctx - used)


def check_sampling(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    """ValueError naming the first sampling parameter out of range."""
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no cut), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must lie in [0, 1], got {min_p}")


def candidates(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """logits (vocab,) -> the token ids that survive top-k, then top-p, then min-p, most likely
    first (the order of llama.cpp's sampler chain and mlx_lm's make_sampler), all three judged
    on softmax(logits) at temperature 1. top-k: the k most likely (0: all); top-p: the fewest
    whose probability sums to >= top_p; min-p: those with p >= min_p * max p. The most likely
    token always survives."""
    z = logits.astype(np.float64)
    idx = np.argsort(-z, kind="stable")
    if 0 < top_k < len(idx):
        idx = idx[:top_k]
    p = np.exp(z[idx] - z[idx[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        idx, p = idx[:keep], p[:keep]
    if min_p > 0.0:
        n = int(np.count_nonzero(p >= min_p * p[0]))
        idx = idx[: max(n, 1)]
    return idx


def sample(logits: np.ndarray, temperature: float, top_p: float, rng, top_k: int = 0,
           min_p: float = 0.0) -> int:  # fmt: skip
    """logits (vocab,) -> a token id: greedy at temperature 0; else drawn from the
    ``candidates`` with softmax(logits / temperature) renormalised over them."""
    if temperature <= 0:
        return int(np.argmax(logits))
    idx = candidates(logits, top_k, top_p, min_p)
    z = logits[idx].astype(np.float64) / temperature
    q = np.exp(z - z.max())
    return int(idx[rng.choice(len(idx), p=q / q.sum())])


def generate(
    model: Model,
    prompt: Sequence[int],
    *,
    max_tokens: int = 100,
    effort: float | Callable[[], float] = 1.0,
    prefill_effort: float = 1.0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[int] | None = None,
    start_pos: int = 0,
    stats: Stats | None = None,
) -> Iterator[int]:
    """Yield up to ``max_tokens`` tokens after ``prompt`` (token ids placed at ``start_pos``: the
    cache holds the positions before it). Stops after yielding a token in ``stop`` (default: the
    tokenizer's end-of-sequence ids; ``[]``: never). Sampling: see ``sample``."""
    if not 0.0 < prefill_effort <= 1.0:
        raise ValueError(f"prefill_effort must lie in (0, 1], got {prefill_effort}")
    check_sampling(temperature, top_k, top_p, min_p)
    if max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")
    if len(prompt) == 0:
        raise ValueError("the prompt is empty")
    ctx, used = context_length(model), start_pos + len(prompt)
    if ctx is not None and used + max_tokens > ctx:
        raise ContextError(f"{used} prompt tokens + max_tokens {max_tokens} exceed the model's "
                           f"context of {ctx} tokens (max_seq_len)")  # fmt: skip
    get_effort = effort if callable(effort) else (lambda: effort)
    if stop is None:
        tok = getattr(model, "tokenizer", None)
        stop = tok.eos_ids if tok is not None else []
    stop = {int(s) for s in stop}
    st = stats if stats is not None else Stats()
    rng = np.random.default_rng(seed)
    if max_tokens == 0:
        return
    t0 = time.perf_counter()
    logits = model.forward(prompt, start_pos, prefill_effort, last_only=True)[-1]
    st.prompt_tokens, st.prefill_s = len(prompt), time.perf_counter() - t0
    pos = start_pos + len(prompt)
    model.reset_counters()
    for i in range(max_tokens):
        token = sample(logits, temperature, top_p, rng, top_k, min_p)
        st.generated += 1
        yield token
        if token in stop or i == max_tokens - 1:
            break
        e = float(get_effort())
        t0 = time.perf_counter()
        logits = model.forward([token], pos, e)[-1]
        st.decode_s += time.perf_counter() - t0
        st.decoded += 1
        st.efforts.append(e)
        st.realised = model.realised_effort()
        pos += 1
