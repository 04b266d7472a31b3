"""The encoder, layernorm (with the fused residual) and GELU kernels (kernels/encoder.cu,
layernorm.cu, gelu.cu) against their NumPy twins, on the emulated device (small shapes) and on a
GPU (GPT-2's).

Tolerances. Every kernel output is one fp32 result rounded to the nearest bf16, so it is within
half a bf16 ulp of the exact value: at most 2^-8 of it (8 significant bits; 2^-9 near the top of
a binade), hence RTOL = 2^-8. The twin computes the same fp32 expression in another order (or
with another tanh), which adds an absolute error far below a bf16 ulp; each test names its ATOL
for that. Where the kernel does exactly the twin's one fp32 operation then rounds (encoder and
residual), the result must equal the rounded twin bit for bit."""
import numpy as np
import pytest

from cuda_testing import (backend, bf16_round, cases, from_bf16, host, on_device, poisoned_bf16, poisoned_f32, randn,
                          to_bf16)
from kernels import reference

RTOL = 2.0**-8


def assert_bf16_close(got, ref, atol):
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=atol)


# ----------------------------------------------------------------------------- encoder

ENCODER_SHAPES = cases(  # (B, T, C, Vp): GPT-2 widths, T = 1, T not a multiple of 64, small and odd C
    emulated=[(1, 1, 64, 128), (5, 37, 64, 128), (2, 20, 1600, 256), (3, 9, 72, 128)],
    gpu=[(4, 64, 768, 512), (1, 1, 64, 128), (3, 37, 1024, 256), (2, 1000, 1600, 384), (5, 37, 64, 128)])
MAX_T = 1024


def token_ids(rng, B, T, Vp, kind):
    if kind == "one token":  # every position the same token: one run of B*T
        return np.full((B, T), Vp - 1, dtype=np.int32)
    inp = rng.integers(0, Vp, size=(B, T), dtype=np.int32)
    inp[:, ::3] = 7            # a token used at a third of the positions, EOT-like
    inp[0, T // 2:] = Vp - 1   # and a long stretch of the last row of wte
    return inp


@pytest.mark.parametrize("kind", ["mixed", "one token"])
@pytest.mark.parametrize("device,shape", ENCODER_SHAPES)
def test_encoder_forward_matches_twin_exactly(device, shape, kind):
    K, (B, T, C, Vp) = backend(device), shape
    rng = np.random.default_rng(B * 1000 + T + C)
    inp = token_ids(rng, B, T, Vp, kind)
    wte, wpe = randn(rng, Vp, C, scale=0.1), randn(rng, MAX_T, C, scale=0.1)
    out = poisoned_bf16(K, (B, T, C))
    K.encoder_forward(out, on_device(K, inp, np.int32), to_bf16(K, wte), to_bf16(K, wpe))
    ref = np.empty((B, T, C), np.float32)
    reference.encoder_forward(ref, inp, wte, wpe)
    # one fp32 add of two bf16 values, then round: the same bits as the rounded twin
    np.testing.assert_array_equal(from_bf16(K, out), bf16_round(ref))


@pytest.mark.parametrize("kind", ["mixed", "one token"])
@pytest.mark.parametrize("device,shape", ENCODER_SHAPES)
def test_encoder_backward_accumulates_like_twin_and_is_deterministic(device, shape, kind):
    K, (B, T, C, Vp) = backend(device), shape
    rng = np.random.default_rng(B * 2000 + T + C)
    inp = token_ids(rng, B, T, Vp, kind)
    dout = randn(rng, B, T, C)
    dwte0, dwpe0 = randn(rng, Vp, C), randn(rng, MAX_T, C)
    dev_inp, dev_dout = on_device(K, inp, np.int32), to_bf16(K, dout)
    results = []
    for _ in range(2):
        dwte, dwpe = to_bf16(K, dwte0), to_bf16(K, dwpe0)
        K.encoder_backward(dwte, dwpe, dev_dout, dev_inp)
        results.append((host(K, dwte), host(K, dwpe)))
    for a, b in zip(results[0], results[1]):
        np.testing.assert_array_equal(a, b)
    dwte_ref, dwpe_ref = dwte0.copy(), dwpe0.copy()
    reference.encoder_backward(dwte_ref, dwpe_ref, dout, inp)
    got_dwte, got_dwpe = from_bf16(K, dwte), from_bf16(K, dwpe)
    # a sum of n unit-scale terms in another fp32 order: within about n * 1e-6 of the twin's
    longest_run = np.bincount(inp.reshape(-1)).max()
    assert_bf16_close(got_dwte, dwte_ref, atol=1e-6 * longest_run)
    assert_bf16_close(got_dwpe, dwpe_ref, atol=1e-6 * B)
    # rows no position used, and positions past T, keep their bits
    unused = np.setdiff1d(np.arange(Vp), inp)
    np.testing.assert_array_equal(got_dwte[unused], dwte0[unused])
    np.testing.assert_array_equal(got_dwpe[T:], dwpe0[T:])


# ----------------------------------------------------------------------------- layernorm

LAYERNORM_SHAPES = cases(  # (B, T, C): rows 1, 37, 4*1000 (not a multiple of 8 rows per block) x C, odd C
    emulated=[(1, 1, 768), (1, 37, 64), (1, 37, 1600), (3, 45, 72)],
    gpu=[(1, 1, 768), (1, 37, 64), (1, 37, 1600), (2, 64, 1024), (4, 1000, 768), (4, 1000, 64), (4, 1000, 1600)])


def layernorm_inputs(rng, B, T, C):
    inp = bf16_round(rng.standard_normal((B, T, C), dtype=np.float32) * 2.0 + 1.5)  # |mean| ~ std
    weight = bf16_round(1.0 + 0.2 * rng.standard_normal(C, dtype=np.float32))
    bias = randn(rng, C, scale=0.2)
    return inp, weight, bias


def twin_layernorm(inp, weight, bias):
    B, T, C = inp.shape
    out, mean, rstd = np.empty((B, T, C), np.float32), np.empty((B, T), np.float32), np.empty((B, T), np.float32)
    reference.layernorm_forward(out, mean, rstd, inp, weight, bias)
    return out, mean, rstd


def assert_stats_close(mean, rstd, mean_ref, rstd_ref):
    # fp32 statistics summed in another order: a few fp32 ulps of the row's sums
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-5)


