"""pyeffort.torch.EffortLinear against nn.Linear and pyeffort.matmul (torch CPU; CUDA tests are
marked ``cuda``).

Tolerance against nn.Linear: the layer's weights are rounded to float16 first, so both sides hold
the same weights and only the summation order differs: max |difference| <= 1e-3 * max |y| for
float32 outputs, and one rounding of the output dtype more for float16 / bfloat16.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import pyeffort
import pyeffort.torch as pet

REL_TOL = 1e-3
OUT_TOL = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def fp16_linear(n_in, n_out, bias=True, dtype=torch.float32, seed=0):
    """An nn.Linear whose weights are float16 values (held in ``dtype``)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.half().float())
    return lin.to(dtype)


def close(y, ref, dtype):
    ref = ref.float()
    tol = REL_TOL * ref.abs().max() + OUT_TOL[dtype] * ref.abs().max()
    assert (y.float() - ref).abs().max() <= tol


def test_importing_pyeffort_does_not_import_torch():
    code = "import sys, pyeffort; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_full_effort_matches_nn_linear(dtype, bias):
    lin = fp16_linear(300, 170, bias, dtype)
    mod = pet.EffortLinear.from_linear(lin)
    ref_lin = fp16_linear(300, 170, bias, torch.float32)  # the same weights, float32 math
    for shape in [(300,), (1, 300), (5, 300), (2, 3, 300), (2, 1, 1, 300)]:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            y = mod(x)
            ref = ref_lin(x.float())
        assert y.dtype == dtype and y.shape == ref.shape
        close(y, ref, dtype)


def test_one_token_is_the_effort_product_bit_for_bit(rng):
    lin = fp16_linear(512, 256)
    mod = pet.EffortLinear.from_linear(lin)
    mod.effort = 0.3
    x = rng.standard_normal(512).astype(np.float32)
    with torch.no_grad():
        y = mod(torch.from_numpy(x).reshape(1, 1, 512))
    ref = pyeffort.matmul(x, mod.buckets, 0.3) + lin.bias.detach().numpy()
    assert np.array_equal(y.reshape(-1).numpy(), ref)


def test_prefill_is_dense_unless_asked(rng):
    mod = pet.EffortLinear.from_linear(fp16_linear(512, 256, bias=False))
    mod.effort = 0.3
    x = rng.standard_normal((4, 512)).astype(np.float32)
    with torch.no_grad():
        dense = mod(torch.from_numpy(x)).numpy()
        assert np.array_equal(dense, pyeffort.dense_matmul(x, mod.buckets.to_dense()))
        assert mod.realised_effort == 1.0
        mod.prefill = "effort"
        mod.reset_counters()
        y = mod(torch.from_numpy(x)).numpy()
    assert np.array_equal(y, pyeffort.matmul(x, mod.buckets, 0.3))
    assert abs(mod.realised_effort - 0.3) < 0.01


def test_float32_input_is_read_in_place(monkeypatch):
    mod = pet.EffortLinear.from_linear(fp16_linear(64, 32))
    x = torch.randn(1, 64)
    seen = []
    inner_call = type(mod.inner).__call__
    monkeypatch.setattr(type(mod.inner), "__call__", lambda s, a, e: seen.append(a) or
                        inner_call(s, a, e))  # fmt: skip
    with torch.no_grad():
        mod(x)
    assert np.shares_memory(seen[0], x.numpy())


def test_realised_effort_of_single_tokens(rng):
    mod = pet.EffortLinear.from_linear(fp16_linear(576, 1536, bias=False))
    with torch.no_grad(), pet.effort(mod, 0.5):
        for _ in range(4):
            mod(torch.from_numpy(rng.standard_normal(576).astype(np.float32)))
    assert abs(mod.realised_effort - 0.5) < 0.01
    assert mod.mults == round(mod.realised_effort * mod.total) and mod.total == 4 * 576 * 1536
    assert pet.realised_effort(mod) == mod.realised_effort


def test_q8_values():
    mod = pet.EffortLinear.from_linear(fp16_linear(256, 64), values="q8")
    assert mod.buckets.values_kind == "q8" and "values=q8" in repr(mod)
    x = torch.randn(1, 256)
    with torch.no_grad():
        y = mod(x)
    ref = pyeffort.matmul(x.numpy(), mod.buckets, 1.0) + mod.bias.numpy()
    assert np.array_equal(y.numpy(), ref)


