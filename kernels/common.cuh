// What every kernel file shares: the bf16 type, 16-byte packed loads and stores, warp and block
// reductions, the tensor-core product.
//
// Precision: bf16 in memory (CuPy holds it as uint16), fp32 in registers and in every sum.
// Determinism: each reduction here adds in a fixed order fixed by the launch shape, never with
// atomics, so the same inputs give the same bits on every run.
#pragma once
#ifdef CUDA_EMULATED  // the emulated device: these sources compiled for the CPU (kernels/emulator/)
#include "emulator/cuda_on_cpu.h"
#else
#include <cuda_bf16.h>
#endif
#include <stdint.h>

#include "shapes.cuh"

typedef __nv_bfloat16 bf16;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// 8 bf16 = 16 bytes: one vectorized load or store. The pointer must be 16-byte aligned, which
// holds for a row of a tensor whose last dimension is a multiple of 8 (every GPT-2 width is).
struct alignas(16) bf16x8 {
    bf16 v[8];
};

__device__ __forceinline__ bf16x8 load8(const bf16* p) { return *reinterpret_cast<const bf16x8*>(p); }
__device__ __forceinline__ void store8(bf16* p, bf16x8 x) { *reinterpret_cast<bf16x8*>(p) = x; }
// Loads that skip L1 and are marked evict-first, for data read exactly once.
__device__ __forceinline__ bf16x8 load8_stream(const bf16* p) {
    int4 raw = __ldcs(reinterpret_cast<const int4*>(p));
    return *reinterpret_cast<bf16x8*>(&raw);
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` is 32 floats of shared memory; the call ends with the block synchronized, so
// the same scratch can be used again at once.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
    x = warp_sum(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < num_warps ? scratch[lane] : 0.0f;
    x = warp_sum(x);
    __syncthreads();
    return x;
}

// c (16 x 8, fp32) += a (16 x 16) . b (16 x 8), bf16 operands: mma.sync m16n8k16, one instruction
// for the whole warp, each lane holding its fragments of a, b and c (the PTX ISA's layouts, spelled
// out in kernels/emulator/runtime.cpp, where the emulated device builds the same product).
__device__ __forceinline__ void mma_m16n8k16_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef CUDA_EMULATED
    emulated::mma_m16n8k16_bf16(c, a, b);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
