"""The command line never shows a traceback for a user error: one line
``pyeffort COMMAND: error: ...`` on stderr and exit code 2. Options out of range are refused,
not reinterpreted; the model's context is enforced."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_model_hf import write_tiny_mistral

from pyeffort.models.convert import MANIFEST, _manifest_crc, convert

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A converted tiny Llama (tokenizer.json), context 256 tokens."""
    root = tmp_path_factory.mktemp("cli-errors")
    write_tiny_mistral(root / "hf", llama=True, chat_template=TEMPLATE)
    return convert(root / "hf", root / "conv", progress=False)


def cli(*args, pre: str = ""):
    """``python -m pyeffort ARGS`` (``pre``: Python run first, in the same process)."""
    env = {**os.environ, "PYEFFORT_CACHE": "/nonexistent-pyeffort-cache"}
    code = f"{pre}\nimport sys\nfrom pyeffort.cli import main\nsys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, check=False,
                          text=True, timeout=120, env=env)  # fmt: skip


def user_error(r, command: str, *words: str) -> str:
    """Asserts r ended with exactly one line of stderr naming the problem; -> that line."""
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"pyeffort {command}: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def copy_model(tiny, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny, dst)
    return dst


def test_prompt_with_invalid_utf8(tiny):
    env = {**os.environ, "PYEFFORT_CACHE": "/nonexistent-pyeffort-cache"}
    r = subprocess.run([sys.executable, "-m", "pyeffort", "generate", b"the \xff\xfe cat",
                        "--model", str(tiny)], capture_output=True, text=True, env=env)  # fmt: skip
    user_error(r, "generate", "UTF-8")


def test_converted_model_without_tokenizer_json(tiny, tmp_path):
    m = copy_model(tiny, tmp_path)
    (m / "tokenizer.json").unlink()
    user_error(cli("generate", "x", "--model", str(m)), "generate", "tokenizer.json")


def test_hf_folder_without_tokenizer(tmp_path):
    write_tiny_mistral(tmp_path, llama=True)
    (tmp_path / "tokenizer.json").unlink()
    user_error(cli("generate", "x", "--model", str(tmp_path)), "generate", "tokenizer.json")


@pytest.mark.parametrize(
    "change, word",
    [
        ({"n_kv_heads": 0}, "n_kv_heads"),
        ({"norm_eps": "abc"}, "norm_eps"),
        ({"n_heads": 3}, "multiple of n_kv_heads"),
        ({"rope_scaling": {"type": "ntk", "factor": 2}}, "rope_scaling"),  # not implemented
    ],
)
def test_converted_config_is_checked(tiny, tmp_path, change, word):
    m = copy_model(tiny, tmp_path)
    man = json.loads((m / MANIFEST).read_text())
    man["config"].update(change)
    man["crc32"] = _manifest_crc(man)  # a crafted manifest: its checksum made to fit
    (m / MANIFEST).write_text(json.dumps(man))
    user_error(cli("generate", "x", "--model", str(m)), "generate", word)


@pytest.mark.parametrize(
    "change, word",
    [({"num_key_value_heads": 0}, "n_kv_heads"), ({"rms_norm_eps": "abc"}, "norm_eps"),
     ({"attention_bias": True}, "attention_bias")],
)  # fmt: skip
def test_hf_config_is_checked(tmp_path, change, word):
    cfg = write_tiny_mistral(tmp_path, llama=True)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    user_error(cli("info", str(tmp_path)), "info", word)


def test_manifest_that_is_a_list(tiny, tmp_path):
    m = copy_model(tiny, tmp_path)
    (m / MANIFEST).write_text("[]")
    user_error(cli("generate", "x", "--model", str(m)), "generate", MANIFEST)
    user_error(cli("info", str(m)), "info", MANIFEST)


@pytest.mark.parametrize("module", ["tokenizers", "jinja2"])
def test_missing_model_extras_give_an_install_hint(tiny, module):
    r = cli("generate", "x", "--model", str(tiny), "--max-tokens", "2",
            pre=f"import sys; sys.modules[{module!r}] = None")  # fmt: skip
    user_error(r, "generate", module, "pip install 'pyeffort[model]'")
    if module == "jinja2":  # the template needs it; --raw does not, chat does
        r = cli("generate", "x", "--model", str(tiny), "--max-tokens", "2", "--raw",
                pre="import sys; sys.modules['jinja2'] = None")  # fmt: skip
        assert r.returncode == 0, r.stderr
        pre = "import sys, io; sys.modules['jinja2'] = None; sys.stdin = io.StringIO('hi\\n')"
        r = cli("chat", "--model", str(tiny), "--no-keys", pre=pre)
        user_error(r, "chat", module, "pip install 'pyeffort[model]'")


