// Causal multi-head self-attention, flash-attention style: forward and backward.
//
// Layout: qkv (B, T, 3C) holds q | k | v side by side, each split into NH heads of HS = 64
// channels; out and dout are (B, T, C), the heads side by side; lse (B, NH, T) fp32 is each
// query row's log-sum-exp of its scaled scores, the only thing the forward saves besides out.
// No (T, T) matrix ever exists: scores are made tile by tile and consumed at once.
//
// Precision: bf16 tensor-core products (mma.sync m16n8k16, fp32 accumulate). Scores, the online
// softmax statistics and every accumulator stay fp32 in registers; the probabilities are rounded
// to bf16 only as the left operand of the next product (P V, dS K, ...), as flash attention does.
// Exponentials are exp2 on scores pre-multiplied by log2(e) / sqrt(HS).
//
// Determinism: no atomics. The backward is two kernels: one per key tile computes dK and dV by
// walking the query tiles, one per query tile computes dQ by walking the key tiles; each output
// element is summed by one thread in a fixed order. (The usual one-kernel backward adds dQ with
// float atomics, whose order varies between runs.) D = rowsum(dO * O) is recomputed where needed.
//
// Launch shape: tiles of 64 query (or key) rows; a block of 4 warps, each warp owning 16 rows of
// the tile; grid (ceil(T / 64), B * NH). Query tile i sees key tiles 0..i, so the work per block
// grows with i: blocks are numbered so that the heaviest start first. Shared memory holds
// 64 x 64 bf16 tiles, rows padded to 72 elements so that fragment loads hit 32 distinct banks.
#include "common.cuh"

constexpr int HS = ATTENTION_HEAD_SIZE;  // head size (shapes.cuh)
constexpr int TILE = ATTENTION_TILE;     // rows per tile, query and key alike
constexpr int LD = HS + 8;               // shared-memory row stride (elements)
constexpr int THREADS = ATTENTION_THREADS;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float SCALE = 0.125f;   // 1 / sqrt(HS)

// ---------------------------------------------------------------------------------- tiles

// Rows [t0, t0 + 64) of one head's (T, 64) slice, rows `stride` elements apart in global memory,
// into a shared tile; rows at or past T are zeros (so they add nothing to any product).
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* src, int t0, int T, int stride) {
    for (int i = threadIdx.x; i < TILE * HS / 8; i += THREADS) {
        const int r = i / (HS / 8), c = (i % (HS / 8)) * 8;
        int4 x = make_int4(0, 0, 0, 0);
        if (t0 + r < T) x = *reinterpret_cast<const int4*>(src + (size_t)(t0 + r) * stride + c);
        *reinterpret_cast<int4*>(tile + r * LD + c) = x;
    }
}

// D[r] = sum_d dO[r, d] * O[r, d] and the row's log-sum-exp (in log2 units) for the 64 rows of a
// query tile starting at t0: what the softmax backward needs per query row. Rows past T get 0.
__device__ __forceinline__ void load_row_stats(float* sD, float* sL, const bf16* sdo, const bf16* o_head,
                                               const float* lse_head, int t0, int T, int C) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = warp * 16; r < warp * 16 + 16; r++) {
        const int t = t0 + r;
        float d = 0.0f;
        if (t < T) {
            const __nv_bfloat162 o = *reinterpret_cast<const __nv_bfloat162*>(o_head + (size_t)t * C + 2 * lane);
            const __nv_bfloat162 g = *reinterpret_cast<const __nv_bfloat162*>(sdo + r * LD + 2 * lane);
            d = __bfloat162float(o.x) * __bfloat162float(g.x) + __bfloat162float(o.y) * __bfloat162float(g.y);
        }
        d = warp_sum(d);
        if (lane == 0) {
            sD[r] = d;
            sL[r] = t < T ? lse_head[t] * LOG2E : 0.0f;
        }
    }
}

// ---------------------------------------------------------------------------------- mma fragments
// mma.sync m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16"): lane = 4 g + c. A (16 x 16):
// a[0] = A[g][2c, 2c+1], a[1] = A[g+8][2c, 2c+1], a[2] = A[g][2c+8, 2c+9], a[3] = A[g+8][2c+8, 2c+9].
// B (16 x 8): b[0] = B[2c, 2c+1][g], b[1] = B[2c+8, 2c+9][g]. C (16 x 8, fp32): c[0..1] = C[g][2c, 2c+1],
// c[2..3] = C[g+8][2c, 2c+1]. Two adjacent C tiles (columns 16s..16s+15) are thereby exactly the
// A fragment of k-step s, which is how a probability tile feeds the next product from registers.

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t smem_u32(const bf16* tile, int r, int col) {
    return *reinterpret_cast<const uint32_t*>(tile + r * LD + col);
}

