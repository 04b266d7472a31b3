"""The emulated device itself (kernels/emulator/, kernels/emulated.py): that it runs CUDA's semantics
and catches what a GPU would get wrong silently, each shown on a small kernel written here.

- mma.sync m16n8k16: the fragments as the PTX ISA lays them out, against NumPy's product, on the
  emulated device and, where there is one, on a GPU: there the emulator's model of the instruction
  is checked against the hardware's;
- a read of shared memory nothing wrote gives NaN (shared memory is poisoned before each block);
- a missing __syncthreads gives NaN or other bits, where the same kernel with it gives the answer;
- a kernel that depends on the order of blocks gives other bits with another seed;
- a warp whose lanes meet at different places (a barrier and a shuffle: a hang on the GPU, or
  worse), a lane that returns while the others wait at a shuffle, launch shapes the device refuses
  and arguments the kernel does not take are each refused with the reason."""
import numpy as np
import pytest

import kernels
from cuda_testing import on_gpu

PROBES = r'''
#include "common.cuh"

// D = A B + C for one warp: each lane loads its fragments (PTX ISA, mma.m16n8k16 with .bf16) from
// row-major A (16 x 16 bf16), B (16 x 8 bf16) and C (16 x 8 fp32), and stores its part of D.
extern "C" __global__ void mma_probe(float* d, const bf16* a, const bf16* b, const float* c) {
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    auto pair = [](bf16 lo, bf16 hi) {
        __nv_bfloat162 v;
        v.x = lo;
        v.y = hi;
        return *reinterpret_cast<uint32_t*>(&v);
    };
    const uint32_t fa[4] = {pair(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                            pair(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                            pair(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                            pair(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
    const uint32_t fb[2] = {pair(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
                            pair(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
    float fc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    mma_m16n8k16_bf16(fc, fa, fb);
    d[g * 8 + 2 * t] = fc[0];
    d[g * 8 + 2 * t + 1] = fc[1];
    d[(g + 8) * 8 + 2 * t] = fc[2];
    d[(g + 8) * 8 + 2 * t + 1] = fc[3];
}

// out[i] = the value thread i + 1 (of the block) stored in shared memory, with or without the
// barrier between the stores and the loads.
extern "C" __global__ void neighbour(float* out, int barrier) {
    __shared__ float s[256];
    s[threadIdx.x] = (float)(blockIdx.x * blockDim.x + threadIdx.x);
    if (barrier) __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Reads shared memory that nothing wrote.
extern "C" __global__ void unwritten(float* out) {
    __shared__ float s[32];
    out[threadIdx.x] = s[threadIdx.x];
}

// Each block adds one to what the previous block left: the answer depends on the order of blocks.
extern "C" __global__ void chain(int* cells) {
    if (threadIdx.x == 0) cells[blockIdx.x + 1] = cells[blockIdx.x] + 1;
}

// Lane 0 waits at a barrier while lanes 1..31 shuffle: a warp that meets at two places.
extern "C" __global__ void divergent(float* out) {
    float x = threadIdx.x;
    if (threadIdx.x == 0) __syncthreads();
    else x = __shfl_xor_sync(0xffffffffu, x, 1);
    out[threadIdx.x] = x;
}

// Lane 0 returns while the other lanes shuffle.
extern "C" __global__ void early_return(float* out) {
    if (threadIdx.x == 0) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);
}

extern "C" __global__ void scale(float* x, int n, float factor) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= factor;
}
'''


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory, kernel_folder):
    """A kernel folder holding the repository's headers and emulator, and probes.cu."""
    return kernel_folder(tmp_path_factory.mktemp("probes"), probes=PROBES)


@pytest.fixture
def probes(probe_dir, monkeypatch):
    """An emulated device over probes.cu alone (seed 0)."""
    monkeypatch.setattr(kernels, "KERNEL_DIR", probe_dir)
    monkeypatch.setattr(kernels, "BUILD_DIR", probe_dir / "build")
    from kernels.emulated import Emulated
    return Emulated(seed=0)


def mma_operands():
    """Small integers: every product and every partial sum is exact in fp32, so any order of
    summation gives the same bits and the comparison is exact. Distinct values everywhere, so a
    fragment element in the wrong place shows."""
    rng = np.random.default_rng(0)
    a = rng.permutation(np.arange(-128, 128))[:256].reshape(16, 16).astype(np.float32) / 8
    b = rng.permutation(np.arange(-64, 64)).reshape(16, 8).astype(np.float32) / 4
    c = rng.permutation(np.arange(128)).reshape(16, 8).astype(np.float32) * 3
    return a, b, c