def test_missing_gguf_package(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    r = cli("info", str(tmp_path / "m.gguf"), pre="import sys; sys.modules['gguf'] = None")
    user_error(r, "info", "gguf", "pyeffort[model]")


@pytest.mark.parametrize(
    "option, value",
    [
        ("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"),
        ("--top-p", "0"), ("--top-p", "2"), ("--top-p", "nan"),
        ("--load-fraction", "0"), ("--load-fraction", "1.5"),
        ("--effort", "0.001"), ("--effort", "0"), ("--effort", "nan"), ("--effort", "1.5"),
        ("--prefill-effort", "0"), ("--max-tokens", "0"), ("--max-tokens", "-3"),
        ("--threads", "0"), ("--seed", "-1"),
    ],
)  # fmt: skip
def test_options_out_of_range_are_refused(tiny, option, value):
    r = cli("generate", "x", "--model", str(tiny), option, value)
    user_error(r, "generate", option)


@pytest.mark.parametrize(
    "option, value, words",
    [("--top-k", "-1", "at least 0"), ("--top-k", "1.5", "not an integer"),
     ("--min-p", "-0.1", "[0, 1]"), ("--min-p", "1.5", "[0, 1]"), ("--min-p", "nan", "finite")],
)  # fmt: skip
def test_sampling_filters_out_of_range_are_refused(tiny, option, value, words):
    r = cli("generate", "x", "--model", str(tiny), option, value)
    user_error(r, "generate", f"argument {option}: ", words)


def test_prompt_sources_are_checked(tiny, tmp_path):
    model = ("--model", str(tiny))
    missing = tmp_path / "missing.txt"
    user_error(cli("generate", "--prompt-file", str(missing), *model), "generate",
               f"--prompt-file {missing}", "No such file")  # fmt: skip
    (tmp_path / "bad.txt").write_bytes(b"the \xff\xfe cat")
    user_error(cli("generate", "-f", str(tmp_path / "bad.txt"), *model), "generate",
               "bad.txt is not valid UTF-8")  # fmt: skip
    user_error(cli("generate", *model), "generate", "give a prompt")
    user_error(cli("generate", "x", "-f", str(tmp_path / "bad.txt"), *model), "generate",
               "one of them")  # fmt: skip
    user_error(cli("generate", "x", "--raw", "--system-prompt", "s", *model), "generate",
               "--system-prompt needs the chat template")  # fmt: skip


def test_bench_options_are_checked(tiny):
    user_error(cli("bench", "--model", str(tiny), "--efforts", "1,nan"), "bench", "--efforts")
    user_error(cli("bench", "--model", str(tiny), "--rounds", "0"), "bench", "--rounds")


def test_context_is_enforced_on_the_command_line(tiny):
    from pyeffort.models import load

    tok = load(tiny).tokenizer
    long = "the cat sat on the mat " * 60
    assert len(tok.encode(long)) > 256
    r = cli("generate", long, "--model", str(tiny), "--raw")
    line = user_error(r, "generate", "256")
    assert str(len(tok.encode(long))) in line
    words = "the cat sat on the mat".split() * 60
    k = next(k for k in range(len(words)) if len(tok.encode(" ".join(words[:k]))) > 100)
    prompt = " ".join(words[:k])
    n = len(tok.encode(prompt))  # about 100: 200 tokens do not fit after it
    r = cli("generate", prompt, "--model", str(tiny), "--max-tokens", "200", "--no-keys", "--raw")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "warning" in r.stderr and f"at most {256 - n} tokens" in r.stderr
    assert int(r.stderr.rsplit("[", 1)[1].split()[0]) <= 256 - n  # "[N tokens; ..."


def test_chat_refuses_a_turn_that_does_not_fit(tiny):
    from argparse import Namespace

    from pyeffort.models import load
    from pyeffort.models.chat import Chat
    from pyeffort.models.generate import ContextError
    from pyeffort.models.keys import EffortDial

    chat = Chat(load(tiny))
    opts = Namespace(max_tokens=500, prefill_effort=1.0, temperature=0.0, top_k=0, top_p=1.0,
                     min_p=0.0, seed=None)  # fmt: skip
    dial = EffortDial(1.0, keys=False)
    with pytest.raises(ContextError, match="256"):
        chat.reply("the cat sat on the mat " * 60, dial, opts, out=open(os.devnull, "w"))
    assert chat.messages == []
    _, st = chat.reply("the cat", dial, opts, out=open(os.devnull, "w"))
    assert len(chat.cached) <= 256 and st.generated <= 256


def test_chat_line_with_invalid_utf8(tiny):
    env = {**os.environ, "PYEFFORT_CACHE": "/nonexistent-pyeffort-cache"}
    r = subprocess.run([sys.executable, "-m", "pyeffort", "chat", "--model", str(tiny),
                        "--max-tokens", "3"], input=b"\xff\xfe\nthe cat\n/quit\n",
                       capture_output=True, env=env, timeout=120)  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "not valid UTF-8" in err and "realised" in err
