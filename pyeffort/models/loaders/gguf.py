"""A GGUF file of the llama or qwen2 architecture (gguf package): dequantised tensors, llama.cpp's
q/k row permutation undone (llama; qwen2's rotary layout is Hugging Face's already), the byte-level
BPE tokenizer and chat template from the metadata. Mixtral comes as llama.cpp writes it:
``llama.expert_count`` / ``expert_used_count``, the router ``blk.N.ffn_gate_inp`` and each
layer's experts stacked in ``blk.N.ffn_{gate,up,down}_exps`` (n_expert, n_out, n_in), read one
expert at a time.

The ``{arch}.*`` metadata is read against an allow-list, as config.json is: RoPE scaling (linear,
YaRN, Llama 3's ``rope_freqs``) by ``rope_scaling.from_gguf``; partial rotary and any key or
tensor pyeffort does not know are refused (ConfigError)."""

from __future__ import annotations

import numpy as np

from pyeffort.models.args import ConfigError, ModelArgs, tensor_shape
from pyeffort.models.loaders.rope_scaling import GGUF_NEUTRAL, GGUF_READ, from_gguf
from pyeffort.models.tokenizer import Tokenizer

NAMES = {
    "attn_q": "attn.wq",
    "attn_k": "attn.wk",
    "attn_v": "attn.wv",
    "attn_output": "attn.wo",
    "ffn_gate": "ffn.w1",
    "ffn_up": "ffn.w3",
    "ffn_down": "ffn.w2",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "ffn_gate_inp": "router",
    "ffn_gate_exps": "ffn.experts.w1",  # the stacks; one expert: layers.{i}.ffn.experts.{e}.w1
    "ffn_up_exps": "ffn.experts.w3",
    "ffn_down_exps": "ffn.experts.w2",
}
BIASES = {"attn_q": "attn.bq", "attn_k": "attn.bk", "attn_v": "attn.bv"}  # qwen2's
ARCHS = ("llama", "qwen2")
READ = {"block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
        "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
        "attention.key_length", "attention.value_length", "rope.freq_base",
        "rope.dimension_count", "tensor_data_layout",
        "expert_count", "expert_used_count"}  # fmt: skip
BPE_PRE = ("smollm", "qwen2")  # byte-level BPE pre-tokenizers _byte_level_bpe reproduces
# Qwen2's split (its tokenizer.json; llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2): digits one by one
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip


