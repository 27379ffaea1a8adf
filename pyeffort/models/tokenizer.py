"""Tokenizer: a ``tokenizers`` (BPE, tokenizer.json) or ``sentencepiece`` (tokenizer.model)
tokenizer with the model's special ids and chat template, saved beside a converted model.

A chat template comes from a model file, so it is untrusted code: it is rendered in jinja2's
immutable sandbox with the globals and filters transformers gives templates (raise_exception,
strftime_now, a tojson that keeps key order, loop controls, namespace), never a plain
Environment (CVE-2024-34359 was llama-cpp-python's template running shell commands)."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from pyeffort.errors import FormatError, PyEffortError

CONFIG = "pyeffort_tokenizer.json"
FILES = {"tokenizers": "tokenizer.json", "sentencepiece": "tokenizer.model"}


class ChatTemplateError(PyEffortError, ValueError):
    """A model's chat template failed, refused the conversation, or tried an unsafe operation."""


class Tokenizer:
    def __init__(self, impl, kind: str, bos_id=None, eos_ids=(), add_bos=False, chat_template=None):
        self.impl, self.kind = impl, kind  # kind: "tokenizers" or "sentencepiece"
        self.bos_id = bos_id
        self.eos_ids = [int(i) for i in eos_ids]
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template

    # ------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if self.kind == "sentencepiece":
            ids = list(self.impl.encode(text))
        else:
            ids = list(self.impl.encode(text, add_special_tokens=False).ids)
        bos = self.add_bos if add_bos is None else add_bos
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self.impl.decode(ids)
        return self.impl.decode(ids, skip_special_tokens=True)

    def token_text(self, i: int) -> str:
        if self.kind == "sentencepiece":
            return self.impl.id_to_piece(int(i))
        return self.impl.id_to_token(int(i)) or ""

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self.impl.get_piece_size()
        return self.impl.get_vocab_size()

    # ------------------------------------------------------------ chat

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` formatted by the model's chat template, ready to answer."""
        text = self.format_chat(messages)
        ids = self.encode(text, add_bos=False)
        bos = self.bos_id
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def format_chat(self, messages: list[dict]) -> str:
        """``messages`` in the model's chat template (ChatML when the model has none)."""
        if not self.chat_template:
            return chatml(messages)
        bos = self.token_text(self.bos_id) if self.bos_id is not None else ""
        eos = self.token_text(self.eos_ids[0]) if self.eos_ids else ""
        return render_chat_template(self.chat_template, messages=messages,
                                    add_generation_prompt=True, bos_token=bos, eos_token=eos)  # fmt: skip

    def check_chat_template(self) -> None:
        """Compiles the chat template, if any: ChatTemplateError if it does not compile,
        ModuleNotFoundError if jinja2 is missing."""
        if self.chat_template:
            _compile(self.chat_template)

    # ------------------------------------------------------------ files

    def save(self, folder) -> None:
        folder = Path(folder)
        if self.kind == "sentencepiece":
            (folder / "tokenizer.model").write_bytes(self.impl.serialized_model_proto())
        else:
            self.impl.save(str(folder / "tokenizer.json"))
        cfg = {
            "kind": self.kind,
            "bos_id": self.bos_id,
            "eos_ids": self.eos_ids,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }
        (folder / CONFIG).write_text(json.dumps(cfg, indent=1))

    @classmethod
    def load(cls, folder) -> Tokenizer:
        """The tokenizer ``save`` wrote into ``folder`` (FormatError if it is not all there)."""
        folder = Path(folder)
        try:
            cfg = json.loads((folder / CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{folder}: no readable {CONFIG} ({exc})") from None
        keys = ("kind", "bos_id", "eos_ids", "add_bos", "chat_template")
        if not isinstance(cfg, dict) or any(k not in cfg for k in keys) or cfg["kind"] not in FILES:
            raise FormatError(f"{folder / CONFIG}: not a pyeffort tokenizer config")
        path = folder / FILES[cfg["kind"]]
        if not path.is_file():
            raise FormatError(f"{folder}: {path.name} is missing (the model's tokenizer)")
        if cfg["kind"] == "sentencepiece":
            impl = sentencepiece_from_file(path)
        else:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                impl = HFTokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises a bare Exception for a bad file
                raise FormatError(f"{path}: not a tokenizer.json ({exc})") from None
        return cls(impl, *(cfg[k] for k in keys))


def sentencepiece_from_file(path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.load(str(path))
    return sp


def chatml(messages: list[dict]) -> str:
    """The ChatML format (SmolLM2, Qwen...) when no template can be rendered."""
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + "<|im_start|>assistant\n"


def render_chat_template(template: str, **context) -> str:
    """``template`` rendered in the sandbox (see the module's docstring) with ``context``;
    ChatTemplateError when it fails, refuses (raise_exception) or tries an unsafe operation."""
    import jinja2

    try:
        return _compile(template).render(**context)
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"the chat template tried an unsafe operation: {exc}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed: {exc}") from None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_extension(), loopcontrols])  # fmt: skip
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: no HTML escaping, key order kept."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


def _raise(msg):
    import jinja2

    raise jinja2.exceptions.TemplateError(msg)


def _namespace(*args, **kwargs):
    """jinja2's namespace, refusing underscore names (as transformers' TemplateNamespace)."""
    import jinja2

    attrs = dict(*args, **kwargs)
    if any(isinstance(k, str) and k.startswith("_") for k in attrs):
        raise jinja2.exceptions.SecurityError("a chat template namespace with an underscore name")
    return jinja2.utils.Namespace(attrs)


def _generation_extension():
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    return Generation
