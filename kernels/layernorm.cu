// LayerNorm (forward and backward), and the residual add fused with the layernorm that follows it.
//
// Layout: rows of C channels, (B, T, C) bf16 seen as N = B*T rows; weight, bias, dweight, dbias
// (C) bf16; mean and rstd (N) fp32, saved by the forward for the backward. C is a multiple of 8
// (16-byte bf16x8 chunks), and at most 4096 in the backward (GPT-2's widest is 1600): its block
// of C / 8 threads is capped at 512, which leaves each thread 128 registers and no spills.
//
// Precision: every sum is fp32. The forward is two-pass (the mean, then the mean of squared
// deviations from it), which keeps the variance accurate when |mean| >> std. Biased variance,
// eps 1e-5, rstd = 1 / sqrt(var + eps), as torch.nn.LayerNorm. The fused residual forward
// normalizes the bf16-rounded residual it stores, so it gives exactly layernorm_forward's bits.
//
// Determinism: no atomics. A row's sums run over the lanes' chunks in a fixed order, then a fixed
// shuffle tree (and in the backward, the warps' totals in warp order). dweight and dbias sum over
// all rows in two stages: each backward block keeps fp32 sums over its own rows (a fixed, strided
// set) and stores them as one row of partials; a second kernel adds the partials in block order.
//
// Launch shapes: forward, one warp per row, 8 rows per block of 256 threads; lane l owns chunks
// l, l + 32, ... and re-reads them on each pass (the row is in L1 by then). Backward: one thread
// per chunk of the row (block of ceil(C / 256) warps), the block walks rows blockIdx.x,
// blockIdx.x + gridDim.x, ...; the reduce kernel is a block of 32 x 32 threads per 32 columns.
#include "common.cuh"

constexpr float LN_EPS = 1e-5f;

