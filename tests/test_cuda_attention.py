"""The flash-attention kernels (kernels/attention.cu) against the NumPy twin, on the emulated
device (small shapes: T = 1, a partial tile, one whole tile, three tiles) and on a GPU (GPT-2's).

Tolerance: the kernel multiplies bf16 probabilities (rounded from fp32, relative error 2^-9) and
writes bf16 outputs; everything else is fp32. Over many keys those roundings average out, so the
error is a fraction of a percent of the output's scale: we allow 3% of max|ref| for any element
and 1% in relative Frobenius norm. lse is fp32 throughout: 1e-4 absolute."""
import numpy as np
import pytest

from cuda_testing import backend, cases, devices, from_bf16, host, poisoned_bf16, poisoned_f32, randn, to_bf16
from kernels import reference

HS = 64
SHAPES = cases(  # (B, T, NH): T = 1, T not a multiple of the 64-row tile, whole tiles, GPT-2 widths, the longest T
    emulated=[(1, 1, 2), (2, 37, 3), (1, 64, 2), (1, 130, 2)],
    gpu=[(2, 64, 12), (1, 1, 2), (2, 37, 4), (1, 1000, 16), (1, 130, 25), (1, 2048, 2), (3, 200, 1)])


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
    out, lse = poisoned_bf16(K, (B, T, NH * HS)), poisoned_f32(K, (B, NH, T))
    K.attention_forward(out, lse, to_bf16(K, qkv))
    return out, lse


@pytest.mark.parametrize("device,shape", SHAPES)
def test_attention_forward_matches_twin(device, shape):
    K, (B, T, NH) = backend(device), shape
    qkv, _ = inputs(B, T, NH, seed=T * 31 + NH)
    out, lse = run_forward(K, qkv, B, T, NH)
    out_ref = np.zeros((B, T, NH * HS), np.float32)
    lse_ref = np.zeros((B, NH, T), np.float32)
    reference.attention_forward(out_ref, lse_ref, qkv)
    assert_close(from_bf16(K, out), out_ref)
    np.testing.assert_allclose(host(K, lse), lse_ref, rtol=0, atol=1e-4)


def one_key_bound(qkv, dout, B, NH):
    """With one key (T = 1) the softmax is constant, so dq = dk = 0 exactly in exact arithmetic. The
    kernel's dS = P (dP - D) subtracts two fp32 sums of the same 64 products dO_d V_d (P = 1, O = V):
    dP from mma.sync's accumulation, D from load_row_stats' FMA-and-shuffle tree. Each sum errs by
    at most about 64 * 2^-24 * sum|dO_d V_d|, so |dS| is under twice that, and dq = dS k / 8,
    dk = dS q / 8 follow. Returns the bound on |dq| and on |dk|, each (B, 1, C)."""
    C = NH * HS
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, 1, NH, HS) for i in range(3))
    ds = 2 * 64 * 2.0**-24 * np.sum(np.abs(dout.reshape(B, 1, NH, HS) * v), axis=-1, keepdims=True)
    return (ds * np.abs(k) / 8).reshape(B, 1, C), (ds * np.abs(q) / 8).reshape(B, 1, C)


@pytest.mark.parametrize("device,shape", SHAPES)
def test_attention_backward_matches_twin_and_is_deterministic(device, shape):
    K, (B, T, NH) = backend(device), shape
    qkv, dout = inputs(B, T, NH, seed=T * 17 + NH)
    out, lse = run_forward(K, qkv, B, T, NH)
    dev_qkv, dev_dout = to_bf16(K, qkv), to_bf16(K, dout)
    results = []
    for _ in range(2):
        dqkv = poisoned_bf16(K, (B, T, 3 * NH * HS))
        K.attention_backward(dqkv, dev_dout, dev_qkv, out, lse)
        results.append(host(K, dqkv))
    np.testing.assert_array_equal(results[0], results[1])
    # the twin gets the kernel's own forward outputs (bf16 out, fp32 lse), as the backward does
    dqkv_ref = np.zeros((B, T, 3 * NH * HS), np.float32)
    reference.attention_backward(dqkv_ref, dout, qkv, from_bf16(K, out), host(K, lse))
    got = from_bf16(K, dqkv)
    C = NH * HS
    if T == 1:  # dq and dk are rounding noise of a difference that is 0 in exact arithmetic
        for part, bound in zip(got[..., :2 * C].reshape(B, 1, 2, C).transpose(2, 0, 1, 3),
                               one_key_bound(qkv, dout, B, NH)):
            assert np.all(np.abs(part) <= bound), np.abs(part).max()
        assert_close(got[..., 2 * C:], dqkv_ref[..., 2 * C:])
        return
    for part in range(3):  # dq, dk, dv each at their own scale
        assert_close(got[..., part * C:(part + 1) * C], dqkv_ref[..., part * C:(part + 1) * C])


@pytest.mark.parametrize("device", devices())
def test_attention_forward_is_causal(device):
    """Changing the last position's k and v must leave every earlier output bit-identical."""
    K = backend(device)
    B, T, NH = 1, 100, 2
    qkv, _ = inputs(B, T, NH, seed=5)
    out1, _ = run_forward(K, qkv, B, T, NH)
    qkv[:, -1, NH * HS:] += 1.0
    out2, _ = run_forward(K, qkv, B, T, NH)
    np.testing.assert_array_equal(host(K, out1)[:, :-1], host(K, out2)[:, :-1])
    assert (host(K, out1)[:, -1] != host(K, out2)[:, -1]).any()
