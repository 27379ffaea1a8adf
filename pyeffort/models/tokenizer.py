"""Tokenizer: a ``tokenizers`` (BPE, tokenizer.json) or ``sentencepiece`` (tokenizer.model)
tokenizer with the model's special ids and chat template, saved beside a converted model."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = "pyeffort_tokenizer.json"


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
        if self.chat_template:
            try:
                import jinja2
            except ImportError:
                jinja2 = None
            if jinja2 is not None:
                env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = _raise
                tmpl = env.from_string(self.chat_template)
                bos = self.token_text(self.bos_id) if self.bos_id is not None else ""
                eos = self.token_text(self.eos_ids[0]) if self.eos_ids else ""
                return tmpl.render(
                    messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
                )
        return chatml(messages)

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
        folder = Path(folder)
        cfg = json.loads((folder / CONFIG).read_text())
        if cfg["kind"] == "sentencepiece":
            impl = sentencepiece_from_file(folder / "tokenizer.model")
        else:
            from tokenizers import Tokenizer as HFTokenizer

            impl = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(
            impl, cfg["kind"], cfg["bos_id"], cfg["eos_ids"], cfg["add_bos"], cfg["chat_template"]
        )


def sentencepiece_from_file(path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.load(str(path))
    return sp


def chatml(messages: list[dict]) -> str:
    """The ChatML format (SmolLM2, Qwen...) when no template can be rendered."""
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + "<|im_start|>assistant\n"


def _raise(msg):
    raise ValueError(msg)