class GGUFSource:
    def __init__(self, path):
        import gguf

        self.path = str(path)
        self.reader = gguf.GGUFReader(self.path)
        self.arch = self._field("general.architecture")
        if self.arch not in ARCHS:
            raise ValueError(f"{path}: GGUF architecture {self.arch!r} is not supported "
                             f"(one of {ARCHS})")  # fmt: skip
        self.tensors = {}
        for t in self.reader.tensors:
            name = self._our_name(t.name, self.arch)
            if name.startswith("unused:"):
                raise ConfigError(f"{path}: tensor {t.name!r} is not used by pyeffort's "
                                  f"{self.arch} (biases...): refusing to run without it")  # fmt: skip
            self.tensors[name] = t
        if "embed" not in self.tensors:
            raise ConfigError(f"{path}: no token_embd.weight tensor")
        self._check_keys()
        self.args = self._args()
        self._check_biases()
        self.tokenizer = self._tokenizer()

    def _check_keys(self) -> None:
        prefix = self.arch + "."
        for key in self.reader.fields:
            if key.startswith("split.") and self._field("split.count", 1) != 1:
                raise ConfigError(f"{self.path}: a split GGUF (join it with llama-gguf-split)")
            k = key[len(prefix) :]
            if not key.startswith(prefix) or k in READ or k in GGUF_READ or k in GGUF_NEUTRAL:
                continue
            v = self._field(key)
            raise ConfigError(f"{self.path}: GGUF {key}={v!r} is not implemented by pyeffort")

    def _check_biases(self) -> None:
        """qwen2 has all three q/k/v biases (llama.cpp requires them), llama none."""
        want = set(BIASES.values()) if self.args.qkv_bias else set()
        for i in range(self.args.n_layers):
            have = {n for n in want if f"layers.{i}.{n}" in self.tensors}
            if have != want:
                raise ConfigError(f"{self.path}: layer {i} lacks the {self.arch} biases "
                                  f"{sorted(want - have)}")  # fmt: skip

    def _rope_scaling(self, context: int) -> dict | None:
        t = self.tensors.pop("rope_freqs", None)
        freqs = None
        if t is not None:
            import gguf

            freqs = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        try:
            return from_gguf(lambda k, d: self._field(f"{self.arch}.{k}", d), self.arch, context,
                             freqs)  # fmt: skip
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None

    def _args(self) -> ModelArgs:
        a = self.arch + "."
        n_heads = self._int(a + "attention.head_count")
        dim = self._int(a + "embedding_length")
        head_dim = self._int(a + "attention.key_length", dim // n_heads if n_heads else 0)
        context = self._int(a + "context_length", 4096)
        for key in (a + "attention.value_length", a + "rope.dimension_count"):
            if self._int(key, head_dim) != head_dim:  # partial rotary, or v heads of other size
                raise ConfigError(f"{self.path}: GGUF {key}={self._int(key)} differs from the "
                                  f"head size {head_dim}: not implemented by pyeffort")  # fmt: skip
        n_experts = self._int(a + "expert_count", 0)
        if n_experts and self.arch != "llama":
            raise ConfigError(f"{self.path}: GGUF {a}expert_count={n_experts}: experts are "
                              "implemented for llama (Mixtral) only")  # fmt: skip
        if bool(n_experts) != ("layers.0.ffn.experts.w1" in self.tensors):
            raise ConfigError(f"{self.path}: GGUF {a}expert_count={n_experts} and the "
                              "tensors disagree (a mixture of experts needs llama.cpp's stacked "
                              "blk.N.ffn_*_exps; older per-expert tensors are not read)")  # fmt: skip
        try:
            return ModelArgs(
                dim=dim,
                n_layers=self._int(a + "block_count"),
                n_heads=n_heads,
                n_kv_heads=self._int(a + "attention.head_count_kv", n_heads),
                hidden_dim=self._int(a + "feed_forward_length"),
                vocab_size=int(self.tensors["embed"].shape[-1]),
                norm_eps=self._number(a + "attention.layer_norm_rms_epsilon"),
                rope_theta=self._number(a + "rope.freq_base", 10000.0),
                head_dim=head_dim,
                max_seq_len=context,
                tie_embeddings="lm_head" not in self.tensors,
                architecture="mixtral" if n_experts else self.arch,
                qkv_bias=self.arch == "qwen2",
                rope_scaling=self._rope_scaling(context),
                n_experts=n_experts,
                n_experts_per_tok=self._int(a + "expert_used_count", 0),
            )
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None

    def _int(self, key, default=None) -> int:
        v = self._field(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"{self.path}: GGUF metadata {key}={v!r} is not an integer")
        return int(v)

    def _number(self, key, default=None) -> float:
        v = self._field(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ConfigError(f"{self.path}: GGUF metadata {key}={v!r} is not a number")
        return float(v)

    def _field(self, key, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            if default is None:
                raise ValueError(f"{self.path}: GGUF metadata {key!r} missing")
            return default
        return f.contents()

    @staticmethod
    def _our_name(name: str, arch: str) -> str:
        top = {
            "token_embd.weight": "embed",
            "output_norm.weight": "norm",
            "output.weight": "lm_head",
            "rope_freqs.weight": "rope_freqs",
        }
        if name in top:
            return top[name]
        parts = name.split(".")
        if parts[0] != "blk" or len(parts) != 4:
            return "unused:" + name
        if parts[2] in NAMES and parts[3] == "weight":
            return f"layers.{parts[1]}.{NAMES[parts[2]]}"
        if arch == "qwen2" and parts[2] in BIASES and parts[3] == "bias":
            return f"layers.{parts[1]}.{BIASES[parts[2]]}"
        return "unused:" + name

    def get(self, name: str) -> np.ndarray:
        import gguf

        t, e = self._tensor(name)
        want = tensor_shape(self.args, name)
        plain = name == "embed" or len(want) == 1
        theirs = want if plain else want[::-1]  # GGUF keeps (n_out, n_in)
        stack = () if e is None else (self.args.n_experts,)
        if tuple(int(d) for d in reversed(t.shape)) != stack + theirs:
            raise ConfigError(f"{self.path}: tensor {t.name} has shape "
                              f"{tuple(reversed(t.shape.tolist()))}, the metadata implies "
                              f"{stack + theirs}")  # fmt: skip
        data = t.data if e is None else t.data[e]  # one expert of a stack: only its rows
        a = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32)  # (n_out, n_in)
        a = a.reshape(theirs)
        if self.arch == "llama" and name.endswith("attn.wq"):
            a = unpermute(a, self.args.n_heads)
        elif self.arch == "llama" and name.endswith("attn.wk"):
            a = unpermute(a, self.args.n_kv_heads)
        if name == "embed" or a.ndim == 1:
            return a
        return a.T  # (n_in, n_out)

    def _tensor(self, name: str):
        """The GGUF tensor holding ``name`` and, for an expert's matrix
        (``layers.{i}.ffn.experts.{e}.w1``), the expert's index in the layer's stack (else None)."""
        parts, e = name.split("."), None
        if len(parts) == 6 and parts[3] == "experts":
            name, e = ".".join(parts[:4] + parts[5:]), int(parts[4])
        if name not in self.tensors:
            raise ConfigError(f"{self.path}: no GGUF tensor for {name}")
        return self.tensors[name], e

    def _strings(self, key: str) -> list[str]:
        f = self.reader.fields.get(key)
        if f is None:
            raise ValueError(f"{self.path}: GGUF metadata {key!r} missing")
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def _tokenizer(self) -> Tokenizer:
        from tokenizers import AddedToken

        model = self._field("tokenizer.ggml.model")
        r = self.reader
        toks = self._strings("tokenizer.ggml.tokens")
        tt = r.fields.get("tokenizer.ggml.token_type")
        types = [int(tt.parts[i][0]) for i in tt.data] if tt is not None else [1] * len(toks)
        if model == "gpt2":
            pre = self._field("tokenizer.ggml.pre", "default")
            if pre not in BPE_PRE:
                raise ConfigError(f"{self.path}: GGUF tokenizer.ggml.pre={pre!r}: this "
                                  f"pre-tokenizer is not implemented (only {BPE_PRE})")  # fmt: skip
            tok = _byte_level_bpe(toks, self._strings("tokenizer.ggml.merges"), pre)
            default_bos = False
        elif model == "llama":
            sc = r.fields["tokenizer.ggml.scores"]
            scores = [float(sc.parts[i][0]) for i in sc.data]
            tok = _sentencepiece_bpe(
                toks, scores, types, self._field("tokenizer.ggml.add_space_prefix", True)
            )
            default_bos = True
        else:
            raise ValueError(f"{self.path}: GGUF tokenizer {model!r} not supported (gpt2, llama)")
        tok.add_special_tokens(
            [AddedToken(t, special=True) for t, ty in zip(toks, types, strict=True) if ty == 3]
        )
        bos = int(self._field("tokenizer.ggml.bos_token_id", -1))
        eos = int(self._field("tokenizer.ggml.eos_token_id", -1))
        eos_ids = [eos] if eos >= 0 else []
        for extra in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            i = tok.token_to_id(extra)
            if i is not None and i not in eos_ids:
                eos_ids.append(i)
        tmpl = r.fields.get("tokenizer.chat_template")
        return Tokenizer(
            tok,
            "tokenizers",
            bos if bos >= 0 else None,
            eos_ids,
            bool(self._field("tokenizer.ggml.add_bos_token", default_bos)),
            tmpl.contents() if tmpl is not None else None,
        )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows: w (n_out, n_in), rows (head, hd/2, 2) ->
    Hugging Face's (head, 2, hd/2)."""
    n_out = w.shape[0]
    return w.reshape(n_head, n_out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level_bpe(toks: list[str], merges: list[str], pre: str = "smollm"):
    """GPT-2 style byte-level BPE, split as the model's tokenizer.json: SmolLM2 digits one by
    one then GPT-2's regex, Qwen2 its own regex after NFC."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(toks)}, pairs))
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
        steps = [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = [pre_tokenizers.Digits(individual_digits=True),
                 pre_tokenizers.ByteLevel(add_prefix_space=False)]  # fmt: skip
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(toks: list[str], scores: list[float], types: list[int], prefix: bool):
    """SentencePiece BPE (Llama, Mistral) from vocabulary and scores: merges ranked by the score of
    the merged piece (as transformers' converter does), byte fallback for <0xNN> tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(toks)}
    merges = []
    for t, i in vocab.items():
        if types[i] != 1 or len(t) < 2:  # normal pieces only
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                merges.append((scores[i], vocab[a], vocab[b], a, b))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = next((i for i, ty in enumerate(types) if ty == 2), 0)
    bpe = models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=toks[unk], fuse_unk=True,
                     byte_fallback=True)  # fmt: skip
    tok = Tokenizer(bpe)
    norm = [normalizers.Replace(" ", "\u2581")]
    if prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok
