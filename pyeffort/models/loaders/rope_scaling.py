"""RoPE scaling as ``ModelArgs.rope_scaling`` from a config.json (``rope_scaling`` /
``rope_parameters``, read as transformers reads them) or from GGUF metadata (``{arch}.rope.
scaling.*`` and the ``rope_freqs`` tensor, read as llama.cpp reads them). Linear, Llama-3 and
YaRN are implemented (pyeffort.models.rope computes them); any other kind, key or value that
would change the computation is refused (ConfigError naming it)."""

from __future__ import annotations

import math
import numbers

from pyeffort.models.args import ConfigError

HF_ROPE_KEYS = ("rope_scaling", "rope_parameters")
COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
# the keys transformers reads for each rope_type
HF_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ------------------------------------------------------------ config.json


def from_hf_config(c: dict, max_positions: int) -> tuple[float, dict | None]:
    """config.json -> (rope_theta, rope_scaling or None); ``max_positions`` the context
    (``original_max_position_embeddings`` defaults to it, as in transformers)."""
    p = _hf_parameters(c)
    theta = p.get("rope_theta", c.get("rope_theta"))
    theta = 10000.0 if theta is None else theta
    kind = p.get("rope_type", p.get("type", "default"))
    if "type" in p and "rope_type" in p and p["type"] != p["rope_type"]:
        raise ConfigError(f"config.json: RoPE rope_type={p['rope_type']!r} but type={p['type']!r}")
    if kind not in HF_KEYS:
        raise ConfigError(
            f"config.json: RoPE scaling {kind!r} is not implemented by pyeffort "
            f"(only {', '.join(k for k in HF_KEYS if k != 'default')})"
        )
    extra = sorted(set(p) - COMMON - HF_KEYS[kind])
    if extra:
        raise ConfigError(
            f"config.json: RoPE scaling {kind!r} with {extra} is not implemented by pyeffort"
        )
    partial = p.get("partial_rotary_factor", 1.0)
    if isinstance(partial, bool) or partial != 1:
        raise ConfigError(
            f"config.json: partial_rotary_factor={p['partial_rotary_factor']!r} "
            "(rotary embedding on part of each head) is not implemented by pyeffort"
        )
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": _need(p, "factor", kind)}
    ctx = c.get("original_max_position_embeddings")  # transformers: the top level wins
    ctx = p.get("original_max_position_embeddings", max_positions) if ctx is None else ctx
    if kind == "llama3":
        return theta, {
            "type": "llama3",
            "factor": _need(p, "factor", kind),
            "low_freq_factor": _need(p, "low_freq_factor", kind),
            "high_freq_factor": _need(p, "high_freq_factor", kind),
            "original_context": ctx,
        }
    return theta, _hf_yarn(p, ctx, max_positions)


def _hf_parameters(c: dict) -> dict:
    """The RoPE parameters object: ``rope_scaling`` if set, else ``rope_parameters`` (as
    transformers 5); {} if neither."""
    found = {}
    for key in HF_ROPE_KEYS:
        p = c.get(key)
        if p is None:
            continue
        if not isinstance(p, dict):
            raise ConfigError(f"config.json: {key} must be an object, got {p!r}")
        found[key] = p
    if len(found) == 2 and _scaling_part(found["rope_scaling"]) != _scaling_part(
        found["rope_parameters"]
    ):
        raise ConfigError(
            "config.json: rope_scaling and rope_parameters differ: "
            f"{found['rope_scaling']!r} vs {found['rope_parameters']!r}"
        )
    return found.get("rope_scaling") or found.get("rope_parameters") or {}


def _scaling_part(p: dict) -> dict:
    return {k: v for k, v in p.items() if k not in ("rope_theta", "type")}


def _hf_yarn(p: dict, ctx, max_positions: int) -> dict:
    """transformers' ``_compute_yarn_parameters``: the factor (or context / original context),
    the attention factor (given, or from mscale / mscale_all_dim), beta_fast / beta_slow."""
    factor = p.get("factor")
    if factor is None:
        factor = max_positions / _number(ctx, "original_max_position_embeddings", "yarn")
    factor = _number(factor, "factor", "yarn")
    att = p.get("attention_factor")
    if att is None:
        m, m_all = (p.get(k) for k in ("mscale", "mscale_all_dim"))
        if m and m_all:
            m, m_all = _number(m, "mscale", "yarn"), _number(m_all, "mscale_all_dim", "yarn")
            att = yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
        else:
            att = yarn_mscale(factor)
    return {
        "type": "yarn",
        "factor": factor,
        "original_context": ctx,
        "beta_fast": p.get("beta_fast") or 32.0,
        "beta_slow": p.get("beta_slow") or 1.0,
        "attention_factor": att,
        "truncate": p.get("truncate", True),
    }


def _need(p: dict, key: str, kind: str):
    if p.get(key) is None:
        raise ConfigError(f"config.json: RoPE scaling {kind!r} lacks {key!r}")
    return p[key]


def _number(v, key: str, kind: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"config.json: RoPE scaling {kind!r}: {key}={v!r} is not a number > 0")
    return float(v)


# ------------------------------------------------------------ GGUF

GGUF_READ = {
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
    "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow",
}
# keys llama.cpp reads that pyeffort implements at their neutral value only
GGUF_NEUTRAL = {
    "rope.scaling.attn_factor": 1.0,
    "rope.scaling.yarn_attn_factor": 1.0,
    "rope.scaling.yarn_ext_factor": 1.0,
    "rope.scaling.yarn_log_multiplier": 0.0,
}


def from_gguf(field, arch: str, context: int, freqs) -> dict | None:
    """GGUF metadata -> rope_scaling or None. ``field(key, default)`` reads ``{arch}.{key}``;
    ``freqs`` the ``rope_freqs`` tensor's values (Llama 3.1's per-frequency divisors) or None;
    ``context`` the model's (llama.cpp's default original context)."""
    for key, neutral in GGUF_NEUTRAL.items():
        v = field(key, neutral)
        if v != neutral:
            raise ConfigError(
                f"GGUF {arch}.{key}={v!r} is not implemented by pyeffort (only {neutral})"
            )
    kind = field("rope.scaling.type", "linear")  # llama.cpp: a factor alone is linear
    factor = field("rope.scaling.factor", 0.0) or field("rope.scale_linear", 0.0) or 1.0
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not factor > 0:
        raise ConfigError(f"GGUF {arch}.rope.scaling.factor={factor!r} is not a number > 0")
    factor = float(factor)
    if freqs is not None:
        if kind not in ("none", "linear") or factor != 1.0:
            raise ConfigError(
                f"GGUF rope_freqs with {arch}.rope.scaling.type={kind!r}, factor "
                f"{factor}: not implemented by pyeffort"
            )
        return {"type": "freq_factors", "factors": [float(f) for f in freqs]}
    if kind in ("none", "linear"):
        return None if factor == 1.0 else {"type": "linear", "factor": factor}
    if kind != "yarn":
        raise ConfigError(
            f"GGUF {arch}.rope.scaling.type={kind!r}: not implemented by pyeffort "
            "(none, linear, yarn)"
        )
    return {
        "type": "yarn",
        "factor": factor,
        "original_context": field("rope.scaling.original_context_length", context),
        "beta_fast": field("rope.scaling.yarn_beta_fast", 32.0),
        "beta_slow": field("rope.scaling.yarn_beta_slow", 1.0),
        "attention_factor": yarn_mscale(factor),
        "truncate": True,
    }
