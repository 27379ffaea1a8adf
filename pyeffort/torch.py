"""pyeffort in torch: ``EffortLinear``, an ``nn.Linear`` whose products do only the fraction
``effort`` of their multiplications; ``effort(model, e)``, a context manager that sets it in a
module tree; ``patch(model)``, which swaps them into a transformers decoder model.

Importing this module needs torch (``pip install pyeffort[torch]``); ``import pyeffort`` does not.

>>> import torch, pyeffort.torch as pet  # doctest: +SKIP
>>> lin = pet.EffortLinear.from_linear(torch.nn.Linear(512, 256))  # doctest: +SKIP
>>> with torch.no_grad(), pet.effort(lin, 0.25):  # doctest: +SKIP
...     y = lin(torch.randn(1, 512))  # (1, 256), a quarter of the multiplications

Paths of a forward (x: ``(..., n_in)``, T = the number of tokens in it):
- CPU tensors go to the C core through numpy views (no copy of contiguous float32; float16 and
  bfloat16 are converted to float32 once); CUDA tensors to ``pyeffort.cuda.matmul`` on the
  module's ``CudaBuckets`` (``.to("cuda")`` / ``.cuda()`` moves the buckets).
- One token at effort < 1: the effort product, at the matrix's own effort under a budget split.
  Several tokens (a prefill): the dense product of the same fp16 weights (made once, on first
  need), unless ``prefill = "effort"``. At effort 1.0 one token takes the full bucket product
  (as ``pyeffort generate``).
- Inference only: under autograd with an ``x`` that requires grad it raises (use
  ``torch.no_grad()`` / ``torch.inference_mode()``).
- ``torch.compile``: the kernel call is a graph break (``torch.compiler.disable``); the rest of
  the model compiles. CUDA graphs: the CUDA kernel queues on the current stream with no host
  round trip and reads the effort from a float64 device tensor of the module, so a captured
  decode step replays, and ``effort`` set between replays is seen by them (the prefill's dense
  path is plain torch). The counters count CPU calls only (CUDA ones would need a host sync).
- Mixtral: ``patch`` unfuses transformers' experts into a ``MoEExperts`` of ``Expert``s (views,
  no copy) whose linears it swaps; transformers' router picks the experts and only those run
  (reading which ones is a host sync: a MoE decode step cannot be captured in a CUDA graph).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import pyeffort
from pyeffort import _validate
from pyeffort.errors import BackendError, ShapeError
from pyeffort.models import effort_linear

PREFILLS = ("dense", "effort")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class EffortLinear(nn.Module):
    """``y = x @ W + b`` doing the fraction ``self.effort`` of the multiplications of one token.

    Wraps ``pyeffort.models.effort_linear.EffortLinear`` (``self.inner``: the buckets, the
    counters, the budget split, the dense copy for prefill)."""

    def __init__(self, buckets: pyeffort.Buckets, bias=None, dtype=torch.float32, name="linear"):
        super().__init__()
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        self.inner = effort_linear.EffortLinear(name, buckets)
        self.in_features, self.out_features = buckets.shape
        self.prefill = "dense"  # or "effort": several tokens through the effort product too
        # the output's dtype and the module's device, moved by .to() / .half() / .cuda()
        self.register_buffer("_like", torch.empty(0, dtype=dtype), persistent=False)
        self.register_buffer("_effort_t", torch.ones(1, dtype=torch.float64), persistent=False)
        b = None if bias is None else bias.detach().to(dtype).reshape(self.out_features).clone()
        self.register_buffer("bias", b)
        self._cuda = None  # CudaBuckets when the module is on a GPU
        self._w_dev = None  # (n_in, n_out) dense copy on the GPU in the output dtype (prefill)
        self.effort = 1.0

    @classmethod
    def from_linear(cls, layer: nn.Linear, values="f16", out_weight=None, name="linear"):
        """The EffortLinear of ``layer`` (its ``weight.T`` rounded to fp16 and bucketed;
        ``values`` and ``out_weight`` as in ``pyeffort.build_buckets``), on its device."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"from_linear needs a torch.nn.Linear, got {type(layer).__name__}")
        B = pyeffort.build_buckets(layer.weight.detach().T, out_weight, values)
        mod = cls(B, layer.bias, layer.weight.dtype, name)
        return mod.to(layer.weight.device)

    # ------------------------------------------------------------ settings and counters

    @property
    def effort(self) -> float:
        return self._effort

    @effort.setter
    def effort(self, value) -> None:
        self._effort = _validate.effort(value)
        self._effort_t.fill_(self.inner.own_effort(self._effort))

    @property
    def buckets(self) -> pyeffort.Buckets:
        return self.inner.buckets

    @property
    def mults(self) -> int:
        return self.inner.mults

    @property
    def total(self) -> int:
        return self.inner.total

    @property
    def realised_effort(self) -> float | None:
        """Multiplications done / those of dense products since ``reset_counters()`` (CPU)."""
        return self.inner.mults / self.inner.total if self.inner.total else None

    def reset_counters(self) -> None:
        self.inner.reset_counters()

    def set_split(self, split) -> None:
        """``effort -> this matrix's effort`` under a budget profile (None: the asked one)."""
        self.inner.split = split
        self.effort = self._effort

    def extra_repr(self) -> str:
        B = self.inner.buckets
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"values={B.values_kind}, effort={self._effort:g}, bias={self.bias is not None}, "
            f"bytes={B.nbytes}"
        )

    # ------------------------------------------------------------ devices

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        dev = self._like.device
        if dev.type == "cpu":
            self._cuda = None
        elif dev.type == "cuda":
            if self._cuda is None or self._cuda.device != dev:
                self._cuda = self.inner.buckets.to(dev)
        else:
            raise BackendError(f"pyeffort.torch runs on CPU and CUDA, not {dev.type}")
        self._w_dev = None
        if self._effort_t.dtype != torch.float64:  # .half() and the like convert every buffer
            self._effort_t = torch.zeros(1, dtype=torch.float64, device=dev)
            self.effort = self._effort
        return self

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
        """x (..., n_in) -> (..., n_out). ``tokens``: the tokens of the model's step when x holds
        only some of them (a mixture of experts' expert: its rows); the path is chosen by it, so
        one token routed to an expert during a prefill takes the dense path too."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "pyeffort EffortLinear is inference only (no gradients): run it under "
                "torch.no_grad() or torch.inference_mode()"
            )
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ShapeError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
        x2 = x.reshape(-1, self.in_features)
        y = _product(self, x2, x2.shape[0] if tokens is None else tokens)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _one_token_path(self, n_tok: int) -> bool:
        """Whether these tokens take the effort product (else the dense one)."""
        return n_tok == 1 or self.prefill == "effort"

    def _cpu(self, x2: torch.Tensor, step: int) -> torch.Tensor:
        """x2 (T, n_in) on the CPU, of a step of ``step`` tokens -> (T, n_out) in the output
        dtype."""
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {PREFILLS}, got {self.prefill!r}")
        xn = x2.detach().to(torch.float32).contiguous().numpy()  # a view for float32
        e = self._effort if self._one_token_path(step) else 1.0
        y = self.inner(xn, e)  # the dense prefill at 1.0 for several tokens
        return torch.from_numpy(y).to(self._like.dtype)

    def _gpu(self, x2: torch.Tensor, step: int) -> torch.Tensor:
        """x2 (T, n_in) on the GPU, of a step of ``step`` tokens -> (T, n_out) in the output
        dtype."""
        if self._cuda is None or x2.device != self._cuda.device:
            raise BackendError(f"x is on {x2.device}: move the module there (module.to(x.device))")
        dt = self._like.dtype
        if not self._one_token_path(step):
            if self._w_dev is None:
                self._w_dev = torch.from_numpy(self.inner.dense()).to(x2.device, dt)
            return x2.to(dt) @ self._w_dev
        out = dt if dt in (torch.float32, x2.dtype) else torch.float32
        y = pyeffort.cuda.matmul(x2.contiguous(), self._cuda, self._effort_t, out_dtype=out)
        return y.to(dt)


@torch.compiler.disable
def _product(mod: EffortLinear, x2: torch.Tensor, step: int) -> torch.Tensor:
    """x2 (T, n_in) of a step of ``step`` tokens -> (T, n_out) in the module's dtype: the kernel
    call, a torch.compile graph break."""
    if x2.shape[0] == 0:
        return x2.new_zeros((0, mod.out_features), dtype=mod._like.dtype)
    if x2.is_cuda:
        import pyeffort.cuda  # noqa: F401  (torch with CUDA)

        return mod._gpu(x2, step)
    if x2.device.type != "cpu":
        raise BackendError(f"pyeffort.torch runs on CPU and CUDA tensors, not {x2.device.type}")
    return mod._cpu(x2, step)


# ------------------------------------------------------------ a module tree


def effort_linears(model: nn.Module) -> Iterator[EffortLinear]:
    """Every EffortLinear in ``model`` (itself included)."""
    return (m for m in model.modules() if isinstance(m, EffortLinear))


@contextlib.contextmanager
def effort(model: nn.Module, value: float):
    """Sets ``effort = value`` on every EffortLinear in ``model`` and restores each one's on
    exit."""
    value = _validate.effort(value)
    mods = list(effort_linears(model))
    before = [m.effort for m in mods]
    try:
        for m in mods:
            m.effort = value
        yield model
    finally:
        for m, e in zip(mods, before):
            m.effort = e


def set_effort(model: nn.Module, value: float) -> None:
    """Sets ``effort = value`` on every EffortLinear in ``model``."""
    value = _validate.effort(value)
    for m in effort_linears(model):
        m.effort = value


def realised_effort(model: nn.Module) -> float | None:
    """Multiplications done / those of dense products, over every EffortLinear in ``model``
    since ``reset_counters(model)`` (CPU calls; None before any)."""
    mods = list(effort_linears(model))
    total = sum(m.total for m in mods)
    return sum(m.mults for m in mods) / total if total else None


def reset_counters(model: nn.Module) -> None:
    for m in effort_linears(model):
        m.reset_counters()


# ------------------------------------------------------------ a mixture of experts


class Expert(nn.Module):
    """One SwiGLU expert: ``down(act(gate(x)) * up(x))``; its three linears (nn.Linear views
    of transformers' fused expert weights until ``patch`` swaps them) see the step's token
    count, so an expert's few rows of a prefill take the dense path."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.act_fn = act

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        h = self.act_fn(_call(self.gate_proj, x, step)) * _call(self.up_proj, x, step)
        return _call(self.down_proj, h, step)


def _call(lin: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    return lin(x, tokens=step) if isinstance(lin, EffortLinear) else lin(x)


class MoEExperts(nn.ModuleList):
    """In place of transformers' fused ``MixtralExperts``: the same call ``(hidden (T, dim),
    top_k_index (T, k), top_k_weights (T, k)) -> (T, dim)`` (the router, its top-k and its
    renormalisation stay transformers'), one ``Expert`` per expert. Only the routed experts
    are called: an unrouted one does no multiplication and is not counted."""

    @classmethod
    def from_fused(cls, fused: nn.Module) -> MoEExperts:
        """The experts of ``fused`` (``gate_up_proj`` (E, 2 * ffn, dim), ``down_proj``
        (E, dim, ffn)) as nn.Linear views of its weights (no copy)."""
        gu, down = _fused_weights(fused)
        n_ffn = down.shape[2]
        return cls(Expert(_view_linear(gu[e, :n_ffn]), _view_linear(gu[e, n_ffn:]),
                          _view_linear(down[e]), fused.act_fn)
                   for e in range(gu.shape[0]))  # fmt: skip

    def forward(self, hidden: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        step = hidden.shape[0]
        for e in torch.unique(top_k_index).tolist():  # the routed experts, each once
            tok, slot = torch.where(top_k_index == e)
            y = self[e](hidden[tok], step) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def _fused_weights(fused: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused``'s (gate_up_proj, down_proj), checked to be transformers 5's layout."""
    gu, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    ok = isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.ndim == 3
    ok = ok and down.ndim == 3 and gu.shape[0] == down.shape[0] and gu.shape[2] == down.shape[1]
    ok = ok and gu.shape[1] == 2 * down.shape[2] and not getattr(fused, "is_transposed", False)
    ok = ok and not getattr(fused, "has_bias", False) and getattr(fused, "is_concatenated", True)
    if not ok:
        raise ValueError(
            f"pyeffort.torch.patch needs transformers 5's fused Mixtral experts (gate_up_proj "
            f"(E, 2 * ffn, dim), down_proj (E, dim, ffn), no bias); got {type(fused).__name__}"
        )
    return gu.detach(), down.detach()


def _view_linear(w: torch.Tensor) -> nn.Linear:
    """An nn.Linear (no bias) whose weight is ``w`` (n_out, n_in) itself."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


# ------------------------------------------------------------ transformers models

SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}  # fmt: skip
MOE = {"mixtral"}  # families whose mlp is transformers' sparse MoE block (router + experts)
# transformers' name of a block's linear -> (its parent attribute, pyeffort's matrix name)
LINEARS = {
    "q_proj": ("self_attn", "attn.wq"),
    "k_proj": ("self_attn", "attn.wk"),
    "v_proj": ("self_attn", "attn.wv"),
    "o_proj": ("self_attn", "attn.wo"),
    "gate_proj": ("mlp", "ffn.w1"),
    "up_proj": ("mlp", "ffn.w3"),
    "down_proj": ("mlp", "ffn.w2"),
}


@dataclass
class PatchReport:
    """What ``patch`` did: the replaced modules (transformers names), the bytes of their buckets
    and of their dense weights (in the model's dtype), the shipped profile applied (its name) and
    whether the buckets were built with the shipped per-output weights."""

    replaced: list[str] = field(default_factory=list)
    bucket_bytes: int = 0
    dense_bytes: int = 0
    profile: str | None = None
    out_weights: bool = False


def patch(model, effort=1.0, modules=None, values="f16", progress=True, model_id="auto"):
    """Replace the linears of every decoder block of a transformers Llama / Mistral / Qwen2 /
    Mixtral causal LM by EffortLinears at ``effort`` (in place; the LM head, and Mixtral's
    router, stay dense). ``modules``: a subset of ``q_proj k_proj v_proj o_proj gate_proj
    up_proj down_proj`` (default: all; Mixtral's gate/up/down are each expert's, its fused
    experts become a ``MoEExperts``). ``model_id``: the model file name the shipped profiles are
    looked up by (``"auto"``: from ``model.config``; None: no profile); with one, the buckets
    are built with its per-output weights and, when all are replaced, efforts are split by its
    budget profile. Returns a PatchReport."""
    layers = _decoder_layers(model)
    short = _modules(modules)
    e = _validate.effort(effort)
    targets = _targets(layers)
    mid = _model_id(model) if model_id == "auto" else model_id
    weights = _shipped_out_weights(mid, layers, targets) if mid is not None else None
    chosen = [n for n, (_, s, _) in targets.items() if s in short]
    if model.config.model_type in MOE and short & {"gate_proj", "up_proj", "down_proj"}:
        for layer in layers:
            if not isinstance(layer.mlp.experts, MoEExperts):
                layer.mlp.experts = MoEExperts.from_fused(layer.mlp.experts)
    report = PatchReport(out_weights=weights is not None)
    new = {}
    for name in tqdm(chosen, desc="pyeffort: bucketing", disable=not progress):
        i, s, x = targets[name]
        parent = _parent(layers[i], s, x)
        lin = getattr(parent, s)
        a = None if weights is None else weights[name]
        new[name] = mod = EffortLinear.from_linear(lin, values, a, name)
        setattr(parent, s, mod)
        where = LINEARS[s][0] if x is None else f"mlp.experts.{x}"
        report.replaced.append(f"model.layers.{i}.{where}.{s}")
        report.bucket_bytes += mod.buckets.nbytes
        report.dense_bytes += lin.weight.numel() * lin.weight.element_size()
    if mid is not None and set(new) == set(targets):
        report.profile = _apply_profile(mid, new)
    for mod in new.values():
        mod.effort = e
    return report


def _decoder_layers(model) -> list[nn.Module]:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    supported = ", ".join(f"{v} ({k})" for k, v in SUPPORTED.items())
    if kind not in SUPPORTED:
        raise ValueError(
            f"pyeffort.torch.patch supports {supported}; got {type(model).__name__} "
            f"(model_type {kind!r})"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: pass the causal LM itself")
    return list(layers)


def _targets(layers) -> dict[str, tuple[int, str, int | None]]:
    """pyeffort's name of every matrix ``patch`` may replace -> (layer, transformers' name,
    expert or None), layer by layer: q k v o, then gate up down (of each expert in a MoE)."""
    out = {}
    for i, layer in enumerate(layers):
        for s, (parent, ours) in LINEARS.items():
            if parent == "self_attn" or not hasattr(layer.mlp, "experts"):
                out[f"layers.{i}.{ours}"] = (i, s, None)
        for x in range(_n_experts(layer)):
            for s in ("gate_proj", "up_proj", "down_proj"):
                out[f"layers.{i}.ffn.experts.{x}.{LINEARS[s][1][4:]}"] = (i, s, x)
    return out


def _n_experts(layer) -> int:
    experts = getattr(layer.mlp, "experts", None)
    if experts is None:
        return 0
    return len(experts) if isinstance(experts, MoEExperts) else _fused_weights(experts)[0].shape[0]


def _parent(layer, s: str, x: int | None) -> nn.Module:
    """The module holding transformers' linear ``s`` (of expert ``x``) after the experts were
    unfused."""
    return getattr(layer, LINEARS[s][0]) if x is None else layer.mlp.experts[x]


def _weight(layer, s: str, x: int | None) -> torch.Tensor:
    """The (n_out, n_in) weight of linear ``s`` (of expert ``x``), fused or not."""
    experts = layer.mlp.experts if x is not None else None
    if experts is None or isinstance(experts, MoEExperts):
        return getattr(_parent(layer, s, x), s).weight
    gu, down = _fused_weights(experts)
    n_ffn = down.shape[2]
    return {"gate_proj": gu[x, :n_ffn], "up_proj": gu[x, n_ffn:], "down_proj": down[x]}[s]


def _modules(modules) -> set[str]:
    if modules is None:
        return set(LINEARS)
    if isinstance(modules, str):
        modules = [modules]
    bad = sorted(set(modules) - set(LINEARS))
    if bad or not modules:
        raise ValueError(f"modules must be a non-empty subset of {list(LINEARS)}, got {bad}")
    return set(modules)


def _model_id(model) -> str | None:
    """The file name a shipped profile of this model would be found by: a GGUF with a shipped
    profile in the folder it was loaded from (transformers' GGUF loader keeps only the folder),
    else the name it was loaded by."""
    from pyeffort.models.profiles import FOLDER

    src = getattr(model.config, "_name_or_path", None) or getattr(model.config, "name_or_path", "")
    if not src:
        return None
    for prof in sorted(FOLDER.glob("*.json")):
        if (Path(src) / (prof.stem + ".gguf")).is_file():
            return prof.stem + ".gguf"
    return str(src)


def _shipped_out_weights(mid, layers, targets) -> dict[str, np.ndarray] | None:
    from pyeffort.models.profiles import out_weights

    shapes = {}
    for n, (i, s, x) in targets.items():
        w = _weight(layers[i], s, x)
        shapes[n] = (w.shape[1], w.shape[0])
    return out_weights.for_model(mid, shapes)


def _apply_profile(mid, mods: dict[str, EffortLinear]) -> str | None:
    """Split each asked effort between ``mods`` by the budget profile shipped for ``mid``
    (the same as ``pyeffort.models.Model.set_profile``); returns its name, or None."""
    from pyeffort.models.profiles import allocation

    found = allocation.shipped(mid)
    if found is None:
        return None
    prof = allocation.load(found)
    if set(prof["weights"]) != set(mods):
        return None
    names = list(mods)
    alloc = allocation.Allocation(names, [mods[n].in_features * mods[n].out_features
                                          for n in names], prof)  # fmt: skip
    for n, mod in mods.items():
        mod.set_split(lambda e, n=n: alloc.efforts(e)[n])
    return found.stem


__all__ = [
    "EffortLinear",
    "MoEExperts",
    "PatchReport",
    "effort",
    "effort_linears",
    "patch",
    "realised_effort",
    "reset_counters",
    "set_effort",
]
