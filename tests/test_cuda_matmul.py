"""matmul_forward / matmul_backward (cuBLASLt with the bias and GELU fused into its epilogue, plus
our bias-gradient kernel in kernels/matmul.cu) against their NumPy twins, on the emulated device
(small shapes; there the products are NumPy's in place of cuBLASLt's, so what is tested is how
kernels/cuda.py poses each product to cuBLASLt, its epilogues, and our bias-gradient kernel) and
on a GPU (GPT-2's shapes, cuBLASLt itself).

Tolerance, per value, relative to the magnitudes involved:
- 2^-8 |want|: the one rounding of the output to bf16 (at most 2^-9 relative), with a factor 2 to
  spare;
- 2^-14 |a| |b|, with a and b the row and column that the value is the dot product of: the twin
  (NumPy) and cuBLASLt add the same products in fp32 but in different orders, an error bounded by
  a small multiple of 2^-24 sum|a_k b_k| <= 2^-24 |a| |b| for random data; 2^-14 leaves room for
  the tensor cores' accumulation while staying far below any mistake in a transpose, a bias or an
  accumulation (which errs by the size of the values themselves);
- with GELU in the epilogue, cuBLASLt may evaluate tanh with the hardware approximation (relative
  error near 2^-11): in gelu(x) that is an absolute error up to 0.5 |x| 2^-11 (allowed: 2^-10 |x|),
  and in gelu'(x) up to 2^-11 (0.5 + 0.8|x| + 0.11|x|^3) <= 2^-11 (1 + |x|)^3, times the value it
  multiplies (allowed: 2^-10 (1 + |x|)^3 |dout @ weight|). gelu' is at most 1.13 in size, so the
  accumulation term is allowed 1.2 times over there.
"""
import numpy as np
import pytest

from cuda_testing import backend, cases, from_bf16, host, poisoned_bf16, randn, to_bf16
from kernels import reference

ROUNDING = 2.0 ** -8
ACCUMULATION = 2.0 ** -14

SHAPES = {  # (B, T, C, OC): GPT-2's qkv and fc layers, T = 1, T = 37 and 1000 (B*T not a multiple of
    #          the bias gradient's 64-row slabs), C = 64, 1024 and 1600 (OC = 4 * 1600 = 6400), odd C
    "emulated": [(1, 1, 64, 64), (2, 37, 72, 216), (3, 50, 64, 256)],
    "gpu": [(4, 64, 768, 2304), (2, 37, 768, 3072), (1, 1, 64, 64), (3, 1000, 1024, 4096), (2, 5, 1600, 6400)],
}
CLASSIFIER = {"emulated": (1, 9, 64, 50304), "gpu": (2, 33, 768, 50304)}  # padded vocab, no bias


def forward_cases(device):
    return [(s, bias, gelu) for s in SHAPES[device] for bias in (True, False) for gelu in (False, True)] + [
        (CLASSIFIER[device], False, False)]


def backward_cases(device):
    return [(s, dbias, gelu) for s in SHAPES[device] for dbias, gelu in ((True, False), (False, False), (True, True))] \
        + [(CLASSIFIER[device], False, False)]


def case_id(case):
    (B, T, C, OC), with_bias, gelu = case
    return f"B{B}-T{T}-C{C}-OC{OC}" + ("-bias" if with_bias else "") + ("-gelu" if gelu else "")


FORWARD_CASES = cases(forward_cases("emulated"), forward_cases("gpu"), ids=case_id)
BACKWARD_CASES = cases(backward_cases("emulated"), backward_cases("gpu"), ids=case_id)


def norms(x, axis):
    return np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axis))


def assert_close(got, want, tol, what):
    bad = ~(np.abs(got - want) <= tol)  # NaN (an unwritten, poisoned value) counts as bad
    if bad.any():
        i = np.unravel_index(np.argmax(bad), bad.shape)
        pytest.fail(f"{what}: {bad.sum()} of {bad.size} values out of tolerance; at {i}: "
                    f"got {got[i]}, want {want[i]}, tolerance {tol[i]:.3g}")


