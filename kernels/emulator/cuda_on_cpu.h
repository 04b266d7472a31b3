// The emulated device: what a kernels/*.cu file takes from CUDA, written for the host C++ compiler,
// so that the same sources run on the CPU (kernels/emulated.py builds them with -DCUDA_EMULATED,
// through common.cuh, and launches them with kernels/cuda.py's grids, blocks and arguments).
//
// Threads: each thread of a block is a fiber (its own stack and registers) of runtime.cpp. They
// interleave only where CUDA threads meet: __syncthreads is a barrier of the block's live threads
// (threads that returned count as arrived, as on sm_70 and newer), a warp shuffle and mma.sync are
// collectives of the warp's 32 lanes, which must all arrive at the same one (a lane that returned,
// or waits elsewhere, is reported as an error, not guessed at). Between those points the threads
// run one after another in a shuffled order; the blocks of a grid run one at a time, also
// shuffled. Shared memory is filled with NaN bytes (0xff) before each block. So a kernel that
// reads shared memory it never wrote, reads before a missing barrier, or depends on the order of
// blocks or threads gives NaN or other bits, and its tests fail.
//
// Arithmetic: IEEE fp32 one operation at a time (built with -ffp-contract=off: no fused
// multiply-add, where nvcc fuses by default), the host's libm for expf, exp2f, logf, log2f and
// tanhf (the device's differ by an ulp or two), bf16 conversions rounding to nearest even as the
// device's do. mma.sync m16n8k16 multiplies bf16 exactly and adds the 16 products to the fp32
// accumulator one at a time in k order (the tensor core's internal order is not published).
//
// Not modelled: the register and shared-memory limits of real hardware, races between blocks
// (they never run at once here), warp-synchronous code outside the collectives, and speed.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One copy per kernel, shared by the threads of the block that runs (blocks run one at a time).
// The section lets the runtime find every __shared__ variable of the library and fill it with
// NaN before each block. An `extern __shared__` (dynamic shared memory) does not compile here.
#define __shared__ __attribute__((section("emulated_shared"))) static

struct uint3 {
    unsigned int x, y, z;
};
typedef uint3 dim3;  // kernels only read blockDim and gridDim

namespace emulated {
extern uint3 thread_idx, block_idx;  // the running thread's, set by the runtime at every switch
extern dim3 block_dim, grid_dim;
void syncthreads();
uint64_t shuffle_xor(unsigned mask, uint64_t value, int lane_mask, int width);
void mma_m16n8k16_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]);
}  // namespace emulated

#define threadIdx (emulated::thread_idx)
#define blockIdx (emulated::block_idx)
#define blockDim (emulated::block_dim)
#define gridDim (emulated::grid_dim)

inline void __syncthreads() { emulated::syncthreads(); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "a shuffle moves up to 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof(T));
    bits = emulated::shuffle_xor(mask, bits, lane_mask, width);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

// ------------------------------------------------------------------------------ bf16 (cuda_bf16.h)

struct __nv_bfloat16 {
    uint16_t bits;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, 4);
    return u;
}

inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned int)h.bits << 16); }

// Round to nearest, ties to even; a NaN becomes the canonical bf16 NaN, as cvt.rn.bf16.f32 does.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fff};
    return {(uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }

// ------------------------------------------------------------------------------ the rest of CUDA's vocabulary

struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

template <class T>
inline T __ldcs(const T* p) { return *p; }  // a cache hint on the device: a plain load here

// The _rn intrinsics are plain IEEE operations here, since nothing is contracted (-ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }

using std::max;
using std::min;
