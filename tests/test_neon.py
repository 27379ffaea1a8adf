"""The NEON kernels, cross-compiled for arm64 and run under qemu (tests/neon/run.sh). Skipped
only where the cross tools are missing and this is not CI (CI=true must run it)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).parent / "neon" / "run.sh"


def test_neon_kernels_match_scalar_under_qemu():
    tools = shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")
    in_ci = os.environ.get("CI", "").lower() == "true"
    if not tools and not in_ci:
        pytest.skip(
            "aarch64-linux-gnu-gcc / qemu-aarch64 not installed (apt-get install "
            "gcc-aarch64-linux-gnu qemu-user)"
        )
    out = subprocess.run(
        ["bash", str(RUN)], capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK: neon vs scalar, 0 failures" in out.stdout
