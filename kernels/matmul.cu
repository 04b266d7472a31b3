// Matmul: the GEMMs run in cuBLASLt (see matmul_forward / matmul_backward in kernels/cuda.py), with
// the bias add, GELU and GELU's derivative fused into its epilogue. This file holds the one piece
// that stays ours: the bias gradient, dbias (OC) += the column sums of dout (B*T, OC).
//
// Layout: dout is row-major bf16 (B*T rows of OC), dbias bf16. OC must be a multiple of 8 (every
// GPT-2 width is), so each row splits into whole 16-byte chunks of 8 columns.
// Precision: bf16 in, fp32 sums throughout, one rounding to bf16 when added into dbias.
// Determinism: one block per column strip would leave most SMs idle for narrow layers (OC = 768
// is 3 strips of 256 columns over 8K or more rows), and atomics would make the order of the sums,
// so the bits, change from run to run. So two stages, each adding in an order that only the launch
// shape decides:
//   1. matmul_dbias_partials, grid (ceil(OC / 256) strips, ceil(B*T / 64) slabs), block 32 x 8:
//      lane owns 8 adjacent columns (one 16-byte load per row), warp w sums rows w, w+8, ... of
//      the 64-row slab, then warp 0 adds the 8 warps' sums in warp order and writes fp32
//      partials[slab][oc] into the shared scratch buffer.
//   2. matmul_dbias_accumulate, grid ceil(OC / 32), block 32 x 8: lane owns a column, warp w sums
//      slabs w, w+8, ...; warp 0 adds the 8 sums in warp order and adds the total into dbias.
#include "common.cuh"

// DBIAS_ROWS_PER_SLAB, DBIAS_WARPS and DBIAS_STRIP are in shapes.cuh (kernels/cuda.py launches with them)
constexpr int DBIAS_ROWS_PER_WARP = DBIAS_ROWS_PER_SLAB / DBIAS_WARPS;
static_assert(DBIAS_STRIP == 32 * 8, "a stage-1 block is 32 lanes of 8 columns");

extern "C" __global__ void __launch_bounds__(32 * DBIAS_WARPS)
matmul_dbias_partials(float* partials, const bf16* dout, int BT, int OC) {
    __shared__ float warp_sums[DBIAS_WARPS][8][32];  // [warp][column in chunk][lane]: no bank conflicts
    const int lane = threadIdx.x, warp = threadIdx.y;
    const int col = blockIdx.x * DBIAS_STRIP + lane * 8;
    const int slab = blockIdx.y;
    const bool active = col < OC;  // OC % 8 == 0, so col < OC means all 8 columns are in range

    float acc[8] = {};
    if (active) {
        // every load of the thread issued before the first add: 8 requests in flight per thread
        bf16x8 rows[DBIAS_ROWS_PER_WARP];
#pragma unroll
        for (int j = 0; j < DBIAS_ROWS_PER_WARP; j++) {
            const int row = slab * DBIAS_ROWS_PER_SLAB + j * DBIAS_WARPS + warp;
            if (row < BT) {
                rows[j] = load8_stream(dout + (size_t)row * OC + col);
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) rows[j].v[i] = __float2bfloat16(0.0f);
            }
        }
#pragma unroll
        for (int j = 0; j < DBIAS_ROWS_PER_WARP; j++) {
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] += __bfloat162float(rows[j].v[i]);
        }
    }
    if (warp > 0) {
#pragma unroll
        for (int i = 0; i < 8; i++) warp_sums[warp][i][lane] = acc[i];
    }
    __syncthreads();
    if (warp == 0 && active) {
        for (int w = 1; w < DBIAS_WARPS; w++) {
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] += warp_sums[w][i][lane];
        }
        // (slab * OC + col) is a multiple of 8 floats: two aligned 16-byte stores
        float4* dst = reinterpret_cast<float4*>(partials + (size_t)slab * OC + col);
        dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
}

extern "C" __global__ void __launch_bounds__(32 * DBIAS_WARPS)
matmul_dbias_accumulate(bf16* dbias, const float* partials, int num_slabs, int OC) {
    __shared__ float warp_sums[DBIAS_WARPS][32];
    const int lane = threadIdx.x, warp = threadIdx.y;
    const int col = blockIdx.x * 32 + lane;

    float acc = 0.0f;
    if (col < OC) {
#pragma unroll 4
        for (int s = warp; s < num_slabs; s += DBIAS_WARPS) acc += partials[(size_t)s * OC + col];
    }
    warp_sums[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && col < OC) {
        float total = 0.0f;
        for (int w = 0; w < DBIAS_WARPS; w++) total += warp_sums[w][lane];
        dbias[col] = __float2bfloat16_rn(__bfloat162float(dbias[col]) + total);
    }
}