@pytest.mark.parametrize("device,case", FORWARD_CASES)
def test_matmul_forward_matches_twin(device, case):
    K, ((B, T, C, OC), with_bias, gelu) = backend(device), case
    rng = np.random.default_rng(B * 1000 + T + C + OC)
    inp = randn(rng, B, T, C)
    weight = randn(rng, OC, C, scale=C ** -0.5)  # outputs of size ~1, like a trained layer's
    bias = randn(rng, OC, scale=0.5) if with_bias else None

    want = np.empty((B, T, OC), np.float32)
    want_pre = np.empty((B, T, OC), np.float32) if gelu else None
    reference.matmul_forward(want, inp, weight, bias, want_pre)

    out = poisoned_bf16(K, (B, T, OC))
    pre_gelu = poisoned_bf16(K, (B, T, OC)) if gelu else None
    K.matmul_forward(out, to_bf16(K, inp), to_bf16(K, weight), None if bias is None else to_bf16(K, bias), pre_gelu)

    accumulation = ACCUMULATION * np.outer(norms(inp.reshape(-1, C), 1), norms(weight, 1)).reshape(B, T, OC)
    if not gelu:
        assert_close(from_bf16(K, out), want, ROUNDING * np.abs(want) + accumulation, "out")
    else:
        assert_close(from_bf16(K, pre_gelu), want_pre, ROUNDING * np.abs(want_pre) + accumulation, "pre_gelu")
        tol = ROUNDING * np.abs(want) + 1.2 * accumulation + 2.0 ** -10 * np.abs(want_pre)
        assert_close(from_bf16(K, out), want, tol, "out = gelu(pre_gelu)")


@pytest.mark.parametrize("device,case", BACKWARD_CASES)
def test_matmul_backward_matches_twin_and_is_deterministic(device, case):
    K, ((B, T, C, OC), with_dbias, gelu) = backend(device), case
    BT = B * T
    rng = np.random.default_rng(B * 2000 + T + C + OC)
    inp = randn(rng, B, T, C)
    weight = randn(rng, OC, C, scale=C ** -0.5)
    dout = randn(rng, B, T, OC)
    pre_gelu = randn(rng, B, T, C) if gelu else None
    # gradients from earlier micro-steps, of the size of one step's: accumulating must keep them
    dweight0 = randn(rng, OC, C, scale=BT ** 0.5)
    dbias0 = randn(rng, OC, scale=BT ** 0.5) if with_dbias else None

    want_dinp = np.empty((B, T, C), np.float32)
    want_dweight = dweight0.copy()
    want_dbias = None if dbias0 is None else dbias0.copy()
    reference.matmul_backward(want_dinp, want_dweight, want_dbias, dout, inp, weight, pre_gelu)

    g_inp, g_weight, g_dout = to_bf16(K, inp), to_bf16(K, weight), to_bf16(K, dout)
    g_pre = None if pre_gelu is None else to_bf16(K, pre_gelu)

    def run():
        dinp = poisoned_bf16(K, (B, T, C))
        dweight = to_bf16(K, dweight0)
        dbias = None if dbias0 is None else to_bf16(K, dbias0)
        K.matmul_backward(dinp, dweight, dbias, g_dout, g_inp, g_weight, g_pre)
        return [x for x in (dinp, dweight, dbias) if x is not None]

    first, second = run(), run()
    for name, a, b in zip(("dinp", "dweight", "dbias"), first, second):
        assert np.array_equal(host(K, a), host(K, b)), f"{name} differs between two runs from the same state"

    got = [from_bf16(K, x) for x in first]
    dout2, inp2 = dout.reshape(BT, OC), inp.reshape(BT, C)

    dweight_acc = ACCUMULATION * np.outer(norms(dout2, 0), norms(inp2, 0))
    assert_close(got[1], want_dweight, ROUNDING * np.abs(want_dweight) + dweight_acc, "dweight")
    if with_dbias:
        dbias_acc = ACCUMULATION * norms(dout2, 0) * BT ** 0.5  # sum|x| <= sqrt(BT) |x|
        assert_close(got[2], want_dbias, ROUNDING * np.abs(want_dbias) + dbias_acc, "dbias")

    dinp_acc = ACCUMULATION * np.outer(norms(dout2, 1), norms(weight, 0)).reshape(B, T, C)
    if not gelu:
        assert_close(got[0], want_dinp, ROUNDING * np.abs(want_dinp) + dinp_acc, "dinp")
    else:
        through_gelu = np.abs(dout2 @ weight).reshape(B, T, C)  # what gelu'(pre_gelu) multiplies
        tol = (ROUNDING * np.abs(want_dinp) + 1.2 * dinp_acc
               + 2.0 ** -10 * (1.0 + np.abs(pre_gelu)) ** 3 * through_gelu)
        assert_close(got[0], want_dinp, tol, "dinp (through gelu')")
