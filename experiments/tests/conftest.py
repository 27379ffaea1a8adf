"""The experiments import each other as scripts do (``python experiments/quality/X.py`` puts
their folder first on sys.path): the tests do the same."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
for folder in ("quality", "model"):
    sys.path.insert(0, str(ROOT / folder))
