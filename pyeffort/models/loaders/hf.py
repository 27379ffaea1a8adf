"""A Hugging Face checkpoint folder (LlamaForCausalLM / MistralForCausalLM): config.json,
``*.safetensors`` shards (with ``model.safetensors.index.json``), and tokenizer.json or
tokenizer.model. Tensors are memory-mapped and read one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pyeffort.fileformat import Reader
from pyeffort.models.args import ModelArgs
from pyeffort.models.tokenizer import Tokenizer, sentencepiece_from_file

LAYER = {
    "attn.wq": "self_attn.q_proj.weight",
    "attn.wk": "self_attn.k_proj.weight",
    "attn.wv": "self_attn.v_proj.weight",
    "attn.wo": "self_attn.o_proj.weight",
    "ffn.w1": "mlp.gate_proj.weight",
    "ffn.w3": "mlp.up_proj.weight",
    "ffn.w2": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
}
TOP = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}


def hf_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{LAYER[rest]}"


class HFSource:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.args = ModelArgs.from_hf(self.config)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            files = json.loads(index.read_text())["weight_map"]
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise ValueError(f"{folder}: no *.safetensors files")
            files = {n: s.name for s in shards for n in Reader(s).tensors}
        self.files = files
        self._readers: dict[str, Reader] = {}
        if not self.args.tie_embeddings and "lm_head.weight" not in files:
            self.args.tie_embeddings = True
        self.tokenizer = load_tokenizer(self.folder, self.config)

    def get(self, name: str) -> np.ndarray:
        key = hf_name(name)
        if key not in self.files:
            raise ValueError(f"{self.folder}: tensor {key} missing")
        shard = self.files[key]
        if shard not in self._readers:
            self._readers[shard] = Reader(self.folder / shard)
        r = self._readers[shard]
        a = r.array(key)
        if r.info(key).dtype == np.uint16:  # bfloat16 bits
            a = (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
        a = np.asarray(a, dtype=np.float32)
        if name == "embed" or a.ndim == 1:
            return a
        return a.T  # nn.Linear (n_out, n_in) -> (n_in, n_out)


def load_tokenizer(folder: Path, config: dict) -> Tokenizer:
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    tmpl = tc.get("chat_template")
    if isinstance(tmpl, list):  # named templates
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
    if tmpl is None and (folder / "chat_template.jinja").exists():
        tmpl = (folder / "chat_template.jinja").read_text()
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer

        impl, kind = HFTokenizer.from_file(str(folder / "tokenizer.json")), "tokenizers"
        tid = impl.token_to_id
    elif (folder / "tokenizer.model").exists():
        impl, kind = sentencepiece_from_file(folder / "tokenizer.model"), "sentencepiece"

        def tid(t):
            i = impl.piece_to_id(t)
            return None if i == impl.unk_id() and t != impl.id_to_piece(i) else i
    else:
        raise ValueError(f"{folder}: neither tokenizer.json nor tokenizer.model")
    bos = _special(tc.get("bos_token"), tid, config.get("bos_token_id"))
    eos = _special(tc.get("eos_token"), tid, config.get("eos_token_id"))
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    add_bos = tc.get("add_bos_token")
    if add_bos is None:  # sentencepiece Llamas add BOS; a tokenizer.json says so itself
        add_bos = kind == "sentencepiece" or _post_adds_bos(impl, bos)
    return Tokenizer(impl, kind, bos, eos_ids, add_bos, tmpl)


def _post_adds_bos(impl, bos) -> bool:
    if bos is None:
        return False
    ids = impl.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos


def _special(tok, to_id, fallback):
    if isinstance(tok, dict):
        tok = tok.get("content")
    if isinstance(tok, str):
        i = to_id(tok)
        if i is not None:
            return int(i)
    return fallback
