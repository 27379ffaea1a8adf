"""The converted model: a folder written atomically, streaming one layer at a time.

Layout (format ``pyeffort``, version 2, kind ``model``):
- ``pyeffort_model.json``: format, version, kind, config (ModelArgs), files, values (the
  matrices' value kind, ``f16`` or ``q8``; version 1, still read, has fp16 values and no key);
- ``main.safetensors``: ``embed`` (vocab, dim) F16, ``norm`` F32, ``lm_head`` (dim, vocab) F16 if
  not tied; metadata format/version/kind=model and the config JSON;
- ``layers.{i:03d}.safetensors``: the 7 matrices of layer i as Buckets under the prefix
  ``layers.{i}.attn.wq.`` ... (see pyeffort.buckets), the two norms and the q/k/v biases
  (F32) when the config has them; in a mixture of experts the 4 attention matrices, 3 per expert
  (``layers.{i}.ffn.experts.{e}.w1.`` ...) and the F32 router, each expert read from the source
  alone (the peak is about one layer's buckets);
- every safetensors file carries the manifest's version (a bucket file version);
- the tokenizer (tokenizer.json or tokenizer.model, and pyeffort_tokenizer.json).

The manifest also holds ``checksums`` (CRC32 of each tokenizer file) and ``crc32`` (of the
manifest's canonical JSON less that key); the safetensors files carry their own (see
pyeffort.fileformat). Loading checks that the files, layers, tensors and shapes are exactly
those the config names, and that the config agrees with main.safetensors'. The folder is
written as a temporary beside ``dst`` (``fileformat.temp_path``) and renamed; stale ones of
killed conversions are removed by the next conversion into that parent folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np

import pyeffort
from pyeffort import buckets as bk
from pyeffort import _validate, fileformat, reference
from pyeffort.errors import FormatError
from pyeffort.models.args import ModelArgs, tensor_shape
from pyeffort.models.loaders import matrix_names, open_source, plain_names
from pyeffort.models.tokenizer import Tokenizer

MANIFEST = "pyeffort_model.json"
FORMAT, VERSION = "pyeffort", bk.VERSION
VERSIONS = (1, 2)  # manifest versions this pyeffort reads (1: fp16 values only)


def is_converted(path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).exists()


def bucket_specs(
    prefix: str, n_in: int, n_out: int, get, values: str = bk.F16
) -> list[fileformat.TensorSpec]:
    """Specs of the Buckets of an (n_in, n_out) matrix with ``values`` of that kind, announced
    before it is built; ``get()`` returns the Buckets when the writer asks for the first of its
    tensors."""
    g, rows = reference.n_groups(n_out), bk.N_RANKS * n_in
    shapes = {
        "values": (np.int8 if values == bk.Q8 else np.float16, (rows, g)),
        "positions": (np.uint8, (rows, (g + 1) // 2)),
        "stats": (np.float32, (bk.N_RANKS, n_in)),
        "order": (np.int32, (bk.N_RANKS, n_in)),
    }
    if values == bk.Q8:
        shapes["scales"] = (np.float16, (rows // reference.TIER, reference.n_chunks(g)))
    return [
        fileformat.TensorSpec(prefix + k, np.dtype(dt), shp, lambda k=k: getattr(get(), k))
        for k, (dt, shp) in shapes.items()
    ]


def bucket_meta(
    prefix: str, n_in: int, n_out: int, stat: str = bk.STAT, values: str = bk.F16
) -> dict[str, str]:
    return {
        prefix + "n_in": str(n_in),
        prefix + "n_out": str(n_out),
        prefix + "stat": stat,
        prefix + "source_dtype": "float32",
        prefix + "values": values,
    }


def _plain_spec(src, name: str, dtype) -> fileformat.TensorSpec:
    shape = tensor_shape(src.args, name)

    def produce():
        a = np.ascontiguousarray(src.get(name), dtype=dtype)
        if not np.isfinite(a).all():
            raise FormatError(f"{name}: not finite in {dtype} (overflow?)")
        return a

    return fileformat.TensorSpec(name, np.dtype(dtype), shape, produce)


def out_weights_for(src_path, args: ModelArgs, out_weights="auto") -> dict:
    """Per-output weights to build each matrix with (``pyeffort.build_buckets(W, a)``):
    ``"auto"`` the ones shipped for this model (pyeffort/models/profiles), if any and if they
    fit its matrices; ``None`` none (the plain RMS build); or a dict ``{matrix name: (n_out,)}``
    (matrices it does not name are built plain)."""
    if out_weights is None:
        return {}
    if isinstance(out_weights, str):
        if out_weights != "auto":
            raise ValueError(f"out_weights must be 'auto', None or a dict, got {out_weights!r}")
        from pyeffort.models.profiles import out_weights as ow

        shapes = {n: tensor_shape(args, n) for n in matrix_names(args)}
        return ow.for_model(src_path, shapes) or {}
    return dict(out_weights)


def convert(
    src_path, dst, *, progress: bool = True, overwrite: bool = False, out_weights="auto",
    values: str = bk.F16,
) -> Path:  # fmt: skip
    """Convert a GGUF file or Hugging Face folder into a pyeffort model folder at ``dst``
    (``out_weights``: see ``out_weights_for``; by default the weights shipped for the model;
    ``values``: the matrices' value kind, ``"f16"`` or ``"q8"``, as in ``build_buckets``).
    Tensor-parallel shards: pyeffort.models.tensor_parallel.convert_tp."""
    values = bk.check_values(values)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (use overwrite)")
    src = open_source(src_path)
    weights = out_weights_for(src_path, src.args, out_weights)
    return write_model(src, Path(src_path).name, dst, weights, values, progress)


def write_model(
    src, source: str, dst: Path, weights: dict, values: str, progress: bool, tp: dict | None = None
) -> Path:
    """Writes the converted folder of ``src`` (a source, see pyeffort.models.loaders) at ``dst``
    atomically, replacing one there; ``tp``: a tensor-parallel shard's ``{"rank", "size", ...}``,
    kept in the manifest and as ``tp_rank`` / ``tp_size`` in every file's metadata."""
    args = src.args
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(args.__dict__)}
    if tp is not None:
        meta.update(tp_rank=str(tp["rank"]), tp_size=str(tp["size"]))
    plan = _plan(src, weights, values)  # [(file name, specs, metadata, built buckets to free)]
    total = sum(s.nbytes for _, specs, _, _ in plan for s in specs)
    bar = _bar(total, f"converting {source}", progress)
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
                    "files": [p[0] for p in plan], "source": source,
                    "values": values}  # fmt: skip
        if tp is not None:
            manifest["tp"] = tp
        manifest["checksums"] = {p.name: _file_crc(p) for p in sorted(tmp.iterdir())
                                 if p.suffix != ".safetensors"}  # fmt: skip
        manifest["crc32"] = _manifest_crc(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        fileformat.fsync_dir(tmp)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return dst


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Renames the finished folder ``tmp`` to ``dst``; an old ``dst`` is first renamed to a
    temporary name (which the next conversion removes if this process dies first)."""
    if dst.exists():
        old = fileformat.temp_path(dst)
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
    fileformat.fsync_dir(dst.parent)


def _file_crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(2**16):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _manifest_crc(m: dict) -> str:
    canon = json.dumps({k: v for k, v in m.items() if k != "crc32"}, sort_keys=True)
    return f"{zlib.crc32(canon.encode()):08x}"


def _plan(src, weights: dict, values: str):
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
                    built[n] = pyeffort.build_buckets(src.get(n), weights.get(n), values=values)
            return built

        specs, fmeta = [], {"kind": "model-layer", "layer": str(i)}
        for n in names:
            n_in, n_out = tensor_shape(args, n)
            specs += bucket_specs(n + ".", n_in, n_out, lambda n=n, g=get_layer: g()[n], values)
            stat = bk.STAT_OUT_WEIGHTED if n in weights else bk.STAT
            fmeta.update(bucket_meta(n + ".", n_in, n_out, stat, values))
        norms = [p for p in plain_names(args) if p.startswith(f"layers.{i}.")]
        specs += [_plain_spec(src, p, np.float32) for p in norms]
        plan.append((f"layers.{i:03d}.safetensors", specs, fmeta, built))
    return plan


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def read_manifest(path, verify: bool = True) -> dict:
    """The manifest of a converted folder, checked (its checksum too when ``verify``)."""
    path = Path(path)
    try:
        f = fileformat.open_regular(path / MANIFEST)
    except FormatError as exc:
        raise FormatError(f"{path}: not a pyeffort model folder ({exc})") from exc
    with f:
        if os.fstat(f.fileno()).st_size > fileformat.MAX_HEADER:
            raise FormatError(f"{path}: manifest too large")
        m = fileformat.parse_json(f.read(), path / MANIFEST, floats=True)
    if not isinstance(m, dict):
        raise FormatError(f"{path}: {MANIFEST} is not a JSON object")
    if m.get("format") != FORMAT or m.get("kind") != "model":
        raise FormatError(f"{path}: not a pyeffort model manifest (format={m.get('format')!r})")
    if m.get("version") not in VERSIONS or isinstance(m.get("version"), bool):
        raise FormatError(f"{path}: model format version {m.get('version')!r} is not supported "
                          f"(this pyeffort reads versions {VERSIONS})")  # fmt: skip
    if verify and "crc32" in m and m["crc32"] != _manifest_crc(m):
        raise FormatError(f"{path}: manifest checksum mismatch (the manifest is damaged)")
    if verify and "crc32" not in m and "checksums" in m:
        raise FormatError(f"{path}: manifest checksum missing")
    if not isinstance(m.get("config"), dict) or not isinstance(m.get("files"), list):
        raise FormatError(f"{path}: manifest lacks its config or files")
    if not isinstance(m.get("checksums", {}), dict):
        raise FormatError(f"{path}: manifest checksums are malformed")
    values_kind(path, m)
    return m


def values_kind(path, m: dict) -> str:
    """The value kind of a (checked) manifest's matrices: version 1 is f16, version 2 names it."""
    kind = m.get("values")
    if m["version"] == 1:
        if kind is not None:
            raise FormatError(f"{path}: a version-1 manifest names values={kind!r}")
        return bk.F16
    if not isinstance(kind, str) or kind not in bk.VALUE_KINDS:
        raise FormatError(f"{path}: manifest values={kind!r} is not one of {bk.VALUE_KINDS}")
    return kind


def model_args(path, cfg: dict) -> ModelArgs:
    """ModelArgs from a stored config, FormatError unless every field has its type and sizes
    are positive."""
    kinds = {f.name: type(f.default) for f in fields(ModelArgs) if f.default is not None}
    for k, v in cfg.items():
        if k not in kinds:  # unknown (from_dict refuses it), or checked by ModelArgs itself
            continue
        want = (int, float) if kinds[k] is float else kinds[k]
        good = isinstance(v, want) and (kinds[k] is bool or not isinstance(v, bool))
        if good and isinstance(v, (int, float)) and not isinstance(v, bool):
            low = 1 if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                             "vocab_size", "max_seq_len") else 0  # fmt: skip
            good = math.isfinite(v) and low <= v < 2**31 and (kinds[k] is float or v == int(v))
        if not good:
            raise FormatError(f"{path}: config {k}={v!r} is not a valid {kinds[k].__name__}")
    try:
        return ModelArgs.from_dict(cfg)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise FormatError(f"{path}: config is not valid ({exc})") from exc


