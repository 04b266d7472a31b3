"""NumPy twins of the CUDA kernels: the CPU backend and the definition of what each kernel computes.

Every function here has the signature its CUDA kernel shares (kernels/cuda.py; both offer
kernels/backend.py's interface): outputs first, then inputs, all of them arrays the caller owns (views into the flat parameter, gradient and
activation buffers). Nothing is returned except scalars (norms). Everything is float32.

Conventions, the same on both backends:
- forward functions overwrite their outputs;
- backward functions overwrite activation gradients (dinp, dqkv ...) except where a gradient
  flows into the residual stream (layernorm_backward's dinp), which is accumulated (+=), and they
  accumulate (+=) into parameter gradients, so micro-steps of gradient accumulation add up;
- shapes: B batch, T time, C channels, NH heads, V vocab, Vp padded vocab (a multiple of 128).
"""
import math

import numpy as np

DEVICE = "CPU"
FLOAT = np.dtype(np.float32)  # parameters, gradients and activations
GELU_FUSION = 2  # -ge -1: fusing GELU into the matmuls changes nothing here but the number of calls
LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
CHUNK = 1 << 15  # elements per step of the loops over whole buffers (norm, AdamW): their temporaries stay in cache


# ----------------------------------------------------------------------------- encoder

def encoder_forward(out, inp, wte, wpe):
    """out (B,T,C) = wte[inp] + wpe[:T]; inp (B,T) int32 token ids."""
    T = inp.shape[1]
    np.add(wte[inp], wpe[:T], out=out)


def encoder_backward(dwte, dwpe, dout, inp):
    """Accumulate dout (B,T,C) into the rows of dwte that inp used, and into dwpe[:T]."""
    T = inp.shape[1]
    dwpe[:T] += dout.sum(axis=0)
    np.add.at(dwte, inp.reshape(-1), dout.reshape(-1, dout.shape[-1]))


# ----------------------------------------------------------------------------- layernorm

def layernorm_forward(out, mean, rstd, inp, weight, bias):
    """out (B,T,C) = (inp - mean) * rstd * weight + bias; saves mean and rstd (B,T) for backward."""
    mu = inp.mean(axis=-1)
    xc = inp - mu[..., None]
    var = np.mean(xc * xc, axis=-1)        # biased variance, as torch.nn.LayerNorm
    mean[...] = mu
    rstd[...] = 1.0 / np.sqrt(var + LN_EPS)
    np.multiply(xc * rstd[..., None], weight, out=out)
    out += bias


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """Accumulate into dinp (the residual stream's gradient), dweight and dbias."""
    norm = (inp - mean[..., None]) * rstd[..., None]
    dnorm = dout * weight
    C = inp.shape[-1]
    dbias += dout.reshape(-1, C).sum(axis=0)
    dweight += (dout * norm).reshape(-1, C).sum(axis=0)
    dinp += (dnorm
             - dnorm.mean(axis=-1, keepdims=True)
             - norm * (dnorm * norm).mean(axis=-1, keepdims=True)) * rstd[..., None]


def fused_residual_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias):
    """residual = inp1 + inp2 (the residual connection), then normed = layernorm(residual): one
    pass over memory on the GPU."""
    np.add(inp1, inp2, out=residual)
    layernorm_forward(normed, mean, rstd, residual, weight, bias)


# ----------------------------------------------------------------------------- gelu

def gelu_forward(out, inp):
    """GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = inp
    np.multiply(0.5 * x, 1.0 + np.tanh(GELU_SCALE * (x + 0.044715 * x * x * x)), out=out)


def gelu_backward(dinp, inp, dout):
    """dinp = gelu'(inp) * dout, with inp the pre-GELU tensor; dinp may be dout itself."""
    x = inp
    th = np.tanh(GELU_SCALE * (x + 0.044715 * x * x * x))
    dth = (1.0 - th * th) * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
    np.multiply(0.5 * (1.0 + th) + 0.5 * x * dth, dout, out=dinp)


# ----------------------------------------------------------------------------- matmul

def matmul_forward(out, inp, weight, bias, pre_gelu=None):
    """out (B,T,OC) = inp (B,T,C) @ weight (OC,C)^T + bias (OC).

    With pre_gelu given (GELU fused into the epilogue), the affine result is saved there and
    out = gelu(pre_gelu)."""
    dest = out if pre_gelu is None else pre_gelu
    OC, C = weight.shape
    np.matmul(inp.reshape(-1, C), weight.T, out=dest.reshape(-1, OC))  # one (B*T, C) GEMM, not B of them
    if bias is not None:
        dest += bias
    if pre_gelu is not None:
        gelu_forward(out, pre_gelu)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, pre_gelu=None):
    """Overwrite dinp (B,T,C) = dout @ weight; accumulate dweight (OC,C) and dbias (OC).

    With pre_gelu given (the tensor that produced inp through GELU), dinp is carried through
    GELU's derivative as well, so the caller gets the gradient of the pre-GELU tensor."""
    OC, C = weight.shape
    dout2 = dout.reshape(-1, OC)
    dweight += dout2.T @ inp.reshape(-1, C)
    if dbias is not None:
        dbias += dout2.sum(axis=0)
    np.matmul(dout2, weight, out=dinp.reshape(-1, C))
    if pre_gelu is not None:
        gelu_backward(dinp, pre_gelu, dinp)


