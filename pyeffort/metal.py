"""Metal backend (Apple GPUs): effort matmuls on the canonical bucket rows, kernels in src/metal.

Built and run only on macOS (``pyeffort._metal``, the Objective-C host of src/metal/pe_metal.m,
built by setup.py there); **this project has not run it on Apple hardware**. What is checked,
in CI on Linux, is the kernels: src/metal/*.metal compiled as C++17 against a shim of the Metal
Shading Language and run by a threadgroup simulator (tests/metal_shim), against reference.py.
"""

from __future__ import annotations

import numpy as np

from pyeffort import reference


def scale_rows_of(order: np.ndarray, n_rows: int) -> np.ndarray:
    """(16, n_in) order -> (n_rows,) uint32: the row of q8 ``scales`` of each loaded bucket row
    (what kernel_bucketmul_q8 reads as ``srow``)."""
    return reference._tier_position(np.asarray(order)).ravel()[:n_rows].astype(np.uint32)


def bytes_read(rows: np.ndarray, n_groups: int, srow: np.ndarray | None = None) -> int:
    """Weight bytes a token's dispatched ``rows`` read, as reference.bucketmul counts them:
    their values and positions, and (q8, ``srow`` given) the scales of each dispatched tier of
    an input once."""
    n = len(rows) * reference.row_bytes(n_groups, srow is not None)
    if srow is not None:
        n += 2 * reference.n_chunks(n_groups) * len(np.unique(srow[rows]))
    return int(n)
