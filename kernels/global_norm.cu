// Global gradient norm: sqrt(sum g^2) over a flat bf16 gradient buffer, for the clip.
//
// Layout: grads is N bf16 (N may pass 2^31, so every index is 64-bit); partials holds one fp32
// per block of the first kernel; out is one fp64, the norm.
//
// Precision: squares summed in fp32 per thread (a few thousand terms each, even at 1.5B
// parameters), then per block in fp32, then the per-block partials in fp64.
//
// Determinism: two stages, no atomics. The first kernel's grid is a fixed number of blocks (the
// wrapper's constant, not the device's SM count), each thread striding over fixed elements and
// each block writing its sum to its own slot; the second kernel, one warp, adds the slots in a
// fixed order. The order of every addition depends only on N and the buffer's alignment.
//
// Launch shape: global_norm_partials over any grid of blockDim.x a multiple of 32, grid-stride
// over 16-byte vectors of 8 bf16; the `head` elements before the first 16-byte boundary and the
// few after the last whole vector are taken one at a time. global_norm_finish: one warp.
#include "common.cuh"

__device__ __forceinline__ float square(bf16 x) {
    const float f = __bfloat162float(x);
    return f * f;
}

extern "C" __global__ void global_norm_partials(float* partials, const bf16* grads, long long n, int head) {
    __shared__ float block_scratch[32];
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    float acc = 0.0f;
    if (tid < head) acc += square(grads[tid]);  // head < 8 <= stride
    const bf16* body = grads + head;
    const long long vectors = (n - head) / 8;
    for (long long i = tid; i < vectors; i += stride) {
        const bf16x8 x = load8_stream(body + 8 * i);
#pragma unroll
        for (int k = 0; k < 8; k++) acc += square(x.v[k]);
    }
    const long long tail = head + 8 * vectors + tid;  // fewer than 8 elements are left
    if (tail < n) acc += square(grads[tail]);
    const float block_total = block_sum(acc, block_scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
}

extern "C" __global__ void global_norm_finish(double* out, const float* partials, int count) {
    const int lane = threadIdx.x;
    double acc = 0.0;
    for (int i = lane; i < count; i += 32) acc += (double)partials[i];
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) out[0] = sqrt(acc);
}
