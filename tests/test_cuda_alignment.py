"""One cached cuBLASLt plan per shape serves every layer (kernels/cuda.py), whose biases and pre-GELU
(aux) buffers are only 16-byte aligned in general (tests/test_alignment.py): a plan first made with
256-byte aligned pointers must give the same bits with them at any other 16-byte offset, on a GPU.
The first result is checked against the twin too, loosely (tests/test_cuda_matmul.py holds the
tight bars): the same bits everywhere must also be the right ones.

GPU only: which algorithm cuBLASLt picks for which alignment is cuBLASLt's own behaviour, which the
emulated device (NumPy's products in cuBLASLt's place) does not have."""
import ml_dtypes
import numpy as np
import pytest

from cuda_testing import backend, poisoned_bf16, randn, requires_gpu, to_bf16
from kernels import reference

pytestmark = requires_gpu

OFFSETS = range(0, 256, 16)  # bytes into a 256-byte aligned buffer; 0 first, so the plan is made seeing 256
LOOSE = 2.0 ** -6            # of the largest value: a bias or GELU left out errs far more


@pytest.fixture(scope="module")
def K():
    return backend("gpu")


def at_offset(values, offset_bytes):
    """A copy of values (a CuPy bf16-bits array) offset_bytes into a fresh 256-byte aligned buffer."""
    import cupy as cp
    start = offset_bytes // 2
    buffer = cp.zeros(start + values.size + 128, dtype=cp.uint16)
    assert buffer.data.ptr % 256 == 0
    view = buffer[start:start + values.size].reshape(values.shape)
    view[...] = values
    return view


def host_f32(bits):
    return bits.view(ml_dtypes.bfloat16).astype(np.float32)


def assert_loosely_equal(got_bits, want, what):
    assert np.abs(host_f32(got_bits) - want).max() <= LOOSE * np.abs(want).max(), what


@pytest.mark.parametrize("gelu", [False, True], ids=["bias", "bias+gelu-aux"])
def test_forward_plan_gives_the_same_bits_with_bias_and_aux_at_any_16_byte_offset(K, gelu):
    B, T, C = 1, 24, 1600
    OC = 4 * C if gelu else 3 * C  # d48's fc or qkv, at a B*T no other test plans
    rng = np.random.default_rng(OC)
    inp, weight, bias = randn(rng, B, T, C), randn(rng, OC, C, scale=C ** -0.5), randn(rng, OC, scale=0.5)
    want = np.empty((B, T, OC), np.float32)
    want_pre = np.empty((B, T, OC), np.float32) if gelu else None
    reference.matmul_forward(want, inp, weight, bias, want_pre)
    g_inp, g_weight, g_bias = to_bf16(K, inp), to_bf16(K, weight), to_bf16(K, bias)
    results = []
    for offset in OFFSETS:
        out = poisoned_bf16(K, (B, T, OC))
        pre = at_offset(poisoned_bf16(K, (B, T, OC)), offset) if gelu else None
        K.matmul_forward(out, g_inp, g_weight, at_offset(g_bias, offset), pre)
        results.append([x.get() for x in (out, pre) if x is not None])
    assert_loosely_equal(results[0][0], want, "out")
    if gelu:
        assert_loosely_equal(results[0][1], want_pre, "pre_gelu")
    for offset, result in zip(OFFSETS, results):
        for got, first in zip(result, results[0]):
            assert np.array_equal(got, first), f"bias and aux {offset} bytes into a 256-byte aligned buffer"


def test_backward_plan_gives_the_same_bits_with_gelu_aux_at_any_16_byte_offset(K):
    B, T, C, OC = 1, 24, 6400, 1600  # d48's fcproj: dinp = (dout @ weight) * gelu'(fch), aux fch (B, T, 4C)
    rng = np.random.default_rng(1)
    inp, weight = randn(rng, B, T, C), randn(rng, OC, C, scale=C ** -0.5)
    dout, pre_gelu = randn(rng, B, T, OC), randn(rng, B, T, C)
    want_dinp = np.empty((B, T, C), np.float32)
    reference.matmul_backward(want_dinp, np.zeros((OC, C), np.float32), None, dout, inp, weight, pre_gelu)
    g_inp, g_weight, g_dout, g_pre = (to_bf16(K, x) for x in (inp, weight, dout, pre_gelu))
    results = []
    import cupy as cp
    for offset in OFFSETS:
        dinp, dweight = poisoned_bf16(K, (B, T, C)), cp.zeros((OC, C), dtype=cp.uint16)
        K.matmul_backward(dinp, dweight, None, g_dout, g_inp, g_weight, at_offset(g_pre, offset))
        results.append(dinp.get())
    assert_loosely_equal(results[0], want_dinp, "dinp")
    for offset, dinp in zip(OFFSETS, results):
        assert np.array_equal(dinp, results[0]), f"aux {offset} bytes into a 256-byte aligned buffer"
