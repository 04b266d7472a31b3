// Token + position embedding: forward and backward.
//
// Layout: inp (B, T) int32 token ids; wte (Vp, C) and wpe (maxT, C) bf16; out and dout (B, T, C)
// bf16. C is a multiple of 8, so every row is whole 16-byte bf16x8 chunks.
//
// Precision: each sum is fp32 in registers; a gradient row is read as bf16, added to in fp32 and
// rounded to nearest bf16 once.
//
// Determinism: no atomics. dwpe[t] is summed by one thread per 8 channels over b in order. For
// dwte many positions may share a token (EOT, common words), so the caller hands in `order`, the
// positions stable-sorted by token id: the positions of one token are then a run of `order`,
// listed in position order. One block owns each run: its row lanes take every ROWS-th position of
// the run, then the lanes' sums are added in lane order and into dwte once. The sort being
// stable, the run, the split and the order of every sum are fixed by the inputs alone.
//
// Launch shapes: forward and dwpe, one thread per 8 channels of an output row, 256 per block.
// dwte: one block of 32 x ROWS threads per sorted position; every block but a run's first
// returns at once; x walks the row's chunks 32 at a time, y is the row lane.
#include "common.cuh"

constexpr int ROWS = ENCODER_WTE_LANES;  // row lanes per dwte block: a long run is read 16 rows at a time

extern "C" __global__ void encoder_forward(bf16* out, const int* inp, const bf16* wte, const bf16* wpe,
                                           int N, int T, int C) {
    const int C8 = C / 8;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * C8) return;
    const int pos = idx / C8, c = (idx % C8) * 8, t = pos % T;
    const bf16x8 e = load8(wte + (size_t)inp[pos] * C + c);
    const bf16x8 p = load8(wpe + (size_t)t * C + c);
    bf16x8 o;
    for (int k = 0; k < 8; k++) o.v[k] = __float2bfloat16(__bfloat162float(e.v[k]) + __bfloat162float(p.v[k]));
    store8(out + (size_t)pos * C + c, o);
}

// dwpe[t] += sum over b of dout[b, t]
extern "C" __global__ void encoder_backward_wpe(bf16* dwpe, const bf16* dout, int B, int T, int C) {
    const int C8 = C / 8;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= T * C8) return;
    const int t = idx / C8, c = (idx % C8) * 8;
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int b = 0; b < B; b++) {
        const bf16x8 d = load8(dout + ((size_t)b * T + t) * C + c);
        for (int k = 0; k < 8; k++) acc[k] += __bfloat162float(d.v[k]);
    }
    bf16* dst = dwpe + (size_t)t * C + c;
    bf16x8 w = load8(dst);
    for (int k = 0; k < 8; k++) w.v[k] = __float2bfloat16(__bfloat162float(w.v[k]) + acc[k]);
    store8(dst, w);
}

// dwte[token] += sum of dout over the positions of token; order (N) is the positions sorted by
// token id, stably. Launch: grid N, block (32, ROWS).
extern "C" __global__ void encoder_backward_wte(bf16* dwte, const bf16* dout, const int* inp,
                                               const long long* order, int N, int C) {
    const int first = blockIdx.x;
    const int token = inp[order[first]];
    if (first > 0 && inp[order[first - 1]] == token) return;  // not the start of a run: same for the whole block

    // The run ends at the first sorted position past `first` holding another token (ids ascend).
    int lo = first + 1, hi = N;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (inp[order[mid]] == token) lo = mid + 1;
        else hi = mid;
    }
    const int end = lo;

    __shared__ float lane_sums[ROWS][8][32];  // [row lane][channel in chunk][chunk]: conflict-free
    const int C8 = C / 8, x = threadIdx.x, y = threadIdx.y;
    for (int base = 0; base < C8; base += 32) {
        const int c8 = base + x;
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (c8 < C8) {
            for (int i = first + y; i < end; i += ROWS) {
                const bf16x8 d = load8(dout + (size_t)order[i] * C + c8 * 8);
                for (int k = 0; k < 8; k++) acc[k] += __bfloat162float(d.v[k]);
            }
        }
        for (int k = 0; k < 8; k++) lane_sums[y][k][x] = acc[k];
        __syncthreads();
        if (y == 0 && c8 < C8) {
            bf16* dst = dwte + (size_t)token * C + c8 * 8;
            bf16x8 w = load8(dst);
            for (int k = 0; k < 8; k++) {
                float sum = 0.0f;
                for (int r = 0; r < ROWS; r++) sum += lane_sums[r][k][x];
                w.v[k] = __float2bfloat16(__bfloat162float(w.v[k]) + sum);
            }
            store8(dst, w);
        }
        __syncthreads();  // lane_sums is rewritten by the next chunk group
    }
}
