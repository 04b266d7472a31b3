"""Each NumPy twin, forward and backward, against torch.autograd on fresh random inputs of odd shapes.

Outputs that a twin must overwrite are poisoned with NaN first; gradients it must accumulate
start from random values, so a twin that overwrote them would fail."""
import math
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import reference as K

RTOL, ATOL = 1e-5, 1e-5  # fp32 against fp32, summed in a different order


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def poisoned(*shape):
    return np.full(shape, np.nan, dtype=np.float32)


def leaf(a):
    return torch.tensor(a, requires_grad=True)


def close(ours, theirs, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(ours, theirs.detach().numpy() if torch.is_tensor(theirs) else theirs,
                               rtol=rtol, atol=atol)


def test_encoder_forward_and_backward_accumulates(rng):
    B, T, C, V, maxT = 3, 7, 10, 23, 11
    inp = rng.integers(0, V, size=(B, T), dtype=np.int32)
    inp[0, :3] = 5  # a repeated token: its rows of dwte must sum every use
    wte, wpe, dout = randn(rng, V, C), randn(rng, maxT, C), randn(rng, B, T, C)
    out = poisoned(B, T, C)
    K.encoder_forward(out, inp, wte, wpe)
    twte, twpe = leaf(wte), leaf(wpe)
    tout = twte[torch.tensor(inp, dtype=torch.long)] + twpe[:T]
    tout.backward(torch.tensor(dout))
    close(out, tout)
    dwte0, dwpe0 = randn(rng, V, C), randn(rng, maxT, C)
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    K.encoder_backward(dwte, dwpe, dout, inp)
    close(dwte, dwte0 + twte.grad.numpy())
    close(dwpe, dwpe0 + twpe.grad.numpy())


def test_layernorm_forward_saves_stats_and_backward_accumulates(rng):
    B, T, C = 3, 5, 13
    inp, weight, bias, dout = randn(rng, B, T, C) * 3 + 1, randn(rng, C), randn(rng, C), randn(rng, B, T, C)
    out, mean, rstd = poisoned(B, T, C), poisoned(B, T), poisoned(B, T)
    K.layernorm_forward(out, mean, rstd, inp, weight, bias)
    tinp, tw, tb = leaf(inp), leaf(weight), leaf(bias)
    tout = F.layer_norm(tinp, (C,), tw, tb, eps=1e-5)
    tout.backward(torch.tensor(dout))
    close(out, tout)
    close(mean, inp.mean(-1))
    close(rstd, 1 / torch.sqrt(torch.tensor(inp).var(-1, unbiased=False) + 1e-5))
    dinp0, dw0, db0 = randn(rng, B, T, C), randn(rng, C), randn(rng, C)
    dinp, dw, db = dinp0.copy(), dw0.copy(), db0.copy()
    K.layernorm_backward(dinp, dw, db, dout, inp, weight, mean, rstd)
    close(dinp, dinp0 + tinp.grad.numpy())
    close(dw, dw0 + tw.grad.numpy())
    close(db, db0 + tb.grad.numpy())


def test_fused_residual_forward_is_add_then_layernorm(rng):
    B, T, C = 2, 3, 17
    a, b, weight, bias = randn(rng, B, T, C), randn(rng, B, T, C), randn(rng, C), randn(rng, C)
    residual, normed, mean, rstd = poisoned(B, T, C), poisoned(B, T, C), poisoned(B, T), poisoned(B, T)
    K.fused_residual_forward(residual, normed, mean, rstd, a, b, weight, bias)
    tres = torch.tensor(a) + torch.tensor(b)
    close(residual, tres)
    close(normed, F.layer_norm(tres, (C,), torch.tensor(weight), torch.tensor(bias), eps=1e-5))


def test_gelu_is_torch_tanh_gelu_forward_and_backward(rng):
    inp, dout = randn(rng, 4, 9) * 3, randn(rng, 4, 9)
    out, dinp = poisoned(4, 9), poisoned(4, 9)
    K.gelu_forward(out, inp)
    K.gelu_backward(dinp, inp, dout)
    tinp = leaf(inp)
    tout = F.gelu(tinp, approximate="tanh")
    tout.backward(torch.tensor(dout))
    close(out, tout)
    close(dinp, tinp.grad)


@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_forward_and_backward(rng, with_bias):
    B, T, C, OC = 3, 5, 11, 7
    inp, weight, dout = randn(rng, B, T, C), randn(rng, OC, C), randn(rng, B, T, OC)
    bias = randn(rng, OC) if with_bias else None
    out = poisoned(B, T, OC)
    K.matmul_forward(out, inp, weight, bias)
    tinp, tw = leaf(inp), leaf(weight)
    tb = leaf(bias) if with_bias else None
    tout = F.linear(tinp, tw, tb)
    tout.backward(torch.tensor(dout))
    close(out, tout)
    dw0 = randn(rng, OC, C)
    dinp, dw = poisoned(B, T, C), dw0.copy()
    db0 = randn(rng, OC) if with_bias else None
    db = db0.copy() if with_bias else None
    K.matmul_backward(dinp, dw, db, dout, inp, weight)
    close(dinp, tinp.grad)
    close(dw, dw0 + tw.grad.numpy())
    if with_bias:
        close(db, db0 + tb.grad.numpy())


def test_matmul_with_fused_gelu(rng):
    """Forward: out = gelu(inp W^T + b), the affine part saved in pre_gelu. Backward of the layer
    that consumes gelu's output, given pre_gelu: dinp is the gradient of the pre-GELU tensor."""
    B, T, C, OC = 2, 7, 5, 9
    inp, weight, bias = randn(rng, B, T, C), randn(rng, OC, C), randn(rng, OC)
    out, pre = poisoned(B, T, OC), poisoned(B, T, OC)
    K.matmul_forward(out, inp, weight, bias, pre_gelu=pre)
    tpre = F.linear(torch.tensor(inp), torch.tensor(weight), torch.tensor(bias))
    close(pre, tpre)
    close(out, F.gelu(tpre, approximate="tanh"))

    w2, dout2 = randn(rng, 4, OC), randn(rng, B, T, 4)
    tpre_leaf = leaf(pre)
    F.linear(F.gelu(tpre_leaf, approximate="tanh"), torch.tensor(w2)).backward(torch.tensor(dout2))
    dpre, dw2 = poisoned(B, T, OC), np.zeros((4, OC), np.float32)
    K.matmul_backward(dpre, dw2, None, dout2, out, w2, pre_gelu=pre)
    close(dpre, tpre_leaf.grad)


def torch_attention(qkv, NH):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.split(C, dim=2)
    q, k, v = (x.view(B, T, NH, C // NH).transpose(1, 2) for x in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / (C // NH) ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(B, T, C), torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("B,T,NH,HS", [(2, 9, 3, 5), (1, 1, 2, 4), (3, 17, 1, 8), (2, 65, 2, 64)])
def test_attention_forward_and_backward(rng, B, T, NH, HS):
    C = NH * HS
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    out, lse = poisoned(B, T, C), poisoned(B, NH, T)
    K.attention_forward(out, lse, qkv)
    tqkv = leaf(qkv)
    tout, tlse = torch_attention(tqkv, NH)
    tout.backward(torch.tensor(dout))
    close(out, tout)
    close(lse, tlse)
    dqkv = poisoned(B, T, 3 * C)
    K.attention_backward(dqkv, dout, qkv, out, lse)
    close(dqkv, tqkv.grad)


def test_fused_classifier_losses_and_dlogits_ignore_padding(rng):
    B, T, V, Vp = 2, 5, 37, 48
    logits = randn(rng, B, T, Vp) * 4    # padding columns hold garbage that must not matter
    targets = rng.integers(0, V, size=(B, T), dtype=np.int32)
    dloss = 1.0 / (B * T * 3)            # as for 3 micro-steps of gradient accumulation
    tlogits = leaf(logits[..., :V].copy())
    tlosses = F.cross_entropy(tlogits.reshape(-1, V), torch.tensor(targets, dtype=torch.long).reshape(-1),
                              reduction="none").reshape(B, T)
    (tlosses.sum() * dloss).backward()

    losses, unchanged = poisoned(B, T), logits.copy()
    K.fused_classifier(unchanged, losses, targets, V, dloss, write_dlogits=False)
    close(losses, tlosses)
    np.testing.assert_array_equal(unchanged, logits)

    losses = poisoned(B, T)
    K.fused_classifier(logits, losses, targets, V, dloss, write_dlogits=True)
    close(losses, tlosses)
    close(logits[..., :V], tlogits.grad, atol=1e-7)
    np.testing.assert_array_equal(logits[..., V:], 0.0)


def test_global_norm_and_llmc_clip_rule(rng):
    grads = randn(rng, 1001)
    np.testing.assert_allclose(K.global_norm(grads), torch.linalg.vector_norm(torch.tensor(grads)).item(), rtol=1e-6)
    assert K.clip_scale(4.0, 1.0) == 0.25   # above the limit: scaled down to norm 1 exactly
    assert K.clip_scale(0.5, 1.0) == 1.0    # below: untouched


def test_global_norm_over_many_chunks_is_the_exact_norm_to_float64_rounding(rng):
    """Squares summed in float64: over a million gradients of spread magnitudes the norm is within
    1e-15 of the exact one (math.fsum: the correctly rounded sum of the squares, each exact in
    float64); float32 sums, or a chunk left out, are far off."""
    grads = randn(rng, 31 * K.CHUNK + 77) * np.exp(randn(rng, 31 * K.CHUNK + 77) * 3)
    exact = math.sqrt(math.fsum(grads.astype(np.float64) ** 2))
    np.testing.assert_allclose(K.global_norm(grads), exact, rtol=1e-15, atol=0)


def test_twins_over_whole_buffers_make_no_temporary_of_their_size(rng):
    """The norm and AdamW pass over every gradient, and the classifier over every logit, each step:
    temporaries the size of those buffers (a float64 copy of GPT-2 124M's gradients is 1 GB) cost
    more there than the arithmetic. NumPy reports its arrays to tracemalloc."""
    def peak_bytes(twin, *args):
        tracemalloc.start()
        try:
            twin(*args)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    n = 16 * K.CHUNK
    grads, params, m, v = randn(rng, n), randn(rng, n), randn(rng, n), np.abs(randn(rng, n))
    assert peak_bytes(K.global_norm, grads) < grads.nbytes / 4
    assert peak_bytes(K.adamw, params, grads, m, v, None, 3, 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.5, 0) < grads.nbytes / 4
    B, T, V, Vp = 2, 8, 5000, 5120
    logits, losses = randn(rng, B, T, Vp), poisoned(B, T)
    targets = rng.integers(0, V, size=(B, T), dtype=np.int32)
    assert peak_bytes(K.fused_classifier, logits, losses, targets, V, 1.0 / (B * T), True) < logits.nbytes / 4


@pytest.mark.parametrize("n", [257, 2 * K.CHUNK + 3])  # within one chunk; over two and a part
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37)])
def test_adamw_matches_torch_adamw_over_three_steps(rng, weight_decay, grad_scale, n):
    lr = 1e-2
    params = randn(rng, n)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    tparam = torch.nn.Parameter(torch.tensor(params))
    opt = torch.optim.AdamW([tparam], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, foreach=False)
    for step in range(3):
        grads = randn(rng, n)
        K.adamw(params, grads, m, v, None, step + 1, lr, 0.9, 0.95, 1e-8, weight_decay, grad_scale, seed=step)
        tparam.grad = torch.tensor(grads * np.float32(grad_scale))
        opt.step()
        close(params, tparam, rtol=1e-5, atol=1e-6)