@pytest.mark.parametrize("device,shape", LAYERNORM_SHAPES)
def test_layernorm_forward_matches_twin(device, shape):
    K, (B, T, C) = backend(device), shape
    rng = np.random.default_rng(B * 3000 + T + C)
    inp, weight, bias = layernorm_inputs(rng, B, T, C)
    out, mean, rstd = poisoned_bf16(K, (B, T, C)), poisoned_f32(K, (B, T)), poisoned_f32(K, (B, T))
    K.layernorm_forward(out, mean, rstd, to_bf16(K, inp), to_bf16(K, weight), to_bf16(K, bias))
    out_ref, mean_ref, rstd_ref = twin_layernorm(inp, weight, bias)
    assert_stats_close(host(K, mean), host(K, rstd), mean_ref, rstd_ref)
    # outputs of scale ~1; the stats' fp32 noise (~1e-6 relative) times |x - mean| up to ~10
    assert_bf16_close(from_bf16(K, out), out_ref, atol=5e-5)


@pytest.mark.parametrize("device,shape", LAYERNORM_SHAPES)
def test_layernorm_backward_accumulates_like_twin_and_is_deterministic(device, shape):
    K, (B, T, C) = backend(device), shape
    rng = np.random.default_rng(B * 4000 + T + C)
    inp, weight, bias = layernorm_inputs(rng, B, T, C)
    _, mean, rstd = twin_layernorm(inp, weight, bias)  # the saved stats, the same for both sides
    dout = randn(rng, B, T, C)
    dinp0, dweight0, dbias0 = randn(rng, B, T, C), randn(rng, C), randn(rng, C)
    dev = [to_bf16(K, x) for x in (dout, inp, weight)] + [on_device(K, mean), on_device(K, rstd)]
    results = []
    for _ in range(2):
        grads = [to_bf16(K, x) for x in (dinp0, dweight0, dbias0)]
        K.layernorm_backward(*grads, *dev)
        results.append([host(K, g) for g in grads])
    for a, b in zip(results[0], results[1]):
        np.testing.assert_array_equal(a, b)
    dinp_ref, dweight_ref, dbias_ref = dinp0.copy(), dweight0.copy(), dbias0.copy()
    reference.layernorm_backward(dinp_ref, dweight_ref, dbias_ref, dout, inp, weight, mean, rstd)
    got_dinp, got_dweight, got_dbias = (from_bf16(K, g) for g in grads)
    assert_bf16_close(got_dinp, dinp_ref, atol=1e-4)  # per-row means of C unit-scale terms, fp32
    # sums over N = B*T rows of unit-scale terms in another fp32 order: about N * 1e-6 apart
    assert_bf16_close(got_dweight, dweight_ref, atol=1e-6 * B * T)
    assert_bf16_close(got_dbias, dbias_ref, atol=1e-6 * B * T)


