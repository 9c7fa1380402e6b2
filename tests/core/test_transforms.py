from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from converters.core.transforms import Kernel, Offset, Permute, Reshape, RopeInterleave, Scale, run_chain

rng = np.random.default_rng(0)


@pytest.mark.parametrize(
    "t,shape",
    [
        (Kernel((6, 2, 4)), (8, 6)),  # query [N*D, E] -> [E, N, D]
        (Kernel((2, 4, 6), n_in=2), (6, 8)),  # out [E, N*D] -> [N, D, E]
        (Reshape((2, 4), (8,)), (8,)),
        (Permute((2, 3, 1, 0)), (5, 3, 2, 2)),
        (RopeInterleave(), (3, 2, 8)),
    ],
)
def test_exact_transforms_invert_bit_exactly(t, shape):
    x = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    y = run_chain((t,), x, x.dtype)
    assert np.array_equal(run_chain((t,), y, x.dtype, inverse=True), x)


def test_kernel_matches_torch_linear_semantics():
    """x @ W.T (torch Linear) equals einsum over MaxText's [E, N, D] kernel."""
    E, N, D = 6, 2, 4
    w = rng.standard_normal((N * D, E))
    x = rng.standard_normal((3, E))
    k = Kernel((E, N, D)).forward(w)
    assert np.allclose(np.einsum("te,end->tnd", x, k).reshape(3, N * D), x @ w.T)
    o = rng.standard_normal((E, N * D))
    ko = Kernel((N, D, E), n_in=2).forward(o)
    h = rng.standard_normal((3, N, D))
    assert np.allclose(np.einsum("tnd,nde->te", h, ko), h.reshape(3, -1) @ o.T)


def test_rope_interleave_pairs_halves():
    x = np.arange(8)
    assert RopeInterleave().forward(x).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_value_transforms_compute_in_float32_and_round_once():
    x = rng.standard_normal((64,)).astype(ml_dtypes.bfloat16)
    chain = (Scale(1 / np.sqrt(128)),)
    y = run_chain(chain, x, x.dtype)
    assert y.dtype == x.dtype
    assert np.array_equal(y, (x.astype(np.float32) * np.float32(1 / np.sqrt(128))).astype(ml_dtypes.bfloat16))
    back = run_chain(chain, y, x.dtype, inverse=True)
    steps = np.abs(back.view(np.int16).astype(int) - x.view(np.int16).astype(int))
    assert steps.max() <= 1  # one rounding each way: at most one bf16 ulp
    z = run_chain((Offset(1.0),), x, np.dtype(np.float32))
    assert np.array_equal(z, x.astype(np.float32) + 1)


def test_transpose2d_large_arrays_take_the_torch_kernel_and_equal_numpy():
    """Arrays of 16 MB and more go through torch's transpose (bits moved as integers): the result must be the
    same C-ordered bytes as numpy's, for bf16 and float32, and a read-only array takes the numpy path."""
    import ml_dtypes

    from converters.core import transforms

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, size=(2048, 4100), dtype=np.uint16)  # 16.8 MB, a width that is not a tile multiple
    for x in (bits.view(ml_dtypes.bfloat16), rng.random((1500, 2900), dtype=np.float32)):
        assert x.nbytes >= transforms._TORCH_MIN_BYTES
        y = transforms.transpose2d(x)
        assert transforms._torch, "torch was not used"
        assert y.dtype == x.dtype and y.flags.c_contiguous
        assert y.tobytes() == np.ascontiguousarray(x.T).tobytes()
    ro = bits.copy()
    ro.flags.writeable = False
    assert transforms.transpose2d(ro).tobytes() == np.ascontiguousarray(ro.T).tobytes()
