"""The ``pyeffort`` command line on the tiny random Mistral: generate, convert, info, bench,
chat (``/effort`` between turns), and effort keys read from a terminal (a pty); the options
users of mlx_lm.generate and llama-cli expect (the chat template by default, sampling filters,
the prompt from stdin or a file, --json, --ignore-eos, --quiet, --version)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
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


# ------------------------------------------------------------ sampling: top-k, top-p, min-p


def test_each_filter_on_hand_made_logits():
    from pyeffort.models.generate import candidates

    p = np.array([0.05, 0.4, 0.1, 0.25, 0.2])  # most likely first: 1, 3, 4, 2, 0
    logits = np.log(p) + 3.0  # a shift changes nothing
    assert candidates(logits).tolist() == [1, 3, 4, 2, 0]
    assert candidates(logits, top_k=2).tolist() == [1, 3]
    assert candidates(logits, top_k=9).tolist() == [1, 3, 4, 2, 0]
    assert candidates(logits, top_p=0.4).tolist() == [1]  # 0.4 reaches 0.4
    assert candidates(logits, top_p=0.6).tolist() == [1, 3]  # 0.65 >= 0.6
    assert candidates(logits, top_p=0.66).tolist() == [1, 3, 4]
    assert candidates(logits, min_p=0.5).tolist() == [1, 3, 4]  # p >= 0.2
    assert candidates(logits, min_p=0.51).tolist() == [1, 3]
    assert candidates(logits, min_p=1.0).tolist() == [1]


def test_filters_apply_in_order_then_temperature():
    """top-k renormalises before top-p; top-p before min-p; the temperature never widens the
    cut (it applies to the survivors, as llama.cpp and mlx_lm)."""
    from pyeffort.models.generate import candidates, sample

    logits = np.log(np.array([0.05, 0.4, 0.1, 0.25, 0.2]))
    # top-k 2 leaves 0.4 / 0.65 = 0.615 and 0.385: top-p 0.6 then keeps token 1 alone
    assert candidates(logits, top_k=2, top_p=0.6).tolist() == [1]
    # top-p 0.9 keeps 1, 3, 4, 2 (0.95); min-p 0.5 of what is left keeps p >= 0.2
    assert candidates(logits, top_p=0.9, min_p=0.5).tolist() == [1, 3, 4]
    rng = np.random.default_rng(0)
    draws = {sample(logits, 50.0, 0.6, rng, top_k=3) for _ in range(200)}
    assert draws == {1, 3}  # a hot temperature: both survivors drawn, nothing else
    draws = {sample(logits, 50.0, 1.0, rng, min_p=0.55) for _ in range(100)}
    assert draws == {1, 3}
    assert sample(logits, 0.0, 1.0, rng, top_k=1) == 1


@pytest.mark.parametrize("kw", [{"top_k": -1}, {"top_k": 1.5}, {"min_p": -0.1}, {"min_p": 1.5},
                                {"min_p": float("nan")}])  # fmt: skip
def test_generate_refuses_bad_filters(tiny, kw):
    m = load(tiny)
    with pytest.raises(ValueError, match=next(iter(kw))):
        next(generate(m, [1, 2], max_tokens=2, **kw))


def test_cli_top_k_1_and_min_p_1_are_greedy(tiny):
    base = ("generate", "the cat sat", "--model", str(tiny), "--max-tokens", "10", "--no-keys")
    greedy = cli(*base).stdout
    for cut in (["--top-k", "1"], ["--min-p", "1"]):
        r = cli(*base, "--temperature", "5", "--seed", "3", *cut)
        assert r.returncode == 0 and r.stdout == greedy, r.stderr


# ------------------------------------------------------------ prompt, JSON, EOS, progress, version


def test_prompt_from_stdin_and_from_a_file(tiny, tmp_path):
    base = ("--model", str(tiny), "--max-tokens", "8", "--json")
    want = json.loads(cli("generate", "the cat sat", *base).stdout)
    r = cli("generate", "-", *base, input="the cat sat\n")  # one final newline dropped
    assert r.returncode == 0 and json.loads(r.stdout) == {**want, **timings(r)}, r.stderr
    (tmp_path / "p.txt").write_text("the cat sat\n")
    r = cli("generate", "--prompt-file", str(tmp_path / "p.txt"), *base)
    assert r.returncode == 0 and json.loads(r.stdout) == {**want, **timings(r)}, r.stderr
    r = cli("generate", "-", *base, input="the cat sat\n\n")  # only one
    assert json.loads(r.stdout)["prompt_tokens"] > want["prompt_tokens"]


def timings(r) -> dict:
    d = json.loads(r.stdout)
    return {k: d[k] for k in ("prefill_s", "decode_tokens_per_s")}


def test_json_holds_the_text_and_its_stats(tiny):
    r = cli("generate", "the cat sat", "--model", str(tiny), "--max-tokens", "12",
            "--effort", "0.5", "--ignore-eos", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)  # the whole of stdout is one JSON object
    m = load(tiny)
    ids = m.tokenizer.encode("the cat sat")
    st = Stats()
    text = m.tokenizer.decode(generate(m, ids, max_tokens=12, effort=0.5, stop=[], stats=st))
    assert d["text"] == text and d["tokens"] == 12 and d["finish_reason"] == "length"
    assert d["prompt_tokens"] == len(ids) and d["decode_tokens_per_s"] > 0
    assert d["effort"] == 0.5 and abs(d["realised_effort"] - st.realised) < 1e-9
    assert "tokens/s" not in r.stderr  # the stats are in the JSON


def test_ignore_eos_goes_on_to_max_tokens(tiny, tmp_path):
    """A copy of the model whose end-of-sequence token is the first one it answers."""
    from pyeffort.models.convert import MANIFEST, _file_crc, _manifest_crc
    from pyeffort.models.tokenizer import CONFIG

    m = load(tiny)
    first = next(generate(m, m.tokenizer.encode("the cat sat"), max_tokens=1))
    dst = tmp_path / "m"
    shutil.copytree(tiny, dst)
    cfg = json.loads((dst / CONFIG).read_text())
    (dst / CONFIG).write_text(json.dumps({**cfg, "eos_ids": [int(first)]}))
    man = json.loads((dst / MANIFEST).read_text())
    man["checksums"][CONFIG] = _file_crc(dst / CONFIG)
    man["crc32"] = _manifest_crc(man)
    (dst / MANIFEST).write_text(json.dumps(man))
    base = ("generate", "the cat sat", "--model", str(dst), "--max-tokens", "9", "--json")
    d = json.loads(cli(*base).stdout)
    assert d["tokens"] == 1 and d["finish_reason"] == "stop"
    d = json.loads(cli(*base, "--ignore-eos").stdout)
    assert d["tokens"] == 9 and d["finish_reason"] == "length"


def test_bench_json(tiny):
    r = cli("bench", "--model", str(tiny), "--efforts", "1,0.5", "--tokens", "4", "--rounds", "1",
            "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [row["effort"] for row in d["rows"]] == [1.0, 0.5] and d["tokens"] == 4
    for row in d["rows"]:
        assert abs(row["realised_effort"] - row["effort"]) < 0.05 and row["tokens_per_s"] > 0


def test_no_progress_frames_in_pipes(tiny, tmp_path):
    """stdout and stderr are pipes: no ``\\r`` frames; --quiet also drops the stats line."""
    hf = tiny.parent / "hf"
    runs = [("generate", "the cat", "--model", str(tiny), "--max-tokens", "3"),
            ("generate", "the cat", "--model", str(hf), "--max-tokens", "3"),  # bucketed here
            ("convert", str(hf), str(tmp_path / "c")),
            ("bench", "--model", str(tiny), "--tokens", "2", "--rounds", "1")]  # fmt: skip
    for args in runs:
        r = cli(*args)
        assert r.returncode == 0 and "\r" not in r.stderr + r.stdout, (args, r.stderr)
    r = cli(*runs[0], "--quiet")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.strip()
    r = cli("chat", "--model", str(tiny), "--max-tokens", "3", "-q", input="the cat\n")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_progress_on_a_terminal_unless_asked(tiny):
    def stderr_on_a_pty(*extra):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # tqdm: 80 cols
        env = {**os.environ, "PYEFFORT_CACHE": "/nonexistent-pyeffort-cache"}
        p = subprocess.Popen([sys.executable, "-m", "pyeffort", "generate", "the cat", "--model",
                              str(tiny), "--max-tokens", "2", "--no-keys", *extra],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                             env=env)  # fmt: skip
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the pty
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
        assert p.wait(timeout=60) == 0
        return out.decode("utf-8", "replace")

    assert "preparing kernels" in stderr_on_a_pty()
    for flag in ("--no-progress", "--quiet"):
        assert "preparing kernels" not in stderr_on_a_pty(flag)


def test_every_command_takes_quiet_and_no_progress():
    from pyeffort.cli import parser

    p = parser()
    commands = p._subparsers._group_actions[0].choices
    assert {"generate", "chat", "convert", "info", "bench", "eval"} <= set(commands)
    for name, sub in commands.items():
        flags = {s for a in sub._actions for s in a.option_strings}
        assert {"--quiet", "--no-progress"} <= flags, name


def test_version_from_the_package_metadata():
    from importlib.metadata import version

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pyeffort {version('pyeffort')}"


# ------------------------------------------------------------ the chat template by default

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-chat")
    write_tiny_mistral(root / "hf", llama=True, chat_template=TEMPLATE)
    return convert(root / "hf", root / "conv", progress=False)


def test_generate_applies_the_chat_template(tiny_chat):
    m = load(tiny_chat)
    tok = m.tokenizer

    def text(ids):
        return tok.decode(generate(m, ids, max_tokens=8, stop=[]))

    user = {"role": "user", "content": "the cat"}
    system = {"role": "system", "content": "be brief"}
    base = ("generate", "the cat", "--model", str(tiny_chat), "--max-tokens", "8",
            "--ignore-eos", "--json")  # fmt: skip
    cases = [((), tok.chat_prompt([user])), (("--raw",), tok.encode("the cat")),
             (("--system-prompt", "be brief"), tok.chat_prompt([system, user]))]  # fmt: skip
    assert len({tuple(ids) for _, ids in cases}) == 3
    for extra, ids in cases:
        d = json.loads(cli(*base, *extra).stdout)
        assert d["prompt_tokens"] == len(ids) and d["text"] == text(ids), extra


@pytest.mark.slow
def test_the_default_instruct_model_answers_a_question():
    from pyeffort.models.default import default_gguf

    try:
        default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    r = subprocess.run([sys.executable, "-m", "pyeffort", "generate",
                        "What is the capital of France?", "--max-tokens", "12"],
                       capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