def bf16(x):
    import ml_dtypes
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def test_mma_uses_the_ptx_fragment_layout(probes):
    a, b, c = mma_operands()
    d = np.full((16, 8), np.nan, np.float32)
    probes.kernel("probes", "mma_probe")((1,), (32,), (d, bf16(a), bf16(b), c))
    np.testing.assert_array_equal(d, a @ b + c)


@on_gpu
def test_the_emulated_mma_is_the_gpus(probe_dir, monkeypatch):
    """The same probe on the GPU's tensor cores: the emulator's fragment layout and its product are
    the hardware's."""
    import cupy as cp
    monkeypatch.setattr(kernels, "KERNEL_DIR", probe_dir)
    monkeypatch.setattr(kernels, "BUILD_DIR", probe_dir / "build")
    from kernels.gpu import GPU
    a, b, c = mma_operands()
    d = cp.full((16, 8), np.nan, dtype=cp.float32)
    GPU().kernel("probes", "mma_probe")((1,), (32,), (d, cp.asarray(bf16(a)), cp.asarray(bf16(b)), cp.asarray(c)))
    np.testing.assert_array_equal(d.get(), a @ b + c)


def test_shared_memory_nothing_wrote_reads_as_nan(probes):
    out = np.zeros(32, np.float32)
    probes.kernel("probes", "unwritten")((1,), (32,), (out,))
    assert np.isnan(out).all()


def test_a_missing_barrier_gives_wrong_values_and_the_barrier_the_right_ones(probes):
    blocks, threads = 8, 256
    want = (np.arange(blocks * threads).reshape(blocks, threads) // threads * threads
            + (np.arange(threads) + 1) % threads).reshape(-1).astype(np.float32)
    out = np.zeros(blocks * threads, np.float32)
    probes.kernel("probes", "neighbour")((blocks,), (threads,), (out, np.int32(1)))
    np.testing.assert_array_equal(out, want)
    probes.kernel("probes", "neighbour")((blocks,), (threads,), (out, np.int32(0)))
    assert np.isnan(out).any() and (out != want).mean() > 0.25  # the threads that ran before their neighbour


def test_blocks_run_in_another_order_with_another_seed(probe_dir, monkeypatch):
    monkeypatch.setattr(kernels, "KERNEL_DIR", probe_dir)
    monkeypatch.setattr(kernels, "BUILD_DIR", probe_dir / "build")
    from kernels.emulated import Emulated
    results = []
    for seed in (0, 1):
        cells = np.zeros(65, np.int32)
        Emulated(seed=seed).kernel("probes", "chain")((64,), (32,), (cells,))
        results.append(cells)
    assert not np.array_equal(results[0], np.arange(65))  # in launch order, the chain would count up
    assert not np.array_equal(results[0], results[1])


@pytest.mark.parametrize("kernel, message", [
    ("divergent", "__shfl_xor_sync while lane 0 of its warp waits at __syncthreads|"
                  "__syncthreads while other lanes of its warp wait at __shfl_xor_sync"),
    ("early_return", "returned while other lanes of its warp wait at __shfl_xor_sync"),
])
def test_what_would_hang_or_be_undefined_on_the_gpu_is_refused(probes, kernel, message):
    from kernels.emulated import LaunchError
    with pytest.raises(LaunchError, match=message):
        probes.kernel("probes", kernel)((1,), (64,), (np.zeros(64, np.float32),))


@pytest.mark.parametrize("args, message", [
    ((np.int64(3), np.float32(2)), "argument 1 is a 8-byte integer, the kernel takes a 4-byte integer"),
    ((np.int32(3), np.float64(2)), "argument 2 is a 8-byte float, the kernel takes a 4-byte float"),
    ((np.int32(3),), "given 2 arguments, takes 3"),
])
def test_arguments_the_kernel_does_not_take_are_refused(probes, args, message):
    from kernels.emulated import LaunchError
    x = np.ones(3, np.float32)
    with pytest.raises(LaunchError, match=message):
        probes.kernel("probes", "scale")((1,), (32,), (x, *args))
    probes.kernel("probes", "scale")((1,), (32,), (x, np.int32(3), np.float32(2)))
    np.testing.assert_array_equal(x, [2, 2, 2])


def test_launch_shapes_the_device_refuses_are_refused(probes):
    from kernels.emulated import LaunchError
    x = np.ones(3, np.float32)
    for grid, block in (((1,), (1025,)), ((1, 65536), (32,)), ((0,), (32,))):
        with pytest.raises(LaunchError, match="launch refused"):
            probes.kernel("probes", "scale")(grid, block, (x, np.int32(3), np.float32(2)))
