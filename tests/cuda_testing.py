"""What the GPU tests share: the skip when there is no CUDA device, bf16 on the host (ml_dtypes),
and poisoned output buffers.

A kernel's inputs are drawn in fp32, rounded to bf16 once (`bf16_round`), and the same rounded
values go to the NumPy twin (in fp32) and to the kernel (as bf16 bits): the comparison then
measures the kernel's arithmetic, not the rounding of its inputs."""
import ml_dtypes
import numpy as np
import pytest

from kernels import cuda_unavailable

NO_GPU_REASON = cuda_unavailable()
requires_gpu = [pytest.mark.gpu, pytest.mark.skipif(NO_GPU_REASON is not None, reason=str(NO_GPU_REASON))]

BF16_POISON = np.uint16(0x7FC0)  # a bf16 NaN: an output the kernel forgot to write shows up at once


def bf16_round(x):
    """fp32 values rounded to the nearest bf16, back in fp32."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def to_gpu_bf16(x):
    """A float array as a CuPy uint16 array of bf16 bits (rounded to nearest)."""
    import cupy
    return cupy.asarray(np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16))


def from_gpu_bf16(x):
    """A CuPy uint16 array of bf16 bits as a NumPy float32 array."""
    return x.get().view(ml_dtypes.bfloat16).astype(np.float32)


def poisoned_bf16(shape):
    import cupy
    return cupy.full(shape, BF16_POISON, dtype=cupy.uint16)


def poisoned_f32(shape):
    import cupy
    return cupy.full(shape, np.nan, dtype=cupy.float32)


def randn(rng, *shape, scale=1.0):
    """bf16-representable normal samples (fp32), never exactly zero in bulk."""
    return bf16_round(rng.standard_normal(shape, dtype=np.float32) * scale)
