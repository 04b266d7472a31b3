"""The encoder, layernorm, residual and GELU kernels (kernels/encoder.cu, layernorm.cu, gelu.cu)
against their NumPy twins, on a GPU.

Tolerances. Every kernel output is one fp32 result rounded to the nearest bf16, so it is within
half a bf16 ulp of the exact value: at most 2^-8 of it (8 significant bits; 2^-9 near the top of
a binade), hence RTOL = 2^-8. The twin computes the same fp32 expression in another order (or
with another tanh), which adds an absolute error far below a bf16 ulp; each test names its ATOL
for that. Where the kernel does exactly the twin's one fp32 operation then rounds (encoder and
residual forward), the result must equal the rounded twin bit for bit."""
import numpy as np
import pytest

from cuda_testing import bf16_round, from_gpu_bf16, poisoned_bf16, poisoned_f32, randn, requires_gpu, to_gpu_bf16
from kernels import reference

pytestmark = requires_gpu
RTOL = 2.0**-8


@pytest.fixture(scope="module")
def K():
    from kernels import cuda
    return cuda


def gpu_int32(a):
    import cupy
    return cupy.asarray(a, dtype=cupy.int32)


def gpu_f32(a):
    import cupy
    return cupy.asarray(a, dtype=cupy.float32)


def assert_bf16_close(got, ref, atol):
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=atol)


# ----------------------------------------------------------------------------- encoder

ENCODER_SHAPES = [  # (B, T, C, Vp): GPT-2 widths, T = 1, T not a multiple of 64, a small C
    (4, 64, 768, 512), (1, 1, 64, 128), (3, 37, 1024, 256), (2, 1000, 1600, 384), (5, 37, 64, 128),
]
MAX_T = 1024


