"""The fused classifier, AdamW (with stochastic rounding) and global-norm kernels against their
NumPy twins, on the emulated device (small shapes) and on a GPU. Each test states its tolerance and
why."""
import ml_dtypes
import numpy as np
import pytest

from cuda_testing import (backend, bf16_round, cases, devices, host, on_device, poisoned_bf16, poisoned_f32, randn,
                          to_bf16)
from kernels import reference


# ----------------------------------------------------------------------------- classifier

CLASSIFIER_SHAPES = cases(  # (B, T, V, Vp, offset): GPT-2's vocab, small ones, V at the start of a bf16x8 vector
    emulated=[                 # (129) or at its end (1000), no padding at all (256), large logits (60: exp
        (1, 3, 50257, 50304, 0.0), (2, 5, 1000, 1024, 0.0), (3, 1, 129, 256, 0.0),  # overflows unless the
        (1, 5, 256, 256, 0.0), (5, 3, 129, 256, 60.0)],                              # row max goes first)
    gpu=[(4, 1, 50257, 50304, 0.0), (2, 37, 50257, 50304, 0.0), (4, 64, 50257, 50304, 0.0), (2, 37, 1000, 1024, 0.0),
         (3, 1, 129, 256, 0.0), (1, 5, 256, 256, 0.0), (5, 3, 129, 256, 60.0)])


def classifier_inputs(B, T, V, Vp, offset, seed):
    """Logits N(offset, 3) (a peaked softmax, not a flat one) with NaN in the padding columns, which
    must take no part; targets cover 0 and V - 1."""
    rng = np.random.default_rng(seed)
    logits = bf16_round(rng.standard_normal((B, T, Vp), dtype=np.float32) * np.float32(3.0) + np.float32(offset))
    logits[..., V:] = np.nan
    targets = rng.integers(0, V, size=(B, T), dtype=np.int32)
    targets.flat[0], targets.flat[-1] = 0, V - 1
    return logits, targets


def classifier_twin(logits, targets, V, dloss, write_dlogits):
    out = logits.copy()
    losses = np.zeros(targets.shape, np.float32)
    reference.fused_classifier(out, losses, targets, V, dloss, write_dlogits)
    return out, losses


# losses: fp32 log-sum-exp over up to 50257 exps, summed in another order than the twin's: the
# error is ~1e-6 relative to losses of ~10, so 1e-4 absolute is loose yet meaningful.
LOSS_ATOL = 1e-4


@pytest.mark.parametrize("device,shape", CLASSIFIER_SHAPES)
def test_classifier_losses_only_leave_logits_untouched(device, shape):
    K, (B, T, V, Vp, offset) = backend(device), shape
    logits, targets = classifier_inputs(B, T, V, Vp, offset, seed=V + T)
    dev_logits = to_bf16(K, logits)
    before = host(K, dev_logits)
    losses = poisoned_f32(K, (B, T))
    K.fused_classifier(dev_logits, losses, on_device(K, targets), V, 1.0 / (B * T), False)
    np.testing.assert_array_equal(host(K, dev_logits), before)
    _, losses_ref = classifier_twin(logits, targets, V, 1.0 / (B * T), False)
    np.testing.assert_allclose(host(K, losses), losses_ref, rtol=0, atol=LOSS_ATOL)


@pytest.mark.parametrize("device,shape", CLASSIFIER_SHAPES)
def test_classifier_dlogits_match_twin_and_are_deterministic(device, shape):
    K, (B, T, V, Vp, offset) = backend(device), shape
    logits, targets = classifier_inputs(B, T, V, Vp, offset, seed=3 * V + T)
    dloss = 1.0 / (B * T)
    runs = []
    for _ in range(2):
        dev_logits = to_bf16(K, logits)
        losses = poisoned_f32(K, (B, T))
        K.fused_classifier(dev_logits, losses, on_device(K, targets), V, dloss, True)
        runs.append((host(K, dev_logits), host(K, losses)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    dlogits_ref, losses_ref = classifier_twin(logits, targets, V, dloss, True)
    np.testing.assert_allclose(runs[0][1], losses_ref, rtol=0, atol=LOSS_ATOL)
    dlogits = runs[0][0].view(ml_dtypes.bfloat16).astype(np.float32)
    assert not dlogits[..., V:].any(), "padding columns must be exactly zero"
    # bf16 output of an fp32 value: rounding to nearest is within half a bf16 step, at most 2^-8
    # of the value (8 significant bits), plus the fp32 noise of exp and of the row sum (~1e-6
    # relative, and up to ~1e-5 * dloss absolute where p - 1 cancels at the target)
    np.testing.assert_allclose(dlogits[..., :V], dlogits_ref[..., :V], rtol=2**-8 + 1e-5, atol=1e-5 * dloss)


# ----------------------------------------------------------------------------- adamw

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, grad_scale=0.5)
T_STEP = 7
# m, v and the new fp32 value: the kernel repeats the twin's fp32 operations one by one (no FMA),
# so they should agree to the bit; 1e-6 relative / 1e-8 absolute leaves room for one last-bit
# difference and is ~10^4 times smaller than a bf16 step of the params (2^-8 * 0.02).
STATE_RTOL, STATE_ATOL = 1e-6, 1e-8


def optimizer_state(n, seed):
    """bf16 grads; fp32 m, v (>= 0) and master weights N(0, 0.02), not bf16-representable."""
    rng = np.random.default_rng(seed)
    grads = randn(rng, n)
    m = rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)
    v = np.square(rng.standard_normal(n, dtype=np.float32) * np.float32(0.1))
    master = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    return grads, m, v, master