def expected_files(args: ModelArgs) -> list[str]:
    return ["main.safetensors"] + [f"layers.{i:03d}.safetensors" for i in range(args.n_layers)]


def load_converted(path, fraction: float = 1.0, verify: bool = True):
    """A converted model folder -> Model; ``fraction < 1`` maps only that fraction of every
    matrix's bucket rows (the most important ones). ``verify`` (default) checks the checksums
    and the data of what is mapped (see ``pyeffort.load_buckets``); False trusts them. The
    structure is always checked: FormatError names what does not fit."""
    from pyeffort.models.llama import Model

    path = Path(path)
    m = read_manifest(path, verify)
    args = model_args(path, m["config"])
    if m["files"] != expected_files(args):
        raise FormatError(f"{path}: files {m['files'][:3]}... do not fit n_layers={args.n_layers}")
    if verify:
        for fname, crc in m.get("checksums", {}).items():
            if Path(fname).name != fname or not isinstance(crc, str):
                raise FormatError(f"{path}: manifest checksum entry {fname!r} is malformed")
            try:
                ok = _file_crc(path / fname) == crc
            except OSError as exc:
                raise FormatError(f"{path}: cannot read {fname} ({exc})") from exc
            if not ok:
                raise FormatError(f"{path}: checksum mismatch in {fname} (damaged)")
    def read(i: int, fname: str) -> dict:
        with fileformat.Reader(path / fname, verify=verify) as r:
            _check_file(r, i - 1, m)
            return _read_file(r, fraction)

    w: dict = {}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # checks release the GIL
        for part in pool.map(read, range(len(m["files"])), m["files"]):
            w.update(part)
    _check_weights(path, args, w, verify, values_kind(path, m))
    return Model(args, w, Tokenizer.load(path))