def token_ids(rng, B, T, Vp, kind):
    if kind == "one token":  # every position the same token: one run of B*T
        return np.full((B, T), Vp - 1, dtype=np.int32)
    inp = rng.integers(0, Vp, size=(B, T), dtype=np.int32)
    inp[:, ::3] = 7            # a token used at a third of the positions, EOT-like
    inp[0, T // 2:] = Vp - 1   # and a long stretch of the last row of wte
    return inp


@pytest.mark.parametrize("kind", ["mixed", "one token"])
@pytest.mark.parametrize("B,T,C,Vp", ENCODER_SHAPES)
def test_encoder_forward_matches_twin_exactly(K, B, T, C, Vp, kind):
    rng = np.random.default_rng(B * 1000 + T + C)
    inp = token_ids(rng, B, T, Vp, kind)
    wte, wpe = randn(rng, Vp, C, scale=0.1), randn(rng, MAX_T, C, scale=0.1)
    out = poisoned_bf16((B, T, C))
    K.encoder_forward(out, gpu_int32(inp), to_gpu_bf16(wte), to_gpu_bf16(wpe))
    ref = np.empty((B, T, C), np.float32)
    reference.encoder_forward(ref, inp, wte, wpe)
    # one fp32 add of two bf16 values, then round: the same bits as the rounded twin
    np.testing.assert_array_equal(from_gpu_bf16(out), bf16_round(ref))


@pytest.mark.parametrize("kind", ["mixed", "one token"])
@pytest.mark.parametrize("B,T,C,Vp", ENCODER_SHAPES)
def test_encoder_backward_accumulates_like_twin_and_is_deterministic(K, B, T, C, Vp, kind):
    rng = np.random.default_rng(B * 2000 + T + C)
    inp = token_ids(rng, B, T, Vp, kind)
    dout = randn(rng, B, T, C)
    dwte0, dwpe0 = randn(rng, Vp, C), randn(rng, MAX_T, C)
    gpu_inp, gpu_dout = gpu_int32(inp), to_gpu_bf16(dout)
    results = []
    for _ in range(2):
        dwte, dwpe = to_gpu_bf16(dwte0), to_gpu_bf16(dwpe0)
        K.encoder_backward(dwte, dwpe, gpu_dout, gpu_inp)
        results.append((dwte.get(), dwpe.get()))
    for a, b in zip(results[0], results[1]):
        np.testing.assert_array_equal(a, b)
    dwte_ref, dwpe_ref = dwte0.copy(), dwpe0.copy()
    reference.encoder_backward(dwte_ref, dwpe_ref, dout, inp)
    got_dwte, got_dwpe = from_gpu_bf16(dwte), from_gpu_bf16(dwpe)
    # a sum of n unit-scale terms in another fp32 order: within about n * 1e-6 of the twin's
    longest_run = np.bincount(inp.reshape(-1)).max()
    assert_bf16_close(got_dwte, dwte_ref, atol=1e-6 * longest_run)
    assert_bf16_close(got_dwpe, dwpe_ref, atol=1e-6 * B)
    # rows no position used, and positions past T, keep their bits
    unused = np.setdiff1d(np.arange(Vp), inp)
    np.testing.assert_array_equal(got_dwte[unused], dwte0[unused])
    np.testing.assert_array_equal(got_dwpe[T:], dwpe0[T:])


# ----------------------------------------------------------------------------- layernorm

LAYERNORM_SHAPES = [  # (B, T, C): rows 1, 37, 4*1000 (not a multiple of 8 rows per block) x C
    (1, 1, 768), (1, 37, 64), (1, 37, 1600), (2, 64, 1024), (4, 1000, 768), (4, 1000, 64), (4, 1000, 1600),
]


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


@pytest.mark.parametrize("B,T,C", LAYERNORM_SHAPES)
def test_layernorm_forward_matches_twin(K, B, T, C):
    rng = np.random.default_rng(B * 3000 + T + C)
    inp, weight, bias = layernorm_inputs(rng, B, T, C)
    out, mean, rstd = poisoned_bf16((B, T, C)), poisoned_f32((B, T)), poisoned_f32((B, T))
    K.layernorm_forward(out, mean, rstd, to_gpu_bf16(inp), to_gpu_bf16(weight), to_gpu_bf16(bias))
    out_ref, mean_ref, rstd_ref = twin_layernorm(inp, weight, bias)
    assert_stats_close(mean.get(), rstd.get(), mean_ref, rstd_ref)
    # outputs of scale ~1; the stats' fp32 noise (~1e-6 relative) times |x - mean| up to ~10
    assert_bf16_close(from_gpu_bf16(out), out_ref, atol=5e-5)


@pytest.mark.parametrize("B,T,C", LAYERNORM_SHAPES)
def test_layernorm_backward_accumulates_like_twin_and_is_deterministic(K, B, T, C):
    rng = np.random.default_rng(B * 4000 + T + C)
    inp, weight, bias = layernorm_inputs(rng, B, T, C)
    _, mean, rstd = twin_layernorm(inp, weight, bias)  # the saved stats, the same for both sides
    dout = randn(rng, B, T, C)
    dinp0, dweight0, dbias0 = randn(rng, B, T, C), randn(rng, C), randn(rng, C)
    gpu = [to_gpu_bf16(x) for x in (dout, inp, weight)] + [gpu_f32(mean), gpu_f32(rstd)]
    results = []
    for _ in range(2):
        grads = [to_gpu_bf16(x) for x in (dinp0, dweight0, dbias0)]
        K.layernorm_backward(*grads, *gpu)
        results.append([g.get() for g in grads])
    for a, b in zip(results[0], results[1]):
        np.testing.assert_array_equal(a, b)
    dinp_ref, dweight_ref, dbias_ref = dinp0.copy(), dweight0.copy(), dbias0.copy()
    reference.layernorm_backward(dinp_ref, dweight_ref, dbias_ref, dout, inp, weight, mean, rstd)
    got_dinp, got_dweight, got_dbias = (from_gpu_bf16(g) for g in grads)
    assert_bf16_close(got_dinp, dinp_ref, atol=1e-4)  # per-row means of C unit-scale terms, fp32
    # sums over N = B*T rows of unit-scale terms in another fp32 order: about N * 1e-6 apart
    assert_bf16_close(got_dweight, dweight_ref, atol=1e-6 * B * T)
    assert_bf16_close(got_dbias, dbias_ref, atol=1e-6 * B * T)


@pytest.mark.parametrize("B,T,C", [(1, 1, 64), (2, 37, 768), (4, 1000, 1600)])
def test_residual_forward_matches_twin_exactly(K, B, T, C):
    rng = np.random.default_rng(B * 5000 + T + C)
    a, b = randn(rng, B, T, C), randn(rng, B, T, C)
    out = poisoned_bf16((B, T, C))
    K.residual_forward(out, to_gpu_bf16(a), to_gpu_bf16(b))
    ref = np.empty((B, T, C), np.float32)
    reference.residual_forward(ref, a, b)
    np.testing.assert_array_equal(from_gpu_bf16(out), bf16_round(ref))


@pytest.mark.parametrize("B,T,C", LAYERNORM_SHAPES)
def test_fused_residual_forward_equals_residual_then_layernorm(K, B, T, C):
    rng = np.random.default_rng(B * 6000 + T + C)
    inp, weight, bias = layernorm_inputs(rng, B, T, C)
    a = randn(rng, B, T, C)
    b = bf16_round(inp - a)  # so the residual has the layernorm inputs' offset mean
    gpu_a, gpu_b, gpu_w, gpu_bias = (to_gpu_bf16(x) for x in (a, b, weight, bias))
    fused = [poisoned_bf16((B, T, C)), poisoned_bf16((B, T, C)), poisoned_f32((B, T)), poisoned_f32((B, T))]
    K.fused_residual_forward(*fused, gpu_a, gpu_b, gpu_w, gpu_bias)
    apart = [poisoned_bf16((B, T, C)), poisoned_bf16((B, T, C)), poisoned_f32((B, T)), poisoned_f32((B, T))]
    K.residual_forward(apart[0], gpu_a, gpu_b)
    K.layernorm_forward(apart[1], apart[2], apart[3], apart[0], gpu_w, gpu_bias)
    for x, y in zip(fused, apart):  # the layernorm of the rounded residual: the same bits
        np.testing.assert_array_equal(x.get(), y.get())
    # and against the twin, which normalizes the fp32 sum: the kernel's residual is that sum
    # rounded, so the twin is given the rounded residual to compare like with like
    residual_ref = np.empty((B, T, C), np.float32)
    reference.residual_forward(residual_ref, a, b)
    np.testing.assert_array_equal(from_gpu_bf16(fused[0]), bf16_round(residual_ref))
    out_ref, mean_ref, rstd_ref = twin_layernorm(bf16_round(residual_ref), weight, bias)
    assert_stats_close(fused[2].get(), fused[3].get(), mean_ref, rstd_ref)
    assert_bf16_close(from_gpu_bf16(fused[1]), out_ref, atol=5e-5)  # as test_layernorm_forward


# ----------------------------------------------------------------------------- gelu

GELU_SIZES = [3, 8, 1000003, 2 * 37 * 3072, 4 * 64 * 3072 + 5]  # tail only, one chunk, odd sizes, GPT-2's 4C


def gelu_inputs(N, seed):
    rng = np.random.default_rng(seed)
    return randn(rng, N, scale=3.0), randn(rng, N)  # wide enough to reach both saturated tails


@pytest.mark.parametrize("N", GELU_SIZES)
def test_gelu_forward_matches_twin(K, N):
    x, _ = gelu_inputs(N, seed=N)
    out = poisoned_bf16(N)
    K.gelu_forward(out, to_gpu_bf16(x))
    ref = np.empty(N, np.float32)
    reference.gelu_forward(ref, x)
    assert_bf16_close(from_gpu_bf16(out), ref, atol=1e-5)  # tanhf vs NumPy's tanh: ~1e-7 absolute


@pytest.mark.parametrize("N", GELU_SIZES)
def test_gelu_backward_matches_twin_in_place_or_not(K, N):
    x, dout = gelu_inputs(N, seed=N + 1)
    gpu_x = to_gpu_bf16(x)
    results = []
    for _ in range(2):
        dinp = poisoned_bf16(N)
        K.gelu_backward(dinp, gpu_x, to_gpu_bf16(dout))
        results.append(dinp.get())
    np.testing.assert_array_equal(results[0], results[1])
    in_place = to_gpu_bf16(dout)
    K.gelu_backward(in_place, gpu_x, in_place)  # dinp is dout, as the fused matmul backward calls it
    np.testing.assert_array_equal(in_place.get(), results[0])
    ref = np.empty(N, np.float32)
    reference.gelu_backward(ref, x, dout)
    # where tanh saturates, 1 - tanh^2 differs by an fp32 ulp or two (1e-7), times a factor up to
    # ~10 in gelu' and |dout| up to ~5
    assert_bf16_close(from_gpu_bf16(in_place), ref, atol=5e-5)