def twin_step(params, grads, m, v, weight_decay, **hyper):
    p, mm, vv = params.copy(), m.copy(), v.copy()
    reference.adamw(p, grads.copy(), mm, vv, None, T_STEP, weight_decay=weight_decay, seed=0,
                    **{**HYPER, **hyper})
    return p, mm, vv


def run_adamw(K, grads, m, v, master, params, weight_decay, seed, **hyper):
    """One kernel step from host arrays (params as bf16 bits, None means poisoned: the master path
    must not read them); returns params bits, and m, v, master on the host."""
    n = grads.size
    dev_params = poisoned_bf16(K, n) if params is None else on_device(K, params)
    dev_m, dev_v = on_device(K, m), on_device(K, v)
    dev_master = None if master is None else on_device(K, master)
    K.adamw(dev_params, to_bf16(K, grads), dev_m, dev_v, dev_master, T_STEP, weight_decay=weight_decay,
            seed=seed, **{**HYPER, **hyper})
    return host(K, dev_params), host(K, dev_m), host(K, dev_v), None if master is None else host(K, dev_master)


def bf16_neighbours(x):
    """The bf16 bits just toward zero of each fp32 value and the next one away from zero, and
    whether the value is a bf16 already (then only the first is allowed)."""
    bits = x.view(np.uint32)
    toward = (bits >> 16).astype(np.uint16)
    return toward, toward + np.uint16(1), (bits & 0xFFFF) == 0


def assert_stochastically_rounded(params_bits, x):
    toward, away, exact = bf16_neighbours(x)
    ok = (params_bits == toward) | ((params_bits == away) & ~exact)
    assert ok.all(), f"{(~ok).sum()} params are not a bf16 neighbour of their fp32 value"


ADAMW_SIZES = cases(emulated=[1, 512, 1237, 70001], gpu=[1, 512, 1237, 4099, (1 << 20) + 3])


