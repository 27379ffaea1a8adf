"""Llama / Mistral / Qwen2 models with effort: load, convert, generate.

>>> from pyeffort import models  # doctest: +SKIP
>>> m = models.load("path/to/converted-or-gguf-or-hf")  # doctest: +SKIP
>>> logits = m.forward([1, 2, 3], 0, effort=0.5)  # (3, vocab) float32  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from pyeffort.models.args import CONFIGS, ModelArgs, config
from pyeffort.models.effort_linear import EffortLinear
from pyeffort.models.llama import Model


def load(path=None, *, fraction: float = 1.0, progress: bool = False, out_weights="auto") -> Model:
    """A Model (with ``.tokenizer``) from a converted folder, a GGUF file or a Hugging Face
    folder (the last two are bucketed in memory; convert once to load fast). ``path=None``: the
    default model (SmolLM2-135M-Instruct), converted into the cache on first use.
    ``out_weights`` (GGUF / Hugging Face only; a converted folder is built already): the
    per-output weights of the build, ``"auto"`` those shipped for the model, ``None`` none."""
    from pyeffort.models.convert import is_converted, load_converted

    if path is None:
        from pyeffort.models.default import default_model_path

        path = default_model_path(progress=progress)
    if is_converted(path):
        if not (isinstance(out_weights, str) and out_weights == "auto"):
            raise ValueError("out_weights applies to a build: a converted folder is built already")
        model = load_converted(path, fraction)
    elif fraction != 1.0:
        raise ValueError("a partial load needs a converted model (pyeffort convert)")
    else:
        model = from_source(path, progress=progress, out_weights=out_weights)
    use_shipped_profile(model, path)
    return model


def use_shipped_profile(model: Model, path) -> bool:
    """Apply the budget profile calibrated for this model and shipped with pyeffort, if there
    is one whose matrix names match the model's. Returns whether one was applied."""
    from pyeffort.models.profiles import allocation

    found = allocation.shipped(path)
    if found is None:
        return False
    prof = allocation.load(found)
    if set(prof["weights"]) != {lin.name for lin in model.linears()}:
        return False
    model.set_profile(prof)
    return True


def from_source(path, progress: bool = False, out_weights="auto") -> Model:
    """Bucket a GGUF file or Hugging Face folder in memory (``out_weights``: the per-output
    weights of the build, by default those shipped for the model; see convert.out_weights_for)."""
    from tqdm import tqdm

    import pyeffort
    from pyeffort.models.convert import out_weights_for
    from pyeffort.models.loaders import matrix_names, open_source, plain_names

    src = open_source(path)
    weights = out_weights_for(path, src.args, out_weights)
    w = {n: src.get(n) for n in plain_names(src.args)}
    for n in tqdm(
        matrix_names(src.args), desc=f"bucketing {Path(path).name}", disable=not progress
    ):
        w[n] = pyeffort.build_buckets(src.get(n), weights.get(n))
    return Model(src.args, w, src.tokenizer)


__all__ = [
    "CONFIGS",
    "EffortLinear",
    "Model",
    "ModelArgs",
    "config",
    "from_source",
    "load",
    "use_shipped_profile",
]