def test_gradients_are_refused_with_the_fix_named():
    mod = pet.EffortLinear.from_linear(fp16_linear(64, 32))
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):
        mod(x)
    with torch.no_grad():
        assert mod(x).shape == (2, 32)
    with torch.inference_mode():
        assert mod(torch.randn(2, 64)).shape == (2, 32)


def test_bad_inputs_raise_clear_errors():
    mod = pet.EffortLinear.from_linear(fp16_linear(64, 32))
    with torch.no_grad():
        with pytest.raises(pyeffort.ShapeError, match=r"\(\.\.\., 64\)"):
            mod(torch.randn(2, 63))
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            mod(torch.ones(2, 64, dtype=torch.int32))
        with pytest.raises(pyeffort.NonFiniteError):
            mod(torch.full((1, 64), float("nan")))
        mod.prefill = "sparse"
        with pytest.raises(ValueError, match="prefill"):
            mod(torch.randn(2, 64))
    with pytest.raises(pyeffort.EffortError):
        mod.effort = 1.5
    with pytest.raises(TypeError, match="nn.Linear"):
        pet.EffortLinear.from_linear(torch.nn.Conv1d(4, 4, 1))
    assert mod(torch.randn(0, 64)).shape == (0, 32)


def test_effort_context_manager_sets_and_restores():
    net = torch.nn.Sequential(
        pet.EffortLinear.from_linear(fp16_linear(64, 64)), torch.nn.ReLU(),
        pet.EffortLinear.from_linear(fp16_linear(64, 16)),
    )  # fmt: skip
    net[2].effort = 0.8
    with pet.effort(net, 0.3):
        assert [m.effort for m in pet.effort_linears(net)] == [0.3, 0.3]
    assert (net[0].effort, net[2].effort) == (1.0, 0.8)
    with pytest.raises(KeyError), pet.effort(net, 0.2):
        raise KeyError("inside")
    assert (net[0].effort, net[2].effort) == (1.0, 0.8)
    pet.set_effort(net, 0.4)
    assert [m.effort for m in pet.effort_linears(net)] == [0.4, 0.4]


def test_dtype_moves_change_the_output_dtype():
    mod = pet.EffortLinear.from_linear(fp16_linear(64, 32))
    mod.effort = 0.5
    mod.half()
    assert mod.bias.dtype == torch.float16 and mod.effort == 0.5
    with torch.no_grad():
        assert mod(torch.randn(1, 64)).dtype == torch.float16


def test_extra_repr_shows_shape_values_effort_bytes():
    mod = pet.EffortLinear.from_linear(fp16_linear(64, 32))
    mod.effort = 0.25
    r = repr(mod)
    for part in ("in_features=64", "out_features=32", "values=f16", "effort=0.25",
                 f"bytes={mod.buckets.nbytes}"):  # fmt: skip
        assert part in r, r


def test_torch_compile_gives_the_same_output():
    net = torch.nn.Sequential(
        torch.nn.LayerNorm(128), pet.EffortLinear.from_linear(fp16_linear(128, 96)),
        torch.nn.GELU(),
    )  # fmt: skip
    pet.set_effort(net, 0.5)
    compiled = torch.compile(net, backend="aot_eager")
    for shape in [(1, 128), (3, 128)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(compiled(x), net(x))


def test_readme_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Use it in your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    plain = [b for b in blocks if "patch(" not in b]
    assert plain, "README has no plain nn.Module example"
    exec(compile(plain[0], "README.md", "exec"), {})  # noqa: S102 (our README's own code)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    lin = fp16_linear(512, 384, dtype=dtype)
    cpu = pet.EffortLinear.from_linear(lin)
    gpu = pet.EffortLinear.from_linear(lin).cuda()
    x = torch.randn(3, 512).to(dtype)
    with torch.no_grad():
        for n_tok, e in [(1, 1.0), (1, 0.4), (3, 0.4)]:
            cpu.effort = gpu.effort = e
            y = gpu(x[:n_tok].cuda())
            assert y.dtype == dtype and y.is_cuda
            close(y.cpu(), cpu(x[:n_tok]), dtype)
    assert gpu.to("cpu")._cuda is None


@pytest.mark.cuda
@cuda
def test_cuda_graph_replays_with_a_new_effort():
    mod = pet.EffortLinear.from_linear(fp16_linear(512, 384)).cuda()
    x = torch.randn(1, 512, device="cuda")
    mod.effort = 0.3
    with torch.no_grad():
        mod(x)  # compiles and warms up outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = mod(x)
        for e in (0.3, 0.7):
            mod.effort = e
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, mod(x))