// A = tile[r0 .. r0+15][k0 .. k0+15]
__device__ __forceinline__ void load_a(uint32_t a[4], const bf16* tile, int r0, int k0) {
    const int g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
    a[0] = smem_u32(tile, r0 + g, k0 + 2 * c);
    a[1] = smem_u32(tile, r0 + g + 8, k0 + 2 * c);
    a[2] = smem_u32(tile, r0 + g, k0 + 2 * c + 8);
    a[3] = smem_u32(tile, r0 + g + 8, k0 + 2 * c + 8);
}

// B[k][n] = tile[n0 + n][k0 + k]: the tile's rows are B's columns (K in Q K^T).
__device__ __forceinline__ void load_b_rows_are_n(uint32_t b[2], const bf16* tile, int n0, int k0) {
    const int g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
    b[0] = smem_u32(tile, n0 + g, k0 + 2 * c);
    b[1] = smem_u32(tile, n0 + g, k0 + 2 * c + 8);
}

// B[k][n] = tile[k0 + k][n0 + n]: the tile's rows are B's rows (V in P V); two 16-bit loads per register.
__device__ __forceinline__ void load_b_rows_are_k(uint32_t b[2], const bf16* tile, int k0, int n0) {
    const int g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
    const uint16_t* t = reinterpret_cast<const uint16_t*>(tile);
    const int k = k0 + 2 * c, n = n0 + g;
    b[0] = (uint32_t)t[k * LD + n] | ((uint32_t)t[(k + 1) * LD + n] << 16);
    b[1] = (uint32_t)t[(k + 8) * LD + n] | ((uint32_t)t[(k + 9) * LD + n] << 16);
}

// acc (16 x 64) += A (16 x 64, four k-steps held as fragments) . tile^T: a warp's rows against
// the 64 rows of a tile (scores S = Q K^T, or dP = dO V^T).
__device__ __forceinline__ void mma_rows_by_tile(float acc[8][4], const uint32_t a[4][4], const bf16* tile) {
    #pragma unroll
    for (int n = 0; n < 8; n++)
        #pragma unroll
        for (int s = 0; s < 4; s++) {
            uint32_t b[2];
            load_b_rows_are_n(b, tile, n * 8, s * 16);
            mma_m16n8k16_bf16(acc[n], a[s], b);
        }
}

// acc (16 x 64) += P (16 x 64, fp32 in C layout, rounded to bf16 here) . tile (64 x 64).
__device__ __forceinline__ void mma_probs_by_tile(float acc[8][4], const float p[8][4], const bf16* tile) {
    #pragma unroll
    for (int s = 0; s < 4; s++) {
        const uint32_t a[4] = {pack_bf16(p[2 * s][0], p[2 * s][1]), pack_bf16(p[2 * s][2], p[2 * s][3]),
                               pack_bf16(p[2 * s + 1][0], p[2 * s + 1][1]), pack_bf16(p[2 * s + 1][2], p[2 * s + 1][3])};
        #pragma unroll
        for (int n = 0; n < 8; n++) {
            uint32_t b[2];
            load_b_rows_are_k(b, tile, s * 16, n * 8);
            mma_m16n8k16_bf16(acc[n], a, b);
        }
    }
}

__device__ __forceinline__ void zero(float acc[8][4]) {
    #pragma unroll
    for (int n = 0; n < 8; n++)
        #pragma unroll
        for (int e = 0; e < 4; e++) acc[n][e] = 0.0f;
}

// Write a warp's 16 x 64 fp32 accumulator, times `scale`, as bf16 rows (row0 + g, row0 + g + 8)
// of a head slice whose rows are `stride` elements apart; rows at or past T are not written.
__device__ __forceinline__ void store_rows(bf16* dst, const float acc[8][4], int row0, int T, int stride,
                                           float scale0, float scale1) {
    const int g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
    #pragma unroll
    for (int half = 0; half < 2; half++) {
        const int t = row0 + g + 8 * half;
        if (t >= T) continue;
        const float scale = half ? scale1 : scale0;
        #pragma unroll
        for (int n = 0; n < 8; n++) {
            __nv_bfloat162 v = __floats2bfloat162_rn(acc[n][2 * half] * scale, acc[n][2 * half + 1] * scale);
            *reinterpret_cast<__nv_bfloat162*>(dst + (size_t)t * stride + n * 8 + 2 * c) = v;
        }
    }
}

