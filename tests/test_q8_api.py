"""What the public API hands a backend for a q8 matrix: its scales as the last argument of
``bucketmul`` and ``prepare``, 6-tuples for ``bucketmul_group`` and ``warm`` (scales None for
fp16 values); a backend built before q8 (no ``scales``) still gets the 5-tuples of fp16
matrices, and a q8 matrix there is a clear BackendError."""

import numpy as np
import pytest

import pyeffort
from pyeffort import BackendError, _backend, reference


class Core:
    """A compiled core as the q8 interface fixes it (the numpy reference does the work)."""

    NAME = "stub"

    def __init__(self):
        self.calls = []

    def bucketmul(self, x32, values, positions, stats, order, n_out, effort, out, scales=None):
        self.calls.append(("bucketmul", scales))
        args = (values, positions, stats, order, n_out, effort, out)
        return reference.bucketmul(x32, *args, scales=scales)

    def bucketmul_group(self, x32, mats, efforts, outs):
        self.calls.append(("group", [len(m) for m in mats], [m[5] for m in mats]))
        return [
            reference.bucketmul(x32.reshape(1, -1), *m[:5], e, y.reshape(1, -1), scales=m[5])
            for m, e, y in zip(mats, efforts, outs)
        ]

    def prepare(self, values, positions, stats, order, n_out, scales=None):
        self.calls.append(("prepare", scales))

    def warm(self, mats):
        self.calls.append(("warm", [len(m) for m in mats], [m[5] for m in mats]))


@pytest.fixture
def mats(rng):
    w = (rng.standard_normal((48, 80)) * 0.1).astype(np.float16)
    return pyeffort.build_buckets(w, values="q8"), pyeffort.build_buckets(w)


def use(monkeypatch, core):
    monkeypatch.setattr(_backend, "current", core)
    return core


def test_a_q8_core_gets_the_scales_everywhere(monkeypatch, rng, mats):
    core = use(monkeypatch, Core())
    b8, b16 = mats
    x = rng.standard_normal(48).astype(np.float32)
    y8 = pyeffort.matmul(x, b8, 0.5)
    pyeffort.matmul(x, b16, 0.5)
    assert core.calls[0][1] is b8.scales and core.calls[1] == ("bucketmul", None)
    ys = pyeffort.matmul_group(x, [b8, b16], [0.5, 0.3])
    assert core.calls[2] == ("group", [6, 6], [b8.scales, None])
    assert np.array_equal(ys[0], y8)
    pyeffort.prepare(b8)
    pyeffort.prefetch([b16, b8])
    assert core.calls[3][1] is b8.scales and core.calls[4] == ("warm", [6, 6], [None, b8.scales])


def test_q8_matrices_stay_off_devices_without_q8_kernels(monkeypatch, mats):
    from pyeffort import _devices

    class Device:
        GROUP_MAX = _devices.GROUP_MAX
        matmul = matmul_group = to_device = staticmethod(lambda *a, **k: "moved")

    monkeypatch.setattr(_devices, "get", lambda name: Device)
    b8, b16 = mats
    assert b16.to("cuda") == "moved"
    with pytest.raises(BackendError, match="cuda backend has no kernels for q8 values"):
        b8.to("cuda")
    Device.VALUE_KINDS = ("f16", "q8")
    assert b8.to("cuda") == "moved"
