"""The converted model: a folder written atomically, streaming one layer at a time.

Layout (format ``pyeffort``, version 1, kind ``model``):
- ``pyeffort_model.json``: format, version, kind, config (ModelArgs), files;
- ``main.safetensors``: ``embed`` (vocab, dim) F16, ``norm`` F32, ``lm_head`` (dim, vocab) F16 if
  not tied; metadata format/version/kind=model and the config JSON;
- ``layers.{i:03d}.safetensors``: the 7 matrices of layer i as Buckets under the prefix
  ``layers.{i}.attn.wq.`` ... (see pyeffort.buckets) and the two norms;
- the tokenizer (tokenizer.json or tokenizer.model, and pyeffort_tokenizer.json).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

import pyeffort
from pyeffort import buckets as bk
from pyeffort import fileformat, reference
from pyeffort.errors import FormatError
from pyeffort.models.args import ModelArgs
from pyeffort.models.loaders import matrix_names, open_source, plain_names
from pyeffort.models.tokenizer import Tokenizer

MANIFEST = "pyeffort_model.json"
FORMAT, VERSION = "pyeffort", 1


def is_converted(path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).exists()


def matrix_shape(args: ModelArgs, name: str) -> tuple[int, int]:
    q, kv, d, h = (
        args.n_heads * args.head_dim,
        args.n_kv_heads * args.head_dim,
        args.dim,
        args.hidden_dim,
    )
    kind = name.rsplit(".", 1)[1]
    return {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w1": (d, h), "w3": (d, h), "w2": (h, d)}[kind]  # fmt: skip


def bucket_specs(prefix: str, n_in: int, n_out: int, get) -> list[fileformat.TensorSpec]:
    """Specs of the Buckets of an (n_in, n_out) matrix, announced before it is built; ``get()``
    returns the Buckets when the writer asks for the first of its tensors."""
    g, rows = reference.n_groups(n_out), bk.N_RANKS * n_in
    shapes = {
        "values": (np.float16, (rows, g)),
        "positions": (np.uint8, (rows, (g + 1) // 2)),
        "stats": (np.float32, (bk.N_RANKS, n_in)),
        "order": (np.int32, (bk.N_RANKS, n_in)),
    }
    return [
        fileformat.TensorSpec(prefix + k, np.dtype(dt), shp, lambda k=k: getattr(get(), k))
        for k, (dt, shp) in shapes.items()
    ]


def bucket_meta(prefix: str, n_in: int, n_out: int, stat: str = bk.STAT) -> dict[str, str]:
    return {
        prefix + "n_in": str(n_in),
        prefix + "n_out": str(n_out),
        prefix + "stat": stat,
        prefix + "source_dtype": "float32",
    }


def _plain_spec(src, name: str, dtype) -> fileformat.TensorSpec:
    shape = _plain_shape(src.args, name)

    def produce():
        a = np.ascontiguousarray(src.get(name), dtype=dtype)
        if not np.isfinite(a).all():
            raise FormatError(f"{name}: not finite in {dtype} (overflow?)")
        return a

    return fileformat.TensorSpec(name, np.dtype(dtype), shape, produce)


def _plain_shape(a: ModelArgs, name: str) -> tuple[int, ...]:
    return {"embed": (a.vocab_size, a.dim), "lm_head": (a.dim, a.vocab_size)}.get(name, (a.dim,))


def out_weights_for(src_path, args: ModelArgs, out_weights="auto") -> dict:
    """Per-output weights to build each matrix with (``pyeffort.build_buckets(W, a)``):
    ``"auto"`` the ones shipped for this model (pyeffort/quality/profiles), if any and if they
    fit its matrices; ``None`` none (the plain RMS build); or a dict ``{matrix name: (n_out,)}``
    (matrices it does not name are built plain)."""
    if out_weights is None:
        return {}
    if isinstance(out_weights, str):
        if out_weights != "auto":
            raise ValueError(f"out_weights must be 'auto', None or a dict, got {out_weights!r}")
        from pyeffort.quality import out_weights as ow

        shapes = {n: matrix_shape(args, n) for n in matrix_names(args)}
        return ow.for_model(src_path, shapes) or {}
    return dict(out_weights)


def convert(
    src_path, dst, *, progress: bool = True, overwrite: bool = False, out_weights="auto"
) -> Path:
    """Convert a GGUF file or Hugging Face folder into a pyeffort model folder at ``dst``
    (``out_weights``: see ``out_weights_for``; by default the weights shipped for the model)."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (use overwrite)")
    src = open_source(src_path)
    args = src.args
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(args.__dict__)}
    weights = out_weights_for(src_path, args, out_weights)
    plan = _plan(src, weights)  # [(file name, specs, metadata, built buckets to free)]
    total = sum(s.nbytes for _, specs, _, _ in plan for s in specs)
    bar = _bar(total, f"converting {Path(src_path).name}", progress)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fileformat.remove_stale_temporaries(dst.parent)
    tmp = fileformat.temp_path(dst)
    os.mkdir(tmp, 0o777)  # the umask applies, as to any new folder
    try:
        for fname, specs, fmeta, built in plan:
            fileformat.write(
                tmp / fname, specs, {**meta, **fmeta}, progress=lambda s: bar.update(s.nbytes)
            )
            built.clear()  # this layer's Buckets are on disk: free them
        src.tokenizer.save(tmp)
        manifest = {"format": FORMAT, "version": VERSION, "kind": "model", "config": args.__dict__,
                    "files": [p[0] for p in plan], "source": Path(src_path).name}  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if dst.exists():
            old = fileformat.temp_path(dst)  # removed by the next conversion if this one dies
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return dst