# ----------------------------------------------------------------------------- attention

def _split_heads(qkv, NH):
    """qkv (B,T,3C) -> q, k, v each (B,NH,T,HS)."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // NH
    q, k, v = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
    return q, k, v


def _causal_scores(q, k):
    """Scaled scores (B,NH,T,T) with the future masked to -inf."""
    T, hs = q.shape[-2:]
    s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / math.sqrt(hs))
    np.copyto(s, -np.inf, where=np.triu(np.ones((T, T), dtype=bool), k=1))  # a where= mask, not (slow) boolean indexing
    return s


def attention_forward(out, lse, qkv):
    """Causal multi-head self-attention.

    qkv (B,T,3C) holds q, k, v side by side, each split into NH heads of size HS = C/NH;
    out (B,T,C) is the heads' outputs side by side; lse (B,NH,T) saves each row's
    log-sum-exp of the scaled scores, all that backward needs to rebuild the probabilities
    (as flash attention does: no (T,T) matrix is kept)."""
    B, NH, T = lse.shape
    q, k, v = _split_heads(qkv, NH)
    s = _causal_scores(q, k)
    rowmax = s.max(axis=-1, keepdims=True)
    p = np.exp(s - rowmax)
    rowsum = p.sum(axis=-1, keepdims=True)
    lse[...] = (rowmax + np.log(rowsum))[..., 0]
    y = (p / rowsum) @ v                                     # (B,NH,T,HS)
    out[...] = y.transpose(0, 2, 1, 3).reshape(B, T, -1)


def attention_backward(dqkv, dout, qkv, out, lse):
    """Overwrite dqkv (B,T,3C) with the gradient of attention_forward's out."""
    B, NH, T = lse.shape
    q, k, v = _split_heads(qkv, NH)
    hs = q.shape[-1]
    p = np.exp(_causal_scores(q, k) - lse[..., None])      # the forward's probabilities
    do = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B,NH,T,HS)
    o = out.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    dv = p.transpose(0, 1, 3, 2) @ do
    dp = do @ v.transpose(0, 1, 3, 2)
    # softmax backward: ds = p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j = dO . O per row
    ds = p * (dp - np.sum(do * o, axis=-1, keepdims=True))
    ds *= np.float32(1.0 / math.sqrt(hs))
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q
    dqkv[...] = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, -1)


def attention_forward_cached(out, k_cache, v_cache, qkv, pos, num_heads):
    """Causal attention for Tn new positions pos..pos+Tn-1 of a sequence whose earlier keys and
    values are cached: sampling runs one new position per token, costing O(pos) instead of the
    O(pos^2) of attention_forward over the whole prefix.

    qkv (B,Tn,3C) holds the new positions' q, k, v (heads side by side, as attention_forward's);
    their k and v are written into rows pos..pos+Tn-1 of k_cache and v_cache (B,maxT,C), whose
    rows below pos hold the earlier positions'. Each new position then attends to every cached
    position up to itself; out (B,Tn,C) equals attention_forward's out at those positions.
    kernels/cuda.py has no such kernel yet: on that backend train_gpt2.Sampler recomputes the
    prefix, and says so."""
    B, Tn, C3 = qkv.shape
    C, end = C3 // 3, pos + Tn
    hs = C // num_heads
    k_cache[:, pos:end] = qkv[..., C:2 * C]
    v_cache[:, pos:end] = qkv[..., 2 * C:]
    heads = lambda x: x.reshape(B, -1, num_heads, hs).transpose(0, 2, 1, 3)  # noqa: E731  (B,T,C) -> (B,NH,T,HS)
    q, k, v = heads(qkv[..., :C]), heads(k_cache[:, :end]), heads(v_cache[:, :end])
    s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / math.sqrt(hs))  # (B,NH,Tn,end)
    np.copyto(s, -np.inf, where=np.arange(end)[None, :] > pos + np.arange(Tn)[:, None])  # the future of each new position
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    y = (p / p.sum(axis=-1, keepdims=True)) @ v  # (B,NH,Tn,HS)
    out[...] = y.transpose(0, 2, 1, 3).reshape(B, Tn, C)


# ----------------------------------------------------------------------------- classifier

