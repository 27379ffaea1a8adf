"""Fuzzing the file formats: a bucket file (fp16 values, and q8), and a tiny converted model,
truncated at random
offsets, with random bit flips (header and data) and crafted headers. Each case loads the
damaged copy and runs one matmul (or one forward pass) in a subprocess, many cases a process:
a process that dies is a crash, named by its case.

Accidental damage (truncation, bit flips, edits that break a checksum) must give a FormatError
or, where the damage lies outside what is read (past a partial load's prefix), the undamaged
result. Crafted headers whose checksums are made to fit, and loads with ``verify=False``, may
load (a consistent forgery is a valid file) but never crash or raise anything but a pyeffort
error. ``PYEFFORT_FUZZ=N`` runs N cases of each base (default 120); run this file as a script
with ``worker CASES.json`` to be the subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

N_CASES = int(os.environ.get("PYEFFORT_FUZZ", "120"))
TOKENS = ["Infinity", "-Infinity", "NaN", "-1", "1e400", "1.5", "99999999999999999999", "0",
          "true", "null", "[]", "{}", '"x"', "[[[[1]]]]", str(2**63), str(2**31), str(2**32)]


# ---------------------------------------------------------------- cases (parent side)


def header_span(raw: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", raw[:8])
    return 8, 8 + n


def craft_header(raw: bytes, rng, fix_crc: bool) -> bytes:
    """A safetensors file with one value of its header replaced by a hostile token (or its
    length field set to a hostile number); ``fix_crc``: the header checksum recomputed."""
    from pyeffort import fileformat

    b, e = header_span(raw)
    if rng.random() < 0.1:
        sizes = [0, 1, 7, e - 8 + 1, len(raw), 2**63, 2**64 - 1]
        n = sizes[int(rng.integers(len(sizes)))]
        return struct.pack("<Q", n) + raw[8:]
    text = raw[b:e].decode().rstrip()
    spots = [m.span() for m in re.finditer(r'-?\d+|"[^"]*"', text)]
    s, t = spots[int(rng.integers(len(spots)))]
    old = text[s:t]
    if rng.random() < 0.3 and old.lstrip("-").isdigit():  # a near miss: n_out 40 -> 41
        token = str(int(old) + int(rng.choice([-16, -3, -1, 1, 3, 16])))
    elif rng.random() < 0.3 and old.startswith('"') and old[1:-1].isdigit():  # in a string
        token = f'"{int(old[1:-1]) + int(rng.choice([-7, -1, 1, 7]))}"'
    else:
        token = TOKENS[int(rng.integers(len(TOKENS)))]
    text = text[:s] + token + text[t:]
    if fix_crc:
        try:
            h = json.loads(text)
            h["__metadata__"]["crc32"] = fileformat.header_crc(h)
            text = json.dumps(h, separators=(",", ":"))
        except Exception:  # not JSON any more, or no metadata: leave it
            pass
    blob = text.encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + raw[e:]


def craft_manifest(raw: bytes, rng, fix_crc: bool) -> bytes:
    from pyeffort.models import convert as cv

    text = raw.decode()
    spots = [m.span() for m in re.finditer(r'-?\d+(\.\d+)?(e-?\d+)?|"[^"]*"|true|false', text)]
    s, t = spots[int(rng.integers(len(spots)))]
    text = text[:s] + TOKENS[int(rng.integers(len(TOKENS)))] + text[t:]
    if fix_crc:
        try:
            m = json.loads(text)
            m["crc32"] = cv._manifest_crc(m)
            text = json.dumps(m)
        except Exception:
            pass
    return text.encode()


def damage(raw: bytes, name: str, rng) -> tuple[bytes, str, bool]:
    """(damaged bytes, what was done, strict: must be refused or read as undamaged)."""
    kind = rng.random()
    if kind < 0.25:
        at = int(rng.integers(0, len(raw)))
        return raw[:at], f"truncate {name} at {at}", True
    if kind < 0.75:
        out = bytearray(raw)
        head = name.endswith(".safetensors") and rng.random() < 0.4
        lo, hi = header_span(raw) if head else (0, len(raw))
        at = int(rng.integers(lo, hi))
        bit = int(rng.integers(8))
        out[at] ^= 1 << bit
        return bytes(out), f"flip {name} byte {at} bit {bit}", True
    fix = rng.random() < 0.5
    if name.endswith(".safetensors"):
        return craft_header(raw, rng, fix), f"craft {name} header (crc fixed: {fix})", not fix
    if name.endswith(".json") and name.startswith("pyeffort_model"):
        return craft_manifest(raw, rng, fix), f"craft {name} (crc fixed: {fix})", not fix
    at = int(rng.integers(0, len(raw)))
    junk = bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    return raw[:at] + junk + raw[at:], f"insert 16 bytes in {name} at {at}", True


def make_cases(base: Path, kind: str, n: int, seed: int, tag: str = "") -> list[dict]:
    """n damaged copies of ``base`` (a bucket file or a model folder), written beside it;
    ``tag`` tells apart the cases of two bases of one kind."""
    rng = np.random.default_rng(seed)
    files = [base] if kind == "buckets" else sorted(p for p in base.iterdir() if p.is_file())
    cases = []
    for i in range(n):
        f = files[int(rng.integers(len(files)))]
        raw, what, strict = damage(f.read_bytes(), f.name, rng)
        verify = kind == "model" or rng.random() < 0.8
        fraction = float(rng.choice([1.0, 1.0, 0.5, 0.1]))
        blob = base.parent / f"case-{kind}{tag}-{i}.bin"
        blob.write_bytes(raw)
        cases.append({"id": f"{kind}{tag}#{i}", "kind": kind, "base": str(base), "file": f.name,
                      "blob": str(blob), "what": what, "strict": strict and verify,
                      "verify": verify, "fraction": fraction})  # fmt: skip
    return cases


def run_cases(cases: list[dict], work: Path) -> list[dict]:
    """Runs the cases in subprocesses, starting a new one after a crash; one result each."""
    results: dict[str, dict] = {}
    todo = list(cases)
    while todo:
        spec = work / "cases.json"
        spec.write_text(json.dumps(todo))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep
               + str(Path(__file__).resolve().parents[1])}  # fmt: skip
        r = subprocess.run([sys.executable, __file__, "worker", str(spec), str(work)], env=env,
                           capture_output=True, text=True, timeout=1200, check=False)  # fmt: skip
        for line in r.stdout.splitlines():
            if line.startswith("{"):
                res = json.loads(line)
                results[res["id"]] = res
        todo = [c for c in todo if c["id"] not in results]
        if todo:  # the first case without a result killed the process
            c = todo.pop(0)
            results[c["id"]] = {"id": c["id"], "outcome": "crash",
                                "detail": f"exit {r.returncode}: {r.stderr[-300:]}"}  # fmt: skip
    return [results[c["id"]] for c in cases]


# ---------------------------------------------------------------- the test


def tiny_model(root: Path) -> Path:
    from test_model_hf import write_tiny_mistral

    from pyeffort.models.convert import convert

    write_tiny_mistral(root / "hf", n_layers=1)
    return convert(root / "hf", root / "model", progress=False)


def bucket_file(root: Path, values: str = "f16") -> Path:
    import pyeffort

    w = np.random.default_rng(0).standard_normal((40, 40)).astype(np.float16)  # a padded group
    path = root / f"b-{values}.safetensors"
    a = np.linspace(0.5, 2, 40).astype(np.float32)
    pyeffort.build_buckets(w, a, values=values).save(path)
    return path


def summarise(cases, results) -> dict:
    out = dict.fromkeys(["crashes", "silent wrong", "clear errors", "undamaged results",
                         "other exceptions", "loaded (forged or unverified)"], 0)
    out["cases"] = len(results)
    bad = []
    for c, r in zip(cases, results):
        o = r["outcome"]
        if o == "crash":
            out["crashes"] += 1
            bad.append((c, r))
        elif o == "error":
            out["clear errors"] += 1
        elif o == "equal":
            out["undamaged results"] += 1
        elif o == "other":
            out["other exceptions"] += 1
            bad.append((c, r))
        elif c["strict"]:
            out["silent wrong"] += 1
            bad.append((c, r))
        else:
            out["loaded (forged or unverified)"] += 1
    return out, bad


def test_fuzz_file_formats(tmp_path):
    cases = make_cases(bucket_file(tmp_path), "buckets", N_CASES, seed=1)
    cases += make_cases(bucket_file(tmp_path, "q8"), "buckets", N_CASES, seed=3, tag="-q8")
    cases += make_cases(tiny_model(tmp_path), "model", N_CASES, seed=2)
    results = run_cases(cases, tmp_path)
    summary, bad = summarise(cases, results)
    print("\nfuzz:", json.dumps(summary))
    assert not bad, [(c["id"], c["what"], c["fraction"], r["outcome"], r.get("detail", "")[:300])
                     for c, r in bad[:10]]  # fmt: skip
    assert summary["clear errors"] > len(cases) // 2  # the damage really was damage


# ---------------------------------------------------------------- the worker (subprocess side)


def _load_and_run(kind: str, path: Path, fraction: float, verify: bool):
    import pyeffort
    from pyeffort.models.convert import load_converted

    kw = {} if verify else {"verify": False}  # (the default: older versions run it too)
    if kind == "buckets":
        b = pyeffort.load_buckets(path, fraction=fraction, **kw)
        x = np.linspace(-1, 1, b.n_in).astype(np.float32)
        return np.concatenate([pyeffort.matmul(x, b, e) for e in (0.3, 1.0)])
    return load_converted(path, fraction=fraction, **kw).forward([1, 5, 9])


def worker(spec: str, work: str) -> None:
    import pyeffort

    baselines: dict = {}
    for c in json.loads(Path(spec).read_text()):
        base, key = Path(c["base"]), (c["base"], c["fraction"], c["verify"])
        if key not in baselines:
            baselines[key] = _load_and_run(c["kind"], base, c["fraction"], c["verify"])
        target = Path(work) / "target" / base.name
        shutil.rmtree(target.parent, ignore_errors=True)
        if c["kind"] == "buckets":
            target.parent.mkdir()
            shutil.copy(c["blob"], target)
        else:
            shutil.copytree(base, target)
            shutil.copy(c["blob"], target / c["file"])
        try:
            y = _load_and_run(c["kind"], target, c["fraction"], c["verify"])
            same = y.shape == baselines[key].shape and np.array_equal(y, baselines[key])
            res = {"outcome": "equal" if same else "different"}
        except pyeffort.FormatError as exc:
            res = {"outcome": "error", "detail": str(exc)[:200]}
        except pyeffort.PyEffortError as exc:  # e.g. NonFiniteError from unverified data
            res = {"outcome": "error" if not c["strict"] else "other", "detail": repr(exc)[:200]}
        except Exception as exc:
            res = {"outcome": "other", "detail": repr(exc)[:300]}
        print(json.dumps({"id": c["id"], **res}), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], sys.argv[3])
