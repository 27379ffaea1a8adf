"""Decode speed of the default model in transformers (torch CPU): one decoding step (one token
through the KV cache after a short prompt) of the model patched by ``pyeffort.torch.patch`` at
efforts 1.0 / 0.5 / 0.25, next to the unpatched model in float32 (the group's baseline) and in
bfloat16, in the same run. ``extra_info``: tokens/s and the realised effort. The smoke run
(``--benchmark-disable``) uses a tiny random Llama instead. Skipped without torch and
transformers.

    python -m pytest bench/test_torch_speed.py --benchmark-json=OUT.json -q
"""

import copy
import inspect

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import pyeffort
import pyeffort.torch as pet

EFFORTS = [1.0, 0.5, 0.25]
PROMPT = "The history of the city began"
KINDS = ["hf_float32", "hf_bfloat16"] + [f"effort_{e}" for e in EFFORTS]


def load(smoke: bool):
    """(model, prompt ids (1, T), group name): the default model's GGUF, or a tiny one."""
    if smoke:
        cfg = transformers.AutoConfig.for_model(
            "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
        )  # fmt: skip
        return transformers.AutoModelForCausalLM.from_config(cfg), torch.tensor([[1, 5, 9]]), "tiny"
    from pyeffort.models.default import default_gguf

    try:
        g = default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(f"the default model is not available: {exc}")
    kw = {"gguf_file": g.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(g.parent, dtype=torch.float32, **kw)
    ids = transformers.AutoTokenizer.from_pretrained(g.parent, **kw)(PROMPT).input_ids
    return model, torch.tensor([ids]), "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def models(request):
    from conftest import is_smoke

    torch.set_num_threads(pyeffort.runtime_info()["threads"])  # the same cores on both sides
    model, ids, name = load(is_smoke(request.config))
    model.eval()
    patched = copy.deepcopy(model)
    pet.patch(patched, progress=False)
    return {"hf_float32": model, "hf_bfloat16": copy.deepcopy(model).to(torch.bfloat16),
            "effort": patched, "ids": ids, "name": name}  # fmt: skip


def step_fn(model, ids):
    """A function that decodes one more token through the model's KV cache (filled with the
    prompt here)."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(ids, use_cache=True)
    state = {"out": out}

    def step():
        with torch.inference_mode():
            o = state["out"]
            state["out"] = model(o.logits[:, -1:].argmax(-1), use_cache=True, **{key: o[key]})

    return step


@pytest.mark.parametrize("kind", KINDS)
def test_torch_decode_speed(measure, models, kind, smoke):
    effort = float(kind.split("_")[1]) if kind.startswith("effort") else 1.0
    model = models["effort" if kind.startswith("effort") else kind]
    step = step_fn(model, models["ids"])
    with pet.effort(model, effort):
        pet.reset_counters(model)
        measure(
            step,
            group=f"torch decode {models['name']}",
            kind=kind,
            rounds=20,
            baseline=kind == "hf_float32",
            effort=effort,
            torch_threads=torch.get_num_threads(),
            threads=pyeffort.runtime_info()["threads"],
            rates={"tokens_per_s": 1},
        )
        realised = pet.realised_effort(model)
    if kind.startswith("effort") and not smoke:  # the tiny model's matrices are too small
        assert abs(realised - effort) < 0.02
