"""The ``pyeffort`` command line on the tiny random Mistral: generate, convert, info, bench,
chat (``/effort`` between turns), and effort keys read from a terminal (a pty)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import numpy as np
import pytest
from test_model_hf import write_tiny_mistral

from pyeffort.models import load
from pyeffort.models.convert import convert
from pyeffort.models.generate import Stats, generate
from pyeffort.models.keys import EffortDial


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_tiny_mistral(root / "hf")
    return convert(root / "hf", root / "conv", progress=False)


def cli(*args, **kw):
    env = {**os.environ, "PYEFFORT_CACHE": "/nonexistent-pyeffort-cache"}
    return subprocess.run([sys.executable, "-m", "pyeffort", *args], capture_output=True, check=False,
                          text=True, timeout=120, env=env, **kw)  # fmt: skip


def test_generate_streams_and_reports(tiny):
    r = cli("generate", "the cat sat", "--model", str(tiny), "--effort", "0.4",
            "--max-tokens", "12", "--seed", "1", "--temperature", "0.8", "--top-p", "0.9")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "tokens/s" in r.stderr and "realised 0.4" in r.stderr


def test_greedy_cli_equals_library(tiny):
    r = cli("generate", "the cat sat", "--model", str(tiny), "--max-tokens", "10",
            "--temperature", "0")  # fmt: skip
    m = load(tiny)
    ids = list(generate(m, m.tokenizer.encode("the cat sat"), max_tokens=10))
    assert r.stdout.rstrip("\n") == m.tokenizer.decode(ids)


def test_convert_info_bench(tiny, tmp_path):
    hf = tiny.parent / "hf"
    r = cli("convert", str(hf), str(tmp_path / "m"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("info", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "format version 2" in r.stdout and "layers.1.ffn.w2" in r.stdout
    assert "(128, 64) buckets, f16 values, 2.500 bytes per multiplication" in r.stdout
    assert "values f16: 2.500 bytes per multiplication" in r.stdout
    r = cli("bench", "--model", str(tiny), "--efforts", "1,0.5", "--tokens", "4", "--rounds", "2")
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.strip().startswith(("1.00", "0.50"))]
    assert [row[0] for row in rows] == ["1.00", "0.50"] and "median of 2 rounds" in r.stdout
    for row in rows:  # realised effort, median tokens/s inside its range
        lo, hi = map(float, row[4].split("-"))
        assert abs(float(row[1]) - float(row[0])) < 0.05 and lo <= float(row[2]) <= hi
    r = cli("bench", "--model", str(tiny), "--rounds", "0")
    assert r.returncode == 2 and "--rounds" in r.stderr


def test_bad_input_is_a_clear_error(tiny, tmp_path):
    r = cli("generate", "x", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "error" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", "x", "--model", str(tiny), "--effort", "1.5")
    assert r.returncode == 2 and "effort" in r.stderr


def test_key_press_changes_effort_on_the_next_token(tiny):
    m = load(tiny)
    master, slave = pty.openpty()
    try:
        st = Stats()
        with EffortDial(0.5, fd=slave, stream=open(os.devnull, "w")) as dial:
            gen = generate(m, m.tokenizer.encode("the dog"), max_tokens=8, effort=dial, stop=[],
                           stats=st)  # fmt: skip
            for i, _ in enumerate(gen):
                if i == 2:
                    os.write(master, b"+")
                if i == 4:
                    os.write(master, b"--")
    finally:
        os.close(master)
        os.close(slave)
    assert st.efforts == [0.5, 0.5, 0.55, 0.55, 0.45, 0.45, 0.45]


class Terminal:
    """Reads a pty master up to a marker, keeping whatever came after it for the next read."""

    def __init__(self, fd: int):
        self.fd, self.pending = fd, ""

    def read_until(self, marker: str, timeout: float = 60.0) -> str:
        end = time.time() + timeout
        while marker not in self.pending:
            if time.time() > end:
                raise AssertionError(f"no {marker!r} in {self.pending!r}")
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.pending += os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        i = self.pending.index(marker) + len(marker)
        out, self.pending = self.pending[:i], self.pending[i:]
        return out


def test_chat_in_a_terminal(tiny):
    """chat on a pty: a turn, /effort between turns, keys typed during the reply."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYEFFORT_CACHE": "/nonexistent-pyeffort-cache"}
    p = subprocess.Popen([sys.executable, "-m", "pyeffort", "chat", "--model", str(tiny),
                          "--max-tokens", "40", "--effort", "0.5"],
                         stdin=slave, stdout=slave, stderr=slave, env=env)  # fmt: skip
    os.close(slave)
    term = Terminal(master)
    try:
        term.read_until("> ")
        os.write(master, b"the cat\n")
        out = term.read_until("realised")
        assert "effort asked 0.500" in out
        term.read_until("> ")
        os.write(master, b"/effort 0.2\n")
        assert "[effort 0.20]" in term.read_until("> ")
        os.write(master, b"the dog\n---")  # the keys arrive while it answers
        out = term.read_until("realised")
        asked = float(out.split("effort asked ")[1].split(",")[0])
        assert 0.05 <= asked < 0.2
        os.write(master, b"/quit\n")
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


def test_dial_rejects_bad_effort():
    with pytest.raises(ValueError):
        EffortDial(0.0, keys=False)
    d = EffortDial(0.1, keys=False)
    for _ in range(5):
        d.press("-")
    assert d.value == pytest.approx(0.05) and np.isfinite(d())