// ---------------------------------------------------------------------------------- forward

extern "C" __global__ void __launch_bounds__(THREADS)
attention_forward(bf16* out, float* lse, const bf16* qkv, int T, int NH) {
    __shared__ __align__(16) bf16 sq[TILE * LD], sk[TILE * LD], sv[TILE * LD];
    const int C = NH * HS, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
    const int row0 = qt * TILE + warp * 16;                  // this warp's first query row
    const bf16* q_head = qkv + (size_t)b * T * 3 * C + h * HS;  // rows 3C apart; k at +C, v at +2C

    load_tile(sq, q_head, qt * TILE, T, 3 * C);
    __syncthreads();
    uint32_t qa[4][4];
    #pragma unroll
    for (int s = 0; s < 4; s++) load_a(qa[s], sq, warp * 16, s * 16);

    float o[8][4], row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // row_sum: this thread's columns
    zero(o);
    for (int kt = 0; kt <= qt; kt++) {
        __syncthreads();  // every warp is done with the previous key tile
        load_tile(sk, q_head + C, kt * TILE, T, 3 * C);
        load_tile(sv, q_head + 2 * C, kt * TILE, T, 3 * C);
        __syncthreads();

        float s[8][4];
        zero(s);
        mma_rows_by_tile(s, qa, sk);
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            const int t = row0 + g + 8 * half;
            float tile_max = -INFINITY;
            #pragma unroll
            for (int n = 0; n < 8; n++)
                #pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int key = kt * TILE + n * 8 + 2 * c + e;
                    float& x = s[n][2 * half + e];
                    x = (key <= t && key < T) ? x * (SCALE * LOG2E) : -INFINITY;
                    tile_max = fmaxf(tile_max, x);
                }
            // the row's 64 scores sit in the 4 lanes of one group: combine them
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            // key kt*64 <= every row of this tile and < T, so tile_max is finite
            const float new_max = fmaxf(row_max[half], tile_max);
            const float rescale = exp2f(row_max[half] - new_max);  // 0 on the first tile
            row_max[half] = new_max;
            row_sum[half] *= rescale;
            #pragma unroll
            for (int n = 0; n < 8; n++) {
                o[n][2 * half] *= rescale;
                o[n][2 * half + 1] *= rescale;
                #pragma unroll
                for (int e = 0; e < 2; e++) {
                    float& x = s[n][2 * half + e];
                    x = exp2f(x - new_max);
                    row_sum[half] += x;
                }
            }
        }
        mma_probs_by_tile(o, s, sv);
    }

    float inv_sum[2];
    #pragma unroll
    for (int half = 0; half < 2; half++) {
        float sum = row_sum[half];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv_sum[half] = 1.0f / sum;
        const int t = row0 + g + 8 * half;
        if (c == 0 && t < T) lse[(size_t)bh * T + t] = (row_max[half] + log2f(sum)) * LN2;
    }
    store_rows(out + (size_t)b * T * C + h * HS, o, row0, T, C, inv_sum[0], inv_sum[1]);
}

// ---------------------------------------------------------------------------------- backward
// With P the forward's probabilities (rebuilt from lse), dO the output gradient and
// D = rowsum(dO * O):  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = dS K / sqrt(HS),
// dK = dS^T Q / sqrt(HS).

