"""The flash-attention kernels (kernels/attention.cu) against the NumPy twin, on a GPU.

Tolerance: the kernel multiplies bf16 probabilities (rounded from fp32, relative error 2^-9) and
writes bf16 outputs; everything else is fp32. Over many keys those roundings average out, so the
error is a fraction of a percent of the output's scale: we allow 3% of max|ref| for any element
and 1% in relative Frobenius norm. lse is fp32 throughout: 1e-4 absolute."""
import numpy as np
import pytest

from cuda_testing import from_gpu_bf16, poisoned_bf16, poisoned_f32, randn, requires_gpu, to_gpu_bf16
from kernels import reference

pytestmark = requires_gpu
HS = 64
SHAPES = [  # (B, T, NH): GPT-2 widths, T = 1, T not a multiple of the 64-row tile, the longest T
    (2, 64, 12), (1, 1, 2), (2, 37, 4), (1, 1000, 16), (1, 130, 25), (1, 2048, 2), (3, 200, 1),
]


@pytest.fixture(scope="module")
def K():
    from kernels import cuda
    return cuda


def assert_close(got, ref, element=0.03, frobenius=0.01):
    scale = np.abs(ref).max()
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= element * scale, np.abs(got - ref).max() / scale
    assert np.linalg.norm(got - ref) <= frobenius * np.linalg.norm(ref)


def inputs(B, T, NH, seed):
    rng = np.random.default_rng(seed)
    qkv = randn(rng, B, T, 3 * NH * HS)
    qkv[..., :2 * NH * HS] *= 2.0  # larger q and k: peaked softmax rows, not near-uniform ones
    dout = randn(rng, B, T, NH * HS)
    return qkv, dout


def run_forward(K, qkv, B, T, NH):
    out, lse = poisoned_bf16((B, T, NH * HS)), poisoned_f32((B, NH, T))
    K.attention_forward(out, lse, to_gpu_bf16(qkv))
    return out, lse


@pytest.mark.parametrize("B,T,NH", SHAPES)
def test_attention_forward_matches_twin(K, B, T, NH):
    qkv, _ = inputs(B, T, NH, seed=T * 31 + NH)
    out, lse = run_forward(K, qkv, B, T, NH)
    out_ref = np.zeros((B, T, NH * HS), np.float32)
    lse_ref = np.zeros((B, NH, T), np.float32)
    reference.attention_forward(out_ref, lse_ref, qkv)
    assert_close(from_gpu_bf16(out), out_ref)
    np.testing.assert_allclose(lse.get(), lse_ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("B,T,NH", SHAPES)
def test_attention_backward_matches_twin_and_is_deterministic(K, B, T, NH):
    qkv, dout = inputs(B, T, NH, seed=T * 17 + NH)
    out, lse = run_forward(K, qkv, B, T, NH)
    gpu_qkv, gpu_dout = to_gpu_bf16(qkv), to_gpu_bf16(dout)
    results = []
    for _ in range(2):
        dqkv = poisoned_bf16((B, T, 3 * NH * HS))
        K.attention_backward(dqkv, gpu_dout, gpu_qkv, out, lse)
        results.append(dqkv.get())
    np.testing.assert_array_equal(results[0], results[1])
    # the twin gets the kernel's own forward outputs (bf16 out, fp32 lse), as the backward does
    dqkv_ref = np.zeros((B, T, 3 * NH * HS), np.float32)
    reference.attention_backward(dqkv_ref, dout, qkv, from_gpu_bf16(out), lse.get())
    got = from_gpu_bf16(dqkv)
    C = NH * HS
    for part in range(3):  # dq, dk, dv each at their own scale
        if T == 1 and part < 2:  # one key: the softmax is constant, dq = dk = 0 exactly
            assert not got[..., :2 * C].any()
            continue
        assert_close(got[..., part * C:(part + 1) * C], dqkv_ref[..., part * C:(part + 1) * C])


def test_attention_forward_is_causal(K):
    """Changing the last position's k and v must leave every earlier output bit-identical."""
    B, T, NH = 1, 100, 2
    qkv, _ = inputs(B, T, NH, seed=5)
    out1, _ = run_forward(K, qkv, B, T, NH)
    qkv[:, -1, NH * HS:] += 1.0
    out2, _ = run_forward(K, qkv, B, T, NH)
    np.testing.assert_array_equal(out1.get()[:, :-1], out2.get()[:, :-1])
    assert (out1.get()[:, -1] != out2.get()[:, -1]).any()