@pytest.mark.parametrize("device,n", ADAMW_SIZES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_master_path_matches_twin(device, n, weight_decay):
    K = backend(device)
    grads, m, v, master = optimizer_state(n, seed=n + int(weight_decay * 10))
    runs = [run_adamw(K, grads, m, v, master, None, weight_decay, seed=1234) for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)  # same state, same seed: the same bits
    params_bits, m_new, v_new, master_new = runs[0]
    p_ref, m_ref, v_ref = twin_step(master, grads, m, v, weight_decay)
    np.testing.assert_allclose(m_new, m_ref, rtol=STATE_RTOL, atol=STATE_ATOL)
    np.testing.assert_allclose(v_new, v_ref, rtol=STATE_RTOL, atol=STATE_ATOL)
    np.testing.assert_allclose(master_new, p_ref, rtol=STATE_RTOL, atol=STATE_ATOL)
    assert_stochastically_rounded(params_bits, master_new)


@pytest.mark.parametrize("device,n", ADAMW_SIZES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_without_master_updates_bf16_params_like_twin(device, n, weight_decay):
    K = backend(device)
    grads, m, v, master = optimizer_state(n, seed=7 * n + int(weight_decay * 10))
    params = master.astype(ml_dtypes.bfloat16)
    params_bits, m_new, v_new, _ = run_adamw(K, grads, m, v, None, params.view(np.uint16), weight_decay, seed=99)
    p_ref, m_ref, v_ref = twin_step(params.astype(np.float32), grads, m, v, weight_decay)
    np.testing.assert_allclose(m_new, m_ref, rtol=STATE_RTOL, atol=STATE_ATOL)
    np.testing.assert_allclose(v_new, v_ref, rtol=STATE_RTOL, atol=STATE_ATOL)
    assert_stochastically_rounded(params_bits, p_ref)


@pytest.mark.parametrize("device", devices())
def test_stochastic_rounding_is_unbiased(device):
    """With lr = 0 the fp32 value stays as it is and params get its rounding alone. Values are
    built at known positions between two bf16 neighbours: half at 1/4 of the way, half at uniform
    random positions. The count of values rounded away from zero is binomial: we allow 6 sigma."""
    K = backend(device)
    n = 1 << 20
    rng = np.random.default_rng(5)
    grads, m, v, _ = optimizer_state(n, seed=6)
    toward = randn(rng, n, scale=0.02).view(np.uint32) >> 16
    low = rng.integers(1, 1 << 16, size=n, dtype=np.uint32)
    low[: n // 2] = 1 << 14
    master = ((toward << 16) | low).view(np.float32)
    params_bits, _, _, master_new = run_adamw(K, grads, m, v, master, None, 0.0, seed=2024, lr=0.0)
    np.testing.assert_array_equal(master_new, master)
    assert_stochastically_rounded(params_bits, master)
    away = params_bits != toward.astype(np.uint16)
    frac = low / 65536.0
    for part in (slice(0, n // 2), slice(n // 2, n)):
        f = frac[part]
        sigma = np.sqrt(np.sum(f * (1 - f)))
        assert abs(away[part].sum() - f.sum()) < 6 * sigma, (away[part].sum(), f.sum())
    # no position range is favoured: in each quarter of the random half, the rate matches
    f, rounded_away = frac[n // 2:], away[n // 2:]
    for q in range(4):
        sel = (f >= q / 4) & (f < (q + 1) / 4)
        sigma = np.sqrt(np.sum(f[sel] * (1 - f[sel])))
        assert abs(rounded_away[sel].sum() - f[sel].sum()) < 6 * sigma
    # the same in value terms: the mean rounding error, in units of the bf16 step, is ~0
    rounded = params_bits.view(ml_dtypes.bfloat16).astype(np.float64)
    lo = (toward << 16).view(np.float32).astype(np.float64)
    hi = ((toward + 1) << 16).view(np.float32).astype(np.float64)
    err = (rounded - master.astype(np.float64)) / (hi - lo)
    assert abs(err.mean()) < 6 * 0.5 / np.sqrt(n)


@pytest.mark.parametrize("device", devices())
def test_stochastic_rounding_depends_on_seed_and_index_only(device):
    K = backend(device)
    n = (1 << 16) + 5
    grads, m, v, master = optimizer_state(n, seed=11)
    a = run_adamw(K, grads, m, v, master, None, 0.1, seed=1)[0]
    b = run_adamw(K, grads, m, v, master, None, 0.1, seed=2)[0]
    # two values rounded independently agree with probability 1 - 2f(1-f) >= 1/2
    assert (a != b).mean() > 0.2
    # a shorter slice is launched on another grid, yet each element keeps its bits
    k = 1000
    prefix = run_adamw(K, grads[:k], m[:k], v[:k], master[:k], None, 0.1, seed=1)[0]
    np.testing.assert_array_equal(prefix, a[:k])
    big_seed = run_adamw(K, grads, m, v, master, None, 0.1, seed=(1 << 40) + 1)[0]
    assert (big_seed != a).mean() > 0.2  # the seed's high half counts too
    # a tensor's tail updated alone (its part in a ZeRO-1 shard), told its offset: the same bits
    suffix = run_adamw(K, grads[k:], m[k:], v[k:], master[k:], None, 0.1, seed=1, offset=k)[0]
    np.testing.assert_array_equal(suffix, a[k:])
    unshifted = run_adamw(K, grads[k:], m[k:], v[k:], master[k:], None, 0.1, seed=1)[0]
    assert (unshifted != a[k:]).mean() > 0.2  # so the offset is what keeps them


# ----------------------------------------------------------------------------- global norm

# fp32 sums of squares (a few hundred per thread, then a tree per block) before fp64: relative
# error of order (terms per thread) * 2^-24 at worst, ~1e-5; half that on the root.
NORM_RTOL = 1e-5


@pytest.mark.parametrize("device,case", cases(emulated=[(1, 0), (13, 3), (1000, 0), (1000, 5), (70001, 7)],
                                                gpu=[(1, 0), (13, 3), (1000, 0), (1000, 5), (124_475_904, 0)]))
def test_global_norm_matches_twin_and_is_deterministic(device, case):
    """offset: the buffer starts that many bf16 into an allocation, off the 16-byte boundary."""
    K, (n, offset) = backend(device), case
    rng = np.random.default_rng(n + offset)
    g = (rng.standard_normal(n + offset, dtype=np.float32) * np.float32(1e-3)).astype(ml_dtypes.bfloat16)
    buffer = on_device(K, g.view(np.uint16))
    assert K.device.pointer(buffer) % 16 == 0
    got = [float(K.global_norm(buffer[offset:])) for _ in range(2)]
    assert got[0] == got[1]
    ref = reference.global_norm(g[offset:].astype(np.float32))
    assert abs(got[0] - ref) <= NORM_RTOL * ref, (got[0], ref)
