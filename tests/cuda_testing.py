"""What the CUDA kernel tests share: the two devices they run on, bf16 on the host (ml_dtypes), and
poisoned output buffers.

Every kernel test runs on the emulated device (kernels/emulated.py: the same .cu sources on the
CPU; in CI, at small shapes; ids say "emulated") and on the GPU (CuPy; at GPT-2's shapes; marked
gpu and skipped, with the reason, where there is none). `cases(emulated=..., gpu=...)` makes that
parametrization; `backend(device)` is the kernels.cuda backend of a device.

A kernel's inputs are drawn in fp32, rounded to bf16 once (`bf16_round`), and the same rounded
values go to the NumPy twin (in fp32) and to the kernel (as bf16 bits): the comparison then
measures the kernel's arithmetic, not the rounding of its inputs."""
import ml_dtypes
import numpy as np
import pytest

from kernels import cuda_backend, cuda_unavailable

NO_GPU_REASON = cuda_unavailable()
requires_gpu = [pytest.mark.gpu, pytest.mark.skipif(NO_GPU_REASON is not None, reason=str(NO_GPU_REASON))]


def on_gpu(test):
    """A test that only makes sense on real hardware: marked gpu, skipped (with the reason) without one."""
    for mark in requires_gpu:
        test = mark(test)
    return test


BF16_POISON = np.uint16(0x7FC0)  # a bf16 NaN: an output the kernel forgot to write shows up at once


def cases(emulated, gpu, ids=None):
    """pytest params (device, case) for each case on its device: `emulated` run everywhere, `gpu`
    only where a GPU is (marked gpu). ids(case) names a case."""
    def param(device, case, marks=()):
        name = ids(case) if ids else "-".join(map(str, case if isinstance(case, tuple) else (case,)))
        return pytest.param(device, case, marks=marks, id=f"{device}-{name}")
    return [param("emulated", c) for c in emulated] + [param("gpu", c, requires_gpu) for c in gpu]


def devices():
    """pytest params for a test that runs once per device."""
    return [pytest.param("emulated", id="emulated"), pytest.param("gpu", id="gpu", marks=requires_gpu)]


def backend(device):
    """kernels.cuda's backend on "emulated" or "gpu" (made once per process)."""
    return cuda_backend(device)


def bf16_round(x):
    """fp32 values rounded to the nearest bf16, back in fp32."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def to_bf16(K, x):
    """A float array as a device uint16 array of bf16 bits (rounded to nearest)."""
    return on_device(K, np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16))


def from_bf16(K, x):
    """A device uint16 array of bf16 bits as a host float32 array."""
    return host(K, x).view(ml_dtypes.bfloat16).astype(np.float32)


def on_device(K, x, dtype=None):
    """A copy of a host array on the device (a copy on the emulated device too: kernels write to it)."""
    return K.xp.array(np.asarray(x, dtype=dtype))


def host(K, x):
    """A device array's values on the host, as its own dtype."""
    return K.device.download(x)


def poisoned_bf16(K, shape):
    return K.xp.full(shape, BF16_POISON, dtype=np.uint16)


def poisoned_f32(K, shape):
    return K.xp.full(shape, np.nan, dtype=np.float32)


def randn(rng, *shape, scale=1.0):
    """bf16-representable normal samples (fp32), never exactly zero in bulk."""
    return bf16_round(rng.standard_normal(shape, dtype=np.float32) * scale)