def _check_file(r: fileformat.Reader, layer: int, m: dict) -> None:
    """A model file's metadata: the manifest's version, kind, its layer (-1: main.safetensors,
    whose config must be the manifest's), and tensor names of that layer only."""
    bk.check_version(r)
    if r.metadata.get("version") != str(m["version"]):
        raise FormatError(f"{r.path}: version {r.metadata.get('version')!r} in a version "
                          f"{m['version']} model")  # fmt: skip
    config = m["config"]
    kind = "model" if layer < 0 else "model-layer"
    if r.metadata.get("kind") != kind or layer >= 0 and r.metadata.get("layer") != str(layer):
        raise FormatError(f"{r.path}: not the {kind} file of layer {layer}")
    if layer < 0 and "config" in r.metadata:
        if fileformat.parse_json(r.metadata["config"].encode(), r.path, floats=True) != config:
            raise FormatError(f"{r.path}: its config differs from the manifest's")
    own = f"layers.{layer}." if layer >= 0 else None
    for name in r.tensors:
        if (own is None) == name.startswith("layers.") or own and not name.startswith(own):
            raise FormatError(f"{r.path}: tensor {name!r} does not belong in this file")


def _read_file(r: fileformat.Reader, fraction: float) -> dict:
    w: dict = {}
    prefixes = [key[: -len("n_in")] for key in r.metadata if key.endswith(".n_in")]
    for prefix in prefixes:
        w[prefix[:-1]] = bk.read_buckets(r, prefix, fraction)
    for name in r.tensors:
        if not any(name.startswith(p) for p in prefixes):
            w[name] = r.array(name)  # embed, norm, lm_head, layer norms and biases
    return w


