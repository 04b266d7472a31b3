"""kernels/cuda.py's interface on the CPU, for CI: each function takes the CUDA backend's arrays
(parameters, gradients and activations as bf16 bits in uint16; stats, m, v and master weights in
fp32), computes with its NumPy twin in fp32, and rounds what it writes to bf16 (nearest even).

It lets train_gpt2.py's GPU path run where there is no GPU: bf16 buffers next to fp32 ones in one
activation buffer, master weights, version 5 checkpoints, the state file's master weights, and a
bf16 model's parity with PyTorch. It is not a model of the kernels' arithmetic (they round inside
fused steps and stochastically in AdamW; tests/test_cuda_*.py check them against the twins on a
GPU): it rounds to bf16 at the same places, where each kernel stores."""
import functools

import ml_dtypes
import numpy as np

from kernels import reference

DEVICE = "CPU (bf16 stand-in for the CUDA backend)"
FLOAT = np.dtype(np.uint16)
GELU_FUSION = 2
clip_scale = reference.clip_scale


def to_f32(bits):
    return bits.view(ml_dtypes.bfloat16).astype(np.float32)


def to_bf16(values):
    return np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def _on_fp32(twin):
    """twin over fp32 copies of its array arguments (one copy per array object, so an argument
    passed twice stays one array), each written back afterwards: bf16 ones rounded."""
    @functools.wraps(twin)
    def run(*args, **kwargs):
        copies = {}
        def fp32(x):
            if not isinstance(x, np.ndarray):
                return x
            if id(x) not in copies:
                copies[id(x)] = (x, to_f32(x) if x.dtype == FLOAT else x.copy())
            return copies[id(x)][1]
        result = twin(*map(fp32, args), **{k: fp32(v) for k, v in kwargs.items()})
        for original, copy in copies.values():
            original[...] = to_bf16(copy) if original.dtype == FLOAT else copy
        return result
    return run


encoder_forward = _on_fp32(reference.encoder_forward)
encoder_backward = _on_fp32(reference.encoder_backward)
layernorm_forward = _on_fp32(reference.layernorm_forward)
layernorm_backward = _on_fp32(reference.layernorm_backward)
fused_residual_forward = _on_fp32(reference.fused_residual_forward)
gelu_forward = _on_fp32(reference.gelu_forward)
gelu_backward = _on_fp32(reference.gelu_backward)
matmul_forward = _on_fp32(reference.matmul_forward)
matmul_backward = _on_fp32(reference.matmul_backward)
attention_forward = _on_fp32(reference.attention_forward)
attention_backward = _on_fp32(reference.attention_backward)
fused_classifier = _on_fp32(reference.fused_classifier)
global_norm = _on_fp32(reference.global_norm)


def adamw(params, grads, m, v, master, t, lr, beta1, beta2, eps, weight_decay, grad_scale, seed, offset=0):
    """The twin's step on the fp32 master weights (or on the bf16 params widened, without them),
    then the params rounded to nearest (the kernel rounds stochastically)."""
    weights = to_f32(params) if master is None else master
    reference.adamw(weights, to_f32(grads), m, v, None, t, lr, beta1, beta2, eps, weight_decay, grad_scale, seed,
                    offset)
    params[...] = to_bf16(weights)


def zeros(n, dtype):
    return np.zeros(n, dtype)


def upload(dst, src):
    dst[...] = to_bf16(src) if dst.dtype == FLOAT else src


def download(src):
    return to_f32(src) if src.dtype == FLOAT else src.copy()


scalars = reference.scalars


def synchronize():
    pass