// Passes 2 and 3 over one row x (this warp's), given the warp-wide sum of its values: the
// variance about the mean, then out = (x - mean) * rstd * weight + bias.
static __device__ void normalize_row(bf16* out, float* mean, float* rstd, const bf16* x, const bf16* weight,
                                     const bf16* bias, float sum, int C, int row, int lane) {
    const float m = sum / C;
    float sq = 0.0f;
    for (int c = lane * 8; c < C; c += 256) {
        const bf16x8 v = load8(x + c);
        for (int k = 0; k < 8; k++) {
            const float d = __bfloat162float(v.v[k]) - m;
            sq += d * d;
        }
    }
    sq = warp_sum(sq);
    const float s = 1.0f / sqrtf(sq / C + LN_EPS);
    for (int c = lane * 8; c < C; c += 256) {
        const bf16x8 v = load8(x + c), w = load8(weight + c), b = load8(bias + c);
        bf16x8 o;
        for (int k = 0; k < 8; k++) {
            const float n = (__bfloat162float(v.v[k]) - m) * s;
            o.v[k] = __float2bfloat16(n * __bfloat162float(w.v[k]) + __bfloat162float(b.v[k]));
        }
        store8(out + c, o);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

extern "C" __global__ void layernorm_forward(bf16* out, float* mean, float* rstd, const bf16* inp,
                                             const bf16* weight, const bf16* bias, int N, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const bf16* x = inp + (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane * 8; c < C; c += 256) {
        const bf16x8 v = load8(x + c);
        for (int k = 0; k < 8; k++) sum += __bfloat162float(v.v[k]);
    }
    sum = warp_sum(sum);
    normalize_row(out + (size_t)row * C, mean, rstd, x, weight, bias, sum, C, row, lane);
}

// residual = inp1 + inp2 (rounded to bf16), then normed = layernorm(residual). Each lane re-reads
// only the chunks it wrote itself, so its own stores are what it reads back.
extern "C" __global__ void fused_residual_forward(bf16* residual, bf16* normed, float* mean, float* rstd,
                                                  const bf16* inp1, const bf16* inp2, const bf16* weight,
                                                  const bf16* bias, int N, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const size_t offset = (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane * 8; c < C; c += 256) {
        const bf16x8 a = load8_stream(inp1 + offset + c), b = load8_stream(inp2 + offset + c);
        bf16x8 r;
        for (int k = 0; k < 8; k++) {
            r.v[k] = __float2bfloat16(__bfloat162float(a.v[k]) + __bfloat162float(b.v[k]));
            sum += __bfloat162float(r.v[k]);
        }
        store8(residual + offset + c, r);
    }
    sum = warp_sum(sum);
    normalize_row(normed + offset, mean, rstd, residual + offset, weight, bias, sum, C, row, lane);
}

// dinp += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd, with norm = (inp - mean) * rstd
// and dnorm = dout * weight; this block's sums over its rows of dout * norm and dout go to
// partials[blockIdx.x] = [dweight part (C) | dbias part (C)].
extern "C" __global__ void __launch_bounds__(512) layernorm_backward(bf16* dinp, float* partials, const bf16* dout, const bf16* inp,
                                              const bf16* weight, const float* mean, const float* rstd,
                                              int N, int C) {
    // The warps' row sums, double-buffered by row parity: a warp can write row i + 1's while
    // slower warps still read row i's, and it cannot reach row i + 2 before they pass row i + 1's
    // __syncthreads, so one barrier per row suffices.
    __shared__ float row_sums[2][2][32];  // [row parity][sum of dnorm, sum of dnorm * norm][warp]
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
    const int c = threadIdx.x * 8;
    const bool active = c < C;
    float w[8], dw[8], db[8];
    for (int k = 0; k < 8; k++) w[k] = dw[k] = db[k] = 0.0f;
    if (active) {
        const bf16x8 wv = load8(weight + c);
        for (int k = 0; k < 8; k++) w[k] = __bfloat162float(wv.v[k]);
    }
    int parity = 0;
    for (int row = blockIdx.x; row < N; row += gridDim.x, parity ^= 1) {
        const float m = mean[row], s = rstd[row];
        const size_t offset = (size_t)row * C + c;
        float norm[8], dnorm[8], sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
        for (int k = 0; k < 8; k++) norm[k] = dnorm[k] = 0.0f;
        if (active) {
            const bf16x8 dy = load8(dout + offset), x = load8(inp + offset);
            for (int k = 0; k < 8; k++) {
                const float g = __bfloat162float(dy.v[k]);
                norm[k] = (__bfloat162float(x.v[k]) - m) * s;
                dnorm[k] = g * w[k];
                sum_dnorm += dnorm[k];
                sum_dnorm_norm += dnorm[k] * norm[k];
                db[k] += g;
                dw[k] += g * norm[k];
            }
        }
        sum_dnorm = warp_sum(sum_dnorm);
        sum_dnorm_norm = warp_sum(sum_dnorm_norm);
        if (lane == 0) {
            row_sums[parity][0][warp] = sum_dnorm;
            row_sums[parity][1][warp] = sum_dnorm_norm;
        }
        __syncthreads();
        if (active) {
            float mean_dnorm = 0.0f, mean_dnorm_norm = 0.0f;
            for (int i = 0; i < num_warps; i++) {
                mean_dnorm += row_sums[parity][0][i];
                mean_dnorm_norm += row_sums[parity][1][i];
            }
            mean_dnorm /= C;
            mean_dnorm_norm /= C;
            bf16x8 d = load8(dinp + offset);
            for (int k = 0; k < 8; k++) {
                const float g = (dnorm[k] - mean_dnorm - norm[k] * mean_dnorm_norm) * s;
                d.v[k] = __float2bfloat16(__bfloat162float(d.v[k]) + g);
            }
            store8(dinp + offset, d);
        }
    }
    if (active) {
        float* part = partials + (size_t)blockIdx.x * 2 * C;
        for (int k = 0; k < 8; k++) {
            part[c + k] = dw[k];
            part[C + c + k] = db[k];
        }
    }
}

// dweight += sum of the P partial rows' first C columns, dbias += the last C, in block order.
// Thread (x, y) of a (32, 32) block sums partials y, y + 32, ... of column blockIdx.x * 32 + x;
// row y = 0 then adds the 32 sums in y order.
extern "C" __global__ void layernorm_backward_reduce(bf16* dweight, bf16* dbias, const float* partials,
                                                     int P, int C) {
    __shared__ float sums[32][33];
    const int x = threadIdx.x, y = threadIdx.y;
    const int col = blockIdx.x * 32 + x;
    float acc = 0.0f;
    if (col < 2 * C) {
        for (int p = y; p < P; p += 32) acc += partials[(size_t)p * 2 * C + col];
    }
    sums[y][x] = acc;
    __syncthreads();
    if (y == 0 && col < 2 * C) {
        float total = 0.0f;
        for (int r = 0; r < 32; r++) total += sums[r][x];
        bf16* dst = col < C ? dweight + col : dbias + (col - C);
        *dst = __float2bfloat16(__bfloat162float(*dst) + total);
    }
}
