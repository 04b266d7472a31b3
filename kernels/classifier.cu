// Fused classifier: softmax, cross-entropy and its backward over the logits, in place.
//
// Layout: logits (B*T, Vp) bf16, rows of the padded vocabulary (Vp a multiple of 128); only the
// first V columns are tokens, the padding columns take no part in the softmax. losses (B*T) fp32,
// targets (B*T) int32 in [0, V).
//
// Algorithm: a first pass over the row keeps, per thread, an online pair (max, sum of exp(x - max))
// in fp32; the block merges the pairs, and loss = max + log(sum) - logit[target]. With
// write_dlogits, a second pass overwrites the row with (softmax - onehot(target)) * dloss, rounded
// to bf16, and zeros in the padding. The probabilities never reach memory: a (B*T, Vp) fp32 tensor
// would be the largest activation of the whole model.
//
// Determinism: each thread walks fixed columns in a fixed order, and the pairs are merged by a
// fixed butterfly within each warp, then across the warps by warp 0: the same bits on every run.
//
// Launch shape: one block per row, grid B*T; blockDim.x a multiple of 32 (the wrapper uses 512).
// Rows are read as 16-byte vectors of 8 bf16: Vp % 8 == 0 keeps every row 16-byte aligned, and
// the one vector that straddles column V is masked element by element.
#include "common.cuh"

// Merges the stats (m2, s2) into (m, s). A thread that saw no column holds (-inf, 0), which must
// not reach expf(-inf - -inf) = NaN.
__device__ __forceinline__ void merge_stats(float& m, float& s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) {
        m = m2;
        s = s2;
        return;
    }
    const float mx = fmaxf(m, m2);
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

__device__ __forceinline__ void warp_merge_stats(float& m, float& s) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        merge_stats(m, s, m2, s2);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
fused_classifier_kernel(bf16* logits, float* losses, const int* targets, int V, int Vp, float dloss,
                        int write_dlogits) {
    __shared__ float shared_max[32], shared_sum[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
    bf16* row = logits + (size_t)blockIdx.x * Vp;
    const int target = targets[blockIdx.x];
    // Read before the __syncthreads below, so before any thread can overwrite it in pass two.
    const float target_logit = threadIdx.x == 0 ? __bfloat162float(row[target]) : 0.0f;

    float m = -INFINITY, s = 0.0f;
    const int real_vectors = ceil_div(V, 8);
    for (int i = threadIdx.x; i < real_vectors; i += blockDim.x) {
        const bf16x8 x = load8(row + 8 * i);
        const int valid = min(8, V - 8 * i);  // the last vector may reach into the padding
        float vmax = m;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if (k < valid) vmax = fmaxf(vmax, __bfloat162float(x.v[k]));
        }
        s *= expf(m - vmax);  // rescale to the new max (0 * 0 on the first vector, where m = -inf)
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if (k < valid) s += expf(__bfloat162float(x.v[k]) - vmax);
        }
        m = vmax;
    }

    warp_merge_stats(m, s);
    if (lane == 0) {
        shared_max[warp] = m;
        shared_sum[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < num_warps ? shared_max[lane] : -INFINITY;
        s = lane < num_warps ? shared_sum[lane] : 0.0f;
        warp_merge_stats(m, s);
        if (lane == 0) {  // every lane of warp 0 has read its slot before this write (shuffles sync)
            shared_max[0] = m;
            shared_sum[0] = s;
        }
    }
    __syncthreads();
    m = shared_max[0];
    s = shared_sum[0];

    if (threadIdx.x == 0) losses[blockIdx.x] = m + logf(s) - target_logit;
    if (!write_dlogits) return;

    const float inv_sum = 1.0f / s;
    for (int i = threadIdx.x; i < Vp / 8; i += blockDim.x) {
        const bf16x8 x = load8_stream(row + 8 * i);
        bf16x8 d;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int col = 8 * i + k;
            float g = 0.0f;
            if (col < V) {
                const float p = expf(__bfloat162float(x.v[k]) - m) * inv_sum;
                g = (p - (col == target ? 1.0f : 0.0f)) * dloss;
            }
            d.v[k] = __float2bfloat16_rn(g);
        }
        store8(row + 8 * i, d);
    }
}