@pytest.mark.parametrize("device,shape", LAYERNORM_SHAPES)
def test_fused_residual_forward_is_the_rounded_sum_then_layernorm(device, shape):
    K, (B, T, C) = backend(device), shape
    rng = np.random.default_rng(B * 6000 + T + C)
    inp, weight, bias = layernorm_inputs(rng, B, T, C)
    a = randn(rng, B, T, C)
    b = bf16_round(inp - a)  # so the residual has the layernorm inputs' offset mean
    dev_a, dev_b, dev_w, dev_bias = (to_bf16(K, x) for x in (a, b, weight, bias))
    fused = [poisoned_bf16(K, (B, T, C)), poisoned_bf16(K, (B, T, C)), poisoned_f32(K, (B, T)), poisoned_f32(K, (B, T))]
    K.fused_residual_forward(*fused, dev_a, dev_b, dev_w, dev_bias)
    # the residual: one fp32 add of two bf16 values, then round, the same bits as the rounded twin
    residual_ref = np.empty((B, T, C), np.float32)
    reference.fused_residual_forward(residual_ref, np.empty_like(residual_ref), np.empty((B, T), np.float32),
                                     np.empty((B, T), np.float32), a, b, weight, bias)
    np.testing.assert_array_equal(from_bf16(K, fused[0]), bf16_round(residual_ref))
    # and the layernorm of that rounded residual: the same bits as layernorm_forward's of it
    apart = [poisoned_bf16(K, (B, T, C)), poisoned_f32(K, (B, T)), poisoned_f32(K, (B, T))]
    K.layernorm_forward(*apart, fused[0], dev_w, dev_bias)
    for x, y in zip(fused[1:], apart):
        np.testing.assert_array_equal(host(K, x), host(K, y))
    out_ref, mean_ref, rstd_ref = twin_layernorm(bf16_round(residual_ref), weight, bias)
    assert_stats_close(host(K, fused[2]), host(K, fused[3]), mean_ref, rstd_ref)
    assert_bf16_close(from_bf16(K, fused[1]), out_ref, atol=5e-5)  # as test_layernorm_forward


# ----------------------------------------------------------------------------- gelu

GELU_SIZES = cases(  # tail only, one chunk, odd sizes, GPT-2's 4C
    emulated=[3, 8, 1003, 2 * 37 * 256 + 5], gpu=[3, 8, 1000003, 2 * 37 * 3072, 4 * 64 * 3072 + 5])


def gelu_inputs(N, seed):
    rng = np.random.default_rng(seed)
    return randn(rng, N, scale=3.0), randn(rng, N)  # wide enough to reach both saturated tails


@pytest.mark.parametrize("device,N", GELU_SIZES)
def test_gelu_forward_matches_twin(device, N):
    K = backend(device)
    x, _ = gelu_inputs(N, seed=N)
    out = poisoned_bf16(K, N)
    K.gelu_forward(out, to_bf16(K, x))
    ref = np.empty(N, np.float32)
    reference.gelu_forward(ref, x)
    assert_bf16_close(from_bf16(K, out), ref, atol=1e-5)  # tanhf vs NumPy's tanh: ~1e-7 absolute


@pytest.mark.parametrize("device,N", GELU_SIZES)
def test_gelu_backward_matches_twin_in_place_or_not(device, N):
    K = backend(device)
    x, dout = gelu_inputs(N, seed=N + 1)
    dev_x = to_bf16(K, x)
    results = []
    for _ in range(2):
        dinp = poisoned_bf16(K, N)
        K.gelu_backward(dinp, dev_x, to_bf16(K, dout))
        results.append(host(K, dinp))
    np.testing.assert_array_equal(results[0], results[1])
    in_place = to_bf16(K, dout)
    K.gelu_backward(in_place, dev_x, in_place)  # dinp is dout, as the fused matmul backward calls it
    np.testing.assert_array_equal(host(K, in_place), results[0])
    ref = np.empty(N, np.float32)
    reference.gelu_backward(ref, x, dout)
    # where tanh saturates, 1 - tanh^2 differs by an fp32 ulp or two (1e-7), times a factor up to
    # ~10 in gelu' and |dout| up to ~5
    assert_bf16_close(from_bf16(K, in_place), ref, atol=5e-5)
