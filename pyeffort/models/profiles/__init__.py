"""What pyeffort ships per model, next to the model code that applies it: the budget split
between matrices (``allocation``: ``MODEL.json``) and the per-output weights of the build
(``out_weights``: ``MODEL.out_weights.safetensors``), both calibrated offline
(``experiments/quality/``) and looked up by the model file's name.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent

# other names of a shipped model: the default model converted into the cache
ALIASES = {"SmolLM2-135M-Instruct-Q4_1": "SmolLM2-135M-Instruct.Q4_1"}


def shipped(model_id, suffix: str) -> Path | None:
    """The file ``<model name><suffix>`` shipped for a model file (or converted folder) of that
    name, if any."""
    stem = Path(str(model_id).rstrip("/")).stem
    path = FOLDER / (ALIASES.get(stem, stem) + suffix)
    return path if path.exists() else None