def _check_weights(path: Path, args: ModelArgs, w: dict, verify: bool, kind: str) -> None:
    """Exactly the tensors the config names, each of its shape and dtype (finite if verify),
    the matrices of the manifest's value kind."""
    want = set(matrix_names(args)) | set(plain_names(args))
    if set(w) != want:
        missing, extra = sorted(want - set(w)), sorted(set(w) - want)
        raise FormatError(f"{path}: missing tensors {missing[:3]}, unexpected {extra[:3]}")
    for n in matrix_names(args):
        if w[n].shape != tensor_shape(args, n):
            raise FormatError(f"{path}: {n} is {w[n].shape}, expected {tensor_shape(args, n)}")
        if w[n].values_kind != kind:
            raise FormatError(f"{path}: {n} has {w[n].values_kind} values, the manifest {kind}")
    for n in plain_names(args):
        shape = tensor_shape(args, n)
        dtype = np.float16 if n in ("embed", "lm_head") else np.float32
        if w[n].shape != shape or w[n].dtype != dtype:
            raise FormatError(f"{path}: {n} is {w[n].dtype}{list(w[n].shape)}, "
                              f"expected {np.dtype(dtype)}{list(shape)}")  # fmt: skip
        if verify and not _validate.all_finite(w[n]):
            raise FormatError(f"{path}: {n} holds NaN or Inf")
