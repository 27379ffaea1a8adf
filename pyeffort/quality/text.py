"""The evaluation text: Botchan (Natsume Soseki, English translation, public domain), as shipped
in the ``sentencepiece==0.2.3`` source distribution, fetched once with pip and cached."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

SDIST = "sentencepiece==0.2.3"
MEMBER = "sentencepiece-0.2.3/test/botchan.txt"


def cache_dir() -> Path:
    """``$PYEFFORT_CACHE``, else ``$XDG_CACHE_HOME/pyeffort``, else ``~/.cache/pyeffort``."""
    if os.environ.get("PYEFFORT_CACHE"):
        return Path(os.environ["PYEFFORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pyeffort"


def botchan(cache: Path | None = None) -> str:
    """The text of botchan.txt; downloads the sdist with ``pip download`` on first use."""
    path = (cache or cache_dir()) / "botchan.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",  # the sdist of sentencepiece only: its build requirements
                "sentencepiece",  # come as wheels (":all:" compiled cmake from source: ~10 min)
                "-q",
                "-d",
                tmp,
                SDIST,
            ]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=600)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                err = getattr(exc, "stderr", b"") or b""
                raise RuntimeError(f"could not download {SDIST}: {err.decode()[-500:]}") from exc
            (sdist,) = Path(tmp).glob("sentencepiece-*.tar.gz")
            with tarfile.open(sdist) as tar:
                data = tar.extractfile(MEMBER).read()
        part = path.with_suffix(".part")
        part.write_bytes(data)
        part.replace(path)
    return path.read_text(encoding="utf-8")


def windows(ids, n_windows: int, length: int, start: int = 0) -> np.ndarray:
    """(n_windows, length) int64: consecutive non-overlapping windows from token ``start`` on."""
    ids = np.asarray(ids, dtype=np.int64)
    need = start + n_windows * length
    if need > len(ids):
        raise ValueError(
            f"{n_windows} windows of {length} from {start} need {need} tokens; "
            f"the text has {len(ids)}"
        )
    return ids[start:need].reshape(n_windows, length)


def split(ids, n_windows: int, length: int, n_calib: int, calib_length: int):
    """Evaluation windows from the start of the text, calibration windows from its second half
    (disjoint: the calibration text is never evaluated)."""
    ev = windows(ids, n_windows, length, 0)
    half = max(len(ids) // 2, n_windows * length)
    cal = windows(ids, n_calib, calib_length, half)
    return ev, cal