def _plan(src, weights: dict):
    args = src.args
    main = [_plain_spec(src, "embed", np.float16), _plain_spec(src, "norm", np.float32)]
    if not args.tie_embeddings:
        main.append(_plain_spec(src, "lm_head", np.float16))
    plan = [("main.safetensors", main, {"kind": "model"}, {})]
    mats = matrix_names(args)
    for i in range(args.n_layers):
        names = [m for m in mats if m.startswith(f"layers.{i}.")]
        built: dict = {}

        def get_layer(names=names, built=built):  # this layer's Buckets, built on first use
            if not built:
                for n in names:
                    built[n] = pyeffort.build_buckets(src.get(n), weights.get(n))
            return built

        specs, fmeta = [], {"kind": "model-layer", "layer": str(i)}
        for n in names:
            n_in, n_out = matrix_shape(args, n)
            specs += bucket_specs(n + ".", n_in, n_out, lambda n=n, g=get_layer: g()[n])
            stat = bk.STAT_OUT_WEIGHTED if n in weights else bk.STAT
            fmeta.update(bucket_meta(n + ".", n_in, n_out, stat))
        norms = [p for p in plain_names(args) if p.startswith(f"layers.{i}.")]
        specs += [_plain_spec(src, p, np.float32) for p in norms]
        plan.append((f"layers.{i:03d}.safetensors", specs, fmeta, built))
    return plan


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path) -> dict:
    path = Path(path)
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not a pyeffort model folder ({exc})") from exc
    if m.get("format") != FORMAT or m.get("kind") != "model":
        raise FormatError(f"{path}: not a pyeffort model (format={m.get('format')!r})")
    if m.get("version") != VERSION:
        raise FormatError(f"{path}: model format version {m.get('version')!r} is not supported "
                          f"(this pyeffort reads version {VERSION})")  # fmt: skip
    return m


def load_converted(path, fraction: float = 1.0):
    """A converted model folder -> Model; ``fraction < 1`` maps only that fraction of every
    matrix's bucket rows (the most important ones)."""
    from pyeffort.models.llama import Model

    path = Path(path)
    m = read_manifest(path)
    args = ModelArgs.from_dict(m["config"])
    w: dict = {}
    for fname in m["files"]:
        r = fileformat.Reader(path / fname)
        bk.check_version(r)
        for name in r.tensors:
            if "." not in name or name.startswith("layers.") and name.count(".") == 2:
                w[name] = r.array(name)  # embed, norm, lm_head, layer norms
        for key in r.metadata:
            if key.endswith(".n_in"):
                prefix = key[: -len("n_in")]
                w[prefix[:-1]] = bk.read_buckets(r, prefix, fraction)
    missing = [n for n in matrix_names(args) + plain_names(args) if n not in w]
    if missing:
        raise FormatError(f"{path}: missing tensors {missing[:3]}...")
    return Model(args, w, Tokenizer.load(path))