def fused_classifier(logits, losses, targets, vocab_size, dloss, write_dlogits):
    """Softmax + cross-entropy (+ its backward) over logits (B,T,Vp), never storing probabilities.

    Only the first vocab_size columns are real tokens; the padding columns take no part in the
    softmax. losses (B,T) gets each token's loss. With write_dlogits, the logits are overwritten
    by d(loss)/d(logits) where each token's loss is weighted by dloss (1/(B*T*grad_accum_steps)
    for the mean over a whole batch); padding columns get 0."""
    real = logits[..., :vocab_size]
    rowmax = real.max(axis=-1, keepdims=True)
    target_logit = np.take_along_axis(real, targets[..., None], axis=-1)
    e = real if write_dlogits else np.empty_like(real)  # logits about to become dlogits hold the exponentials
    np.subtract(real, rowmax, out=e)
    np.exp(e, out=e)
    rowsum = e.sum(axis=-1, keepdims=True)
    losses[...] = (rowmax + np.log(rowsum) - target_logit)[..., 0]
    if write_dlogits:
        e /= rowsum                                          # probabilities
        np.put_along_axis(e, targets[..., None], np.take_along_axis(e, targets[..., None], axis=-1) - 1.0, axis=-1)
        e *= np.float32(dloss)
        logits[..., vocab_size:] = 0.0


# ----------------------------------------------------------------------------- optimizer

def global_norm(grads):
    """sqrt(sum(g^2)) over a flat gradient buffer, in float64 and in a fixed order that depends on the
    buffer's size alone: CHUNK elements at a time, each chunk's squares (exact in float64) summed by
    NumPy's pairwise summation, the chunks' sums added left to right."""
    squares = np.empty(min(CHUNK, grads.size))  # float64, reused: a float64 copy of all the gradients is not made
    total = 0.0
    for start in range(0, grads.size, CHUNK):
        chunk = squares[:min(CHUNK, grads.size - start)]
        np.square(grads[start:start + CHUNK], out=chunk, dtype=np.float64)
        total += float(chunk.sum())
    return math.sqrt(total)


def clip_scale(norm, max_norm):
    """The factor the gradients are multiplied by in the update: llm.c's rule, no epsilon. norm is
    a float or a backend's scalar (global_norm's), read here on the host."""
    norm = float(norm)
    return max_norm / norm if norm > max_norm else 1.0


def adamw(params, grads, m, v, master, t, lr, beta1, beta2, eps, weight_decay, grad_scale, seed, offset=0):
    """One AdamW step over a slice of the flat buffers (one parameter tensor, or its part in a rank's shard).

    grad = grads * grad_scale (the clip); m, v are the fp32 moments; t = step + 1 is the bias
    correction's count; weight decay is decoupled (param -= lr * wd * param), and the caller
    passes 0 for tensors that take none (biases, layernorms). master holds the fp32 copy of
    bf16 params on the GPU; here params are already fp32, so it is None, and seed and offset (the
    stochastic rounding into bf16, and params[0]'s index in its tensor) have nothing to round."""
    assert master is None, "the NumPy backend keeps fp32 params: no master copy"
    # params -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * params), in place, with the
    # bias corrections m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t) folded into scalars;
    # CHUNK elements at a time, so that the two temporaries stay in cache
    scale, decay = np.float32(grad_scale), 1.0 - lr * weight_decay
    v_correction, step_size = 1.0 / math.sqrt(1.0 - beta2 ** t), lr / (1.0 - beta1 ** t)
    scratch = np.empty((2, min(CHUNK, params.size)), np.float32)
    for start in range(0, params.size, CHUNK):
        p, gr, mc, vc = (x[start:start + CHUNK] for x in (params, grads, m, v))
        g, denom = scratch[:, :p.size]
        np.multiply(gr, scale, out=g)
        mc *= beta1
        np.multiply(g, 1.0 - beta1, out=denom)  # denom's room is free until sqrt(v)
        mc += denom
        vc *= beta2
        g *= g
        g *= 1.0 - beta2
        vc += g
        np.sqrt(vc, out=denom)
        denom *= v_correction
        denom += eps
        p *= decay
        np.divide(mc, denom, out=denom)
        denom *= step_size
        p -= denom


# ----------------------------------------------------------------------------- memory
# kernels/cuda.py has the same, over device memory

def zeros(n, dtype):
    return np.zeros(n, dtype)


def upload(dst, src):
    """dst = src, a host array of dst's shape (fp32 values, or int32 tokens)."""
    np.copyto(dst, src)


def download(src):
    """src as a host array, fp32 (or int32 for tokens): src itself here."""
    return src


def scalars(*values):
    """The floats of scalars the kernels left (a loss, a norm): here they are on the host already."""
    return tuple(float(v) for v in values)


def synchronize():
    """Wait for every kernel launched so far (they have all run here)."""
