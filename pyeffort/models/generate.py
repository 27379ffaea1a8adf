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


def sample(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    """logits (vocab,) -> a token id; temperature 0 is greedy."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        idx = np.argsort(-p)
        keep = np.searchsorted(np.cumsum(p[idx]), top_p) + 1
        idx = idx[:keep]
        q = p[idx] / p[idx].sum()
        return int(idx[rng.choice(len(idx), p=q)])
    return int(rng.choice(len(p), p=p))


def generate(
    model: Model,
    prompt: Sequence[int],
    *,
    max_tokens: int = 100,
    effort: float | Callable[[], float] = 1.0,
    prefill_effort: float = 1.0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[int] | None = None,
    start_pos: int = 0,
    stats: Stats | None = None,
) -> Iterator[int]:
    """Yield up to ``max_tokens`` tokens after ``prompt`` (token ids placed at ``start_pos``: the
    cache holds the positions before it). Stops after yielding a token in ``stop`` (default: the
    tokenizer's end-of-sequence ids)."""
    if not 0.0 < prefill_effort <= 1.0:
        raise ValueError(f"prefill_effort must lie in (0, 1], got {prefill_effort}")
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
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
        token = sample(logits, temperature, top_p, rng)
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
