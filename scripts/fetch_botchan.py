"""Botchan (Natsume Soseki, English translation, public domain): the evaluation text of
docs/RESULTS.md, as shipped in the ``sentencepiece==0.2.3`` source distribution. Fetched once
with ``pip download`` (the sdist only, never built or installed) and cached.

    python scripts/fetch_botchan.py botchan.txt      # then: pyeffort eval --text botchan.txt
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "sentencepiece==0.2.3"
MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
SIZE = 278779  # bytes of botchan.txt as shipped


def cached(cache: Path | None = None) -> Path:
    """The path of botchan.txt in the cache (``$PYEFFORT_CACHE`` or ``~/.cache/pyeffort``),
    downloading the sdist on first use. RuntimeError when no package index is reachable."""
    from pyeffort.models.default import cache_dir

    path = (cache or cache_dir()) / "botchan.txt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        # the sdist of sentencepiece only: its build requirements come as wheels
        cmd += ["--no-binary", "sentencepiece", SDIST]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            err = getattr(exc, "stderr", b"") or b""
            raise RuntimeError(f"could not download {SDIST}: {err.decode()[-500:]}") from exc
        (sdist,) = Path(tmp).glob("sentencepiece-*.tar.gz")
        with tarfile.open(sdist) as tar:
            data = tar.extractfile(MEMBER).read()
    if len(data) != SIZE:
        raise RuntimeError(f"{MEMBER} in {sdist.name} has {len(data)} bytes, expected {SIZE}")
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.replace(path)
    return path


def botchan(cache: Path | None = None) -> str:
    """The text of botchan.txt."""
    return cached(cache).read_text(encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="copy botchan.txt here (default: print its path)")
    args = p.parse_args(argv)
    try:
        path = cached()
    except RuntimeError as exc:
        print(f"fetch_botchan: {exc}", file=sys.stderr)
        return 1
    if args.out:
        part = Path(args.out + ".part")
        shutil.copyfile(path, part)
        part.replace(args.out)
        path = Path(args.out)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