// dQ for one query tile, walking key tiles 0..qt.
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_dq(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int NH) {
    __shared__ __align__(16) bf16 sq[TILE * LD], sdo[TILE * LD], sk[TILE * LD], sv[TILE * LD];
    __shared__ float sD[TILE], sL[TILE];
    const int C = NH * HS, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
    const int row0 = qt * TILE + warp * 16;
    const bf16* q_head = qkv + (size_t)b * T * 3 * C + h * HS;
    const size_t head_offset = (size_t)b * T * C + h * HS;  // into out and dout

    load_tile(sq, q_head, qt * TILE, T, 3 * C);
    load_tile(sdo, dout + head_offset, qt * TILE, T, C);
    __syncthreads();
    load_row_stats(sD, sL, sdo, out + head_offset, lse + (size_t)bh * T, qt * TILE, T, C);
    uint32_t qa[4][4], doa[4][4];
    #pragma unroll
    for (int s = 0; s < 4; s++) {
        load_a(qa[s], sq, warp * 16, s * 16);
        load_a(doa[s], sdo, warp * 16, s * 16);
    }
    __syncthreads();  // sD, sL written
    const float D[2] = {sD[warp * 16 + g], sD[warp * 16 + g + 8]};
    const float L[2] = {sL[warp * 16 + g], sL[warp * 16 + g + 8]};

    float dq[8][4];
    zero(dq);
    for (int kt = 0; kt <= qt; kt++) {
        __syncthreads();
        load_tile(sk, q_head + C, kt * TILE, T, 3 * C);
        load_tile(sv, q_head + 2 * C, kt * TILE, T, 3 * C);
        __syncthreads();

        float p[8][4], dp[8][4];
        zero(p);
        zero(dp);
        mma_rows_by_tile(p, qa, sk);
        mma_rows_by_tile(dp, doa, sv);
        #pragma unroll
        for (int n = 0; n < 8; n++)
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                const int half = e / 2, t = row0 + g + 8 * half, key = kt * TILE + n * 8 + 2 * c + e % 2;
                const float prob = (key <= t && key < T) ? exp2f(p[n][e] * (SCALE * LOG2E) - L[half]) : 0.0f;
                p[n][e] = prob * (dp[n][e] - D[half]);  // dS
            }
        mma_probs_by_tile(dq, p, sk);
    }
    store_rows(dqkv + (size_t)b * T * 3 * C + h * HS, dq, row0, T, 3 * C, SCALE, SCALE);
}

// dK and dV for one key tile, walking query tiles kt..last. The warp's rows are keys here, so
// the products are transposed: S^T = K Q^T, dP^T = V dO^T, dV = P^T dO, dK = dS^T Q.
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_dkdv(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int NH) {
    __shared__ __align__(16) bf16 sk[TILE * LD], sv[TILE * LD], sq[TILE * LD], sdo[TILE * LD];
    __shared__ float sD[TILE], sL[TILE];
    const int C = NH * HS, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int kt = blockIdx.x;  // key tile kt is seen by query tiles kt..last: low kt is the heavy end
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
    const int key0 = kt * TILE + warp * 16;  // this warp's first key row
    const bf16* q_head = qkv + (size_t)b * T * 3 * C + h * HS;
    const size_t head_offset = (size_t)b * T * C + h * HS;

    load_tile(sk, q_head + C, kt * TILE, T, 3 * C);
    load_tile(sv, q_head + 2 * C, kt * TILE, T, 3 * C);
    __syncthreads();
    uint32_t ka[4][4], va[4][4];
    #pragma unroll
    for (int s = 0; s < 4; s++) {
        load_a(ka[s], sk, warp * 16, s * 16);
        load_a(va[s], sv, warp * 16, s * 16);
    }

    float dk[8][4], dv[8][4];
    zero(dk);
    zero(dv);
    for (int qt = kt; qt < (int)gridDim.x; qt++) {
        __syncthreads();  // every warp is done with the previous query tile and its row stats
        load_tile(sq, q_head, qt * TILE, T, 3 * C);
        load_tile(sdo, dout + head_offset, qt * TILE, T, C);
        __syncthreads();
        load_row_stats(sD, sL, sdo, out + head_offset, lse + (size_t)bh * T, qt * TILE, T, C);
        __syncthreads();

        float p[8][4], dp[8][4];  // transposed: row = key (this warp's), column = query
        zero(p);
        zero(dp);
        mma_rows_by_tile(p, ka, sq);
        mma_rows_by_tile(dp, va, sdo);
        #pragma unroll
        for (int n = 0; n < 8; n++)
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = key0 + g + 8 * (e / 2), col = n * 8 + 2 * c + e % 2, t = qt * TILE + col;
                p[n][e] = (key <= t && t < T) ? exp2f(p[n][e] * (SCALE * LOG2E) - sL[col]) : 0.0f;
                dp[n][e] = p[n][e] * (dp[n][e] - sD[col]);  // dS^T
            }
        mma_probs_by_tile(dv, p, sdo);
        mma_probs_by_tile(dk, dp, sq);
    }
    bf16* dqkv_head = dqkv + (size_t)b * T * 3 * C + h * HS;
    store_rows(dqkv_head + C, dk, key0, T, 3 * C, SCALE, SCALE);
    store_rows(dqkv_head + 2 * C, dv, key0, T, 3 * C, 1.0f, 1.0f);
}
